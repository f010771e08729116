"""The entry point: the smoke config end to end on the real model, and bad input."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_main(*args, timeout=900, xla_flags=""):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    if xla_flags:
        env["XLA_FLAGS"] = xla_flags
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


def override_problem(override: str) -> str | None:
    from ckt_jax import main
    return main.check_config_args(["ckt_jax", "--config", "configs/smoke.py",
                                   f"--config.{override}"])


@pytest.mark.parametrize("override, message", [
    ("distill.steps=abc", "--config.distill.steps='abc' is not a whole number"),
    ("distill.steps=2.5", "--config.distill.steps='2.5' is not a whole number"),
    ("distill.temperature=hot", "--config.distill.temperature='hot' is not a number"),
    ("train.scan_layers=maybe", "--config.train.scan_layers='maybe' is not a boolean"),
    # A misspelled field gets the nearest whole flag.
    ("distill.stepz=3", "did you mean --config.distill.steps?"),
    ("distll.steps=3", "did you mean --config.distill.steps?"),
    ("distill.teacher_cach.top_k=8", "did you mean --config.distill.teacher_cache.top_k?"),
])
def test_override_problem_message(override, message):
    problem = override_problem(override)
    assert problem is not None
    assert message in problem


@pytest.mark.parametrize("override", ["distill.steps=7", "distill.temperature=2",
                                      "distill.temperature=1e-1", "train.scan_layers=False",
                                      "train.scan_layers=1", "train.scan_layers"])
def test_override_of_right_type(override):
    assert override_problem(override) is None


def test_cache_top_k_above_vocab_fails_early(tmp_path):
    workdir = tmp_path / "w"
    result = run_main("--config", "configs/smoke.py", "--workdir", str(workdir),
                      "--config.distill.teacher_cache.enabled=True",
                      "--config.distill.teacher_cache.top_k=100000")
    assert_one_line_error(result, "config.distill.teacher_cache.top_k=100000 exceeds the "
                          "vocabulary size 49152")
    assert not (workdir / "data").exists()


def run_main_raising(exception: str, workdir):
    """Run the entry point with its stages replaced by `raise <exception>`."""
    code = ("import errno, sys; from absl import app; import ckt_jax.main as m\n"
            "def run(config, workdir):\n"
            f"    raise {exception}\n"
            "m.run = run\n"
            f"sys.argv = ['ckt_jax', '--config', 'configs/smoke.py', '--workdir', "
            f"{str(workdir)!r}]\n"
            "app.run(m.main, flags_parser=m.parse_flags)\n")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_os_error_is_one_line(tmp_path):
    # A read-only file system, as a run whose export directory is on one would meet it.
    result = run_main_raising("OSError(errno.EROFS, 'Read-only file system', '/mnt/ro/export')",
                              tmp_path / "w")
    assert result.returncode == 1, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("ckt_jax: error:")]
    assert lines == ["ckt_jax: error: [Errno 30] Read-only file system: '/mnt/ro/export'; fix "
                     "the path or free disk space, then run the same command again (finished "
                     "stages are reused)"]
    assert "Traceback" not in result.stderr


def test_check_only_touches_nothing(tmp_path):
    workdir = tmp_path / "w"
    result = run_main("--config", "configs/smoke.py", "--workdir", str(workdir), "--check_only",
                      "--config.model=/exists/only/on/the/cluster")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "config checked, no problems found" in result.stderr
    assert not workdir.exists()
    result = run_main("--config", "configs/smoke.py", "--workdir", str(workdir), "--check_only",
                      "--config.distill.kd_weight=nan")
    assert_one_line_error(result, "config.distill.kd_weight=nan is not a finite number")
    assert not workdir.exists()


def test_argument_to_config_without_sizes():
    from ckt_jax import main
    problem = main.check_config_args(["ckt_jax", "--config", "configs/smoke.py:full"])
    assert problem == ("config file 'configs/smoke.py' takes no argument, but --config passes "
                       "'full'; drop ':full'")


def test_blank_workdir(tmp_path):
    result = run_main("--config", "configs/smoke.py", "--workdir", " ")
    assert_one_line_error(result, "--workdir is required")
    assert not (ROOT / " ").exists()


def test_second_ctrl_c_is_one_line(tmp_path):
    result = run_main_raising("KeyboardInterrupt", tmp_path / "w")
    assert result.returncode == 130, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("ckt_jax: stopped by Ctrl-C")
    assert "Traceback" not in result.stderr


def test_missing_config_file(tmp_path):
    result = run_main("--config", "configs/no_such.py", "--workdir", str(tmp_path / "w"))
    assert_one_line_error(result, "configs/no_such.py", "not found")


def test_missing_workdir_flag():
    result = run_main("--config", "configs/smoke.py")
    assert_one_line_error(result, "--workdir is required")


def test_config_directory_or_dict(tmp_path):
    result = run_main("--config", "configs", "--workdir", str(tmp_path / "w"))
    assert_one_line_error(result, "'configs' is a directory")
    plain = tmp_path / "plain.py"
    plain.write_text("def get_config():\n    return {'seed': 0}\n")
    result = run_main("--config", str(plain), "--workdir", str(tmp_path / "w"))
    assert_one_line_error(result, "returned a dict, not an ml_collections ConfigDict")


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


def test_mesh_larger_than_device_count(tmp_path):
    result = run_main("--config", "configs/smoke.py", "--workdir", str(tmp_path / "w"),
                      "--config.mesh.data=1", "--config.mesh.tensor=2")
    assert_one_line_error(result, "config.mesh is 1x1x2=2 devices but 1 are available")


def test_invalid_train_settings(tmp_path):
    result = run_main("--config", "configs/smoke.py", "--workdir", str(tmp_path / "w"),
                      "--config.train.compute_dtype=float8")
    assert_one_line_error(result, "config.train.compute_dtype='float8' is unknown")
    result = run_main("--config", "configs/smoke.py", "--workdir", str(tmp_path / "w"),
                      "--config.checkpoint.keep_last=0")
    assert_one_line_error(result, "config.checkpoint.keep_last=0 must be >= 1")



@pytest.mark.parametrize("override, message", [
    ("log_every=0", "config.log_every=0 must be >= 1"),
    ("distill.kd_weight=nan", "config.distill.kd_weight=nan is not a finite number"),
    ("checkpoint.best_metric=accuracy", "config.checkpoint.best_metric='accuracy' is not a "
                                        "training metric"),
    ("distill.text_noise.typo_rate=2", "config.distill.text_noise.typo_rate=2.0 is outside"),
    ("distill.noise_alpha=-1", "config.distill.noise_alpha=-1.0 must be >= 0"),
    ("data.max_seq_len=0", "config.data.max_seq_len=0 must be >= 2"),
    ("model=llama", "config.model='llama' not found"),
    ("data.max_benign_prompts=-1", "config.data.max_benign_prompts=-1 must be >= 0"),
    ("teacher=/no/such/teacher", "config.teacher='/no/such/teacher' not found"),
    ("distill.temperature=inf", "config.distill.temperature=inf is not a finite number"),
    ("eval.limit=-1", "config.eval.limit=-1 must be >= 0"),
    ("distill.learning_rate=-1", "config.distill.learning_rate=-1.0 must be > 0"),
    ("targets.batch_size=0", "config.targets.batch_size=0 must be >= 1"),
    ("distill.divergence=foo", "config.distill.divergence='foo' is unknown"),
    ("distill.lora_targets=q,zz", "config.distill.lora_targets has unknown names ['zz']"),
])
def test_out_of_range_values(tmp_path, override, message):
    # Each is rejected before any model loads, instead of failing inside a stage.
    result = run_main("--config", "configs/smoke.py", "--workdir", str(tmp_path / "w"),
                      f"--config.{override}")
    assert_one_line_error(result, message)
    assert not (tmp_path / "w" / "data").exists()


def test_report_without_evaluation(tmp_path):
    result = run_main("--config", "configs/smoke.py", "--workdir", str(tmp_path / "w"),
                      "--config.stages=report")
    assert_one_line_error(result, "no evaluation with these eval settings in",
                          "run the 'eval' stage first")


@pytest.mark.parametrize("removal, message", [
    ('del c["eval"]', "the config has no section config.eval; start from configs/smollm2_cpu.py"),
    ('del c.eval["limit"]', "the config has no field 'limit' that ckt_jax needs"),
])
def test_config_missing_a_section_or_field(tmp_path, removal, message):
    config = tmp_path / "partial.py"
    config.write_text(
        "from ckt_jax import config_files\n\n"
        f"_smoke = config_files.load_module({str(ROOT / 'configs' / 'smoke.py')!r})\n\n\n"
        f"def get_config():\n    c = _smoke.get_config()\n    {removal}\n    return c\n")
    result = run_main("--config", str(config), "--workdir", str(tmp_path / "w"))
    assert_one_line_error(result, message)
    assert not (tmp_path / "w").exists()


@pytest.mark.real
def test_tensor_axis_must_divide_kv_heads(tmp_path, smollm2_gguf_path):
    # Two CPU devices on one tensor axis: SmolLM2's 3 key/value heads do not split in two.
    env_flags = "--xla_force_host_platform_device_count=2"
    result = run_main("--config", "configs/smoke.py", "--workdir", str(tmp_path / "w"),
                      "--config.stages=teacher", "--config.mesh.data=1",
                      "--config.mesh.tensor=2", xla_flags=env_flags)
    assert_one_line_error(result, "config.mesh.tensor=2 does not divide num_kv_heads=3 of the "
                                  "student; set config.mesh.tensor to a divisor of 3 (1, 3)")


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


def test_xla_flag_defaults_keep_user_values():
    from ckt_jax import xla_flags

    environ = {}
    assert xla_flags.apply_defaults(environ) == " ".join(xla_flags.DEFAULT_FLAGS)
    option = xla_flags.DEFAULT_FLAGS[0].split("=")[0]
    environ = {"XLA_FLAGS": f"--xla_dump_to=/tmp/x {option}=true"}
    assert xla_flags.apply_defaults(environ) == f"--xla_dump_to=/tmp/x {option}=true"
    environ = {"XLA_FLAGS": "--xla_dump_to=/tmp/x"}
    assert xla_flags.apply_defaults(environ).split() == ["--xla_dump_to=/tmp/x",
                                                        *xla_flags.DEFAULT_FLAGS]


def test_xla_flag_file_is_left_alone():
    from ckt_jax import xla_flags

    environ = {"XLA_FLAGS": "/etc/xla_flags.txt"}
    assert xla_flags.apply_defaults(environ) == "/etc/xla_flags.txt"
    assert environ["XLA_FLAGS"] == "/etc/xla_flags.txt"
