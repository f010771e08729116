"""The entry point: the smoke config end to end on the real model, and bad input."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_main(*args, timeout=900):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "ckt_jax.main", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("ckt_jax: error:")]
    assert len(lines) == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_unknown_config_field(tmp_path):
    result = run_main("--config", "configs/smoke.py", "--workdir", str(tmp_path / "w"),
                      "--config.distill.stepz=3")
    assert_one_line_error(result, "distill.stepz", "steps")


def test_missing_config_file(tmp_path):
    result = run_main("--config", "configs/no_such.py", "--workdir", str(tmp_path / "w"))
    assert_one_line_error(result, "configs/no_such.py", "not found")


def test_unknown_stage(tmp_path):
    result = run_main("--config", "configs/smoke.py", "--workdir", str(tmp_path / "w"),
                      "--config.stages=data,trian")
    assert_one_line_error(result, "trian", "data,targets,teacher,distill,eval,report")


def test_foreign_workdir(tmp_path):
    (tmp_path / "notes.txt").write_text("someone else's file")
    result = run_main("--config", "configs/smoke.py", "--workdir", str(tmp_path))
    assert_one_line_error(result, str(tmp_path), "not created by ckt_jax")
    assert (tmp_path / "notes.txt").read_text() == "someone else's file"


def test_unreadable_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf file at all")
    result = run_main("--config", "configs/smoke.py", "--workdir", str(tmp_path / "w"),
                      f"--config.model={bad}", "--config.stages=data,targets")
    assert_one_line_error(result, str(bad), "GGUF")


def test_missing_asset_package_message():
    from ckt_jax.data import sources

    with pytest.raises(FileNotFoundError, match="not installed; run `bash launch/setup.sh`"):
        sources.asset_path("ckt-jax-no-such-asset-package", "file.txt")


@pytest.mark.real
@pytest.mark.slow
def test_smoke_config_end_to_end(tmp_path, smollm2_gguf_path):
    workdir = tmp_path / "smoke"
    result = run_main("--config", "configs/smoke.py", "--workdir", str(workdir))
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((workdir / "report.json").read_text())
    assert set(report["models"]) == {"base", "teacher", "student"}
    for name, model in report["models"].items():
        for key in ("overall_safety_score", "harmful_refusal_rate", "jailbreak_refusal_rate",
                    "benign_compliance_rate", "jailbreak_benign_compliance_rate"):
            assert 0.0 <= model[key] <= 1.0, (name, key)
    assert 0.0 <= report["models"]["student"]["kd_token_agreement"] <= 1.0
    assert set(report["eval_counts"]) == {"eval_harmful", "eval_jailbreak",
                                          "eval_benign_sensitive", "eval_jailbreak_benign"}
    assert "overall_safety_score" in (workdir / "report.md").read_text()
    assert "| student |" in result.stdout
    for run in ("teacher", "student"):
        (log_dir,) = (workdir / "logs" / run).iterdir()
        steps = (log_dir / "metrics.jsonl").read_text().splitlines()
        assert len(steps) == 2, run  # configs/smoke.py trains 2 steps
        assert list(log_dir.glob("events.out.tfevents.*")), run

    # A second run reuses every finished stage, and a changed training field is refused
    # instead of overwriting the finished student.
    again = run_main("--config", "configs/smoke.py", "--workdir", str(workdir))
    assert again.returncode == 0, again.stderr[-4000:]
    assert "distill: reusing" in again.stderr
    changed = run_main("--config", "configs/smoke.py", "--workdir", str(workdir),
                       "--config.distill.steps=5", "--config.stages=distill")
    assert_one_line_error(changed, "distill.steps")
