"""The benchmark scripts under bench/, run as subprocesses on tiny random models."""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN_STEP = ROOT / "bench" / "train_step.py"
ACCELERATOR = ROOT / "bench" / "accelerator.py"
OBJECTIVES = ("ce_lora", "kd", "ckt")
# float32 only: the torch.compile variant alone takes minutes to compile on 2 cores.
TINY_ARGS = ["--model", "tiny", "--steps", "1", "--warmup", "1", "--precisions", "float32",
             "--matmul-size", "64", "--matmul-repeats", "1"]


def run_script(script, args, env, timeout=300):
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_report(peft_available, subprocess_env, tmp_path_factory):
    """The JSON report of one tiny run over all three objectives."""
    out = tmp_path_factory.mktemp("bench") / "train_step.json"
    result = run_script(TRAIN_STEP, [*TINY_ARGS, "--json", str(out)], subprocess_env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out.read_text()), result.stdout


def test_train_step_report_keys(tiny_report):
    report, _ = tiny_report
    assert set(report) >= {"objectives", "peaks", "hardware", "settings"}
    assert set(report["objectives"]) == set(OBJECTIVES)
    assert set(report["peaks"]) == {"numpy_float32", "jax_float32", "jax_bfloat16",
                                    "jax_bfloat16_out", "torch_float32", "torch_bfloat16"}
    for name in OBJECTIVES:
        result = report["objectives"][name]
        for key in ("jax_s_per_step", "torch_best_s_per_step", "torch_best_variant", "ratio",
                    "ratio_fp32", "variants", "check", "flops_per_step"):
            assert key in result, (name, key)
        assert set(result["variants"]) == {"jax_float32", "torch_float32"}
        assert result["torch_best_variant"] == "float32"
        assert result["ratio"] == pytest.approx(
            result["torch_best_s_per_step"] / result["jax_s_per_step"])
        for variant in result["variants"].values():
            assert variant["s_per_step"] > 0
            assert variant["peak_rss_mib"] > 0


@pytest.mark.parametrize("name", OBJECTIVES)
def test_train_step_first_losses_agree(tiny_report, name):
    check = tiny_report[0]["objectives"][name]["check"]
    assert check["precision"] == "float32"
    assert check["relative_difference"] <= 1e-3, check
    for term, values in check["terms"].items():
        assert values["torch"] == pytest.approx(values["jax"], rel=1e-3, abs=1e-6), term


def test_train_step_ckt_has_every_term(tiny_report):
    terms = tiny_report[0]["objectives"]["ckt"]["check"]["terms"]
    assert set(terms) == {"kd", "contrastive", "consistency", "l2"}


def test_train_step_prints_table(tiny_report):
    _, stdout = tiny_report
    assert "loss check (float32)" in stdout
    assert "PyTorch / ckt_jax time ratio" in stdout


def test_train_step_bad_objective_one_line(subprocess_env):
    result = run_script(TRAIN_STEP, ["--objectives", "ce_lora,sft"], subprocess_env, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "'ce_lora,sft'" in lines[0]
    assert "ce_lora,kd,ckt" in lines[0]


def test_train_step_unwritable_json_fails_before_any_work(subprocess_env):
    result = run_script(TRAIN_STEP, ["--json", "/proc/x.json"], subprocess_env, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "train_step.py: --json='/proc/x.json' is not writable (No such file or "
        "directory); pass a writable path"]


def test_train_step_missing_torch_one_line(subprocess_env):
    # Hide torch from the import system, as in an environment without the test extras.
    code = ("import runpy, sys; sys.modules['torch'] = None; "
            f"sys.argv = [{str(TRAIN_STEP)!r}, '--model', 'tiny']; "
            f"runpy.run_path({str(TRAIN_STEP)!r}, run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=subprocess_env, cwd=ROOT, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "torch" in lines[0]
    assert "bash launch/setup.sh test" in lines[0]


def test_accelerator_tiny_report(subprocess_env, tmp_path):
    # Without --json the report goes to $OUT/accelerator.json.
    env = dict(subprocess_env, OUT=str(tmp_path))
    result = run_script(ACCELERATOR, ["--tiny", "--steps", "1", "--warmup", "1"], env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "accelerator.json").read_text())
    assert report["device"]["platform"] == "cpu"
    assert report["model"]["parameters"] > 0
    assert [row["batch_size"] for row in report["results"]] == [2, 4]
    for row in report["results"]:
        assert row["tokens_per_s"] > 0
        assert 0 < row["mfu"] < 1
        assert row["flops_per_step"] > 0


PROFILE_STEP = ROOT / "bench" / "profile_step.py"
PROFILE_TINY = ["--model", "tiny", "--batch", "2", "--seq-len", "32", "--steps", "1",
                "--warmup", "1"]


def test_profile_step_time_mode(subprocess_env, tmp_path):
    out = tmp_path / "profile.json"
    result = run_script(PROFILE_STEP, [*PROFILE_TINY, "--objective", "ckt", "--json", str(out)],
                        subprocess_env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["seconds_per_step"] > 0
    assert report["busy_thread_seconds_per_step"] == pytest.approx(
        sum(report["thread_seconds_by_kind"].values()))
    # bfloat16 by default: every product of the step keeps bfloat16 operands except the
    # adapters' weight gradients, whose operands XLA converts.
    products = report["products_by_operand_types"]
    assert products.get("bf16 x bf16", 0) > products.get("f32 x f32", 0) > 0
    assert "busy thread-seconds per step" in result.stdout


def test_profile_step_memory_mode_keeps_the_loss(subprocess_env, tmp_path):
    out = tmp_path / "memory.json"
    result = run_script(PROFILE_STEP, [*PROFILE_TINY, "--memory", "--objective", "ckt",
                                       "--precision", "float32", "--chunk-sizes", "0,8",
                                       "--remats", "none,full", "--json", str(out)],
                        subprocess_env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["vocab_chunk_size"], r["remat"]) for r in rows] == [
        (0, "none"), (0, "full"), (8, "none"), (8, "full")]
    # Chunks and recomputation change memory, not the first step's loss.
    for row in rows:
        assert row["temp_bytes"] > 0
        assert row["peak_rss_bytes"] > 0
        assert row["loss"] == pytest.approx(rows[0]["loss"], rel=1e-5)
    # Full recomputation keeps fewer activations than none.
    assert rows[1]["temp_bytes"] < rows[0]["temp_bytes"]


def test_profile_step_cache_mode_matches_the_live_teacher(subprocess_env, tmp_path):
    out = tmp_path / "cache.json"
    # k = the tiny vocabulary: the cache stores the whole teacher distribution, so the kd loss
    # from it equals the live one.
    result = run_script(PROFILE_STEP, [*PROFILE_TINY, "--teacher-cache", "256", "--objective",
                                       "kd", "--precision", "float32", "--json", str(out)],
                        subprocess_env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    live, cached = report["rows"]
    assert (live["teacher"], cached["teacher"]) == ("live", "top:256")
    assert cached["loss"] == pytest.approx(live["loss"], rel=1e-5)
    # Without a teacher forward the teacher's weights are no longer step arguments.
    assert cached["argument_bytes"] < live["argument_bytes"]
    assert report["step_time_cut"] == pytest.approx(1 - cached["seconds"] / live["seconds"])
    assert "with the cache" in result.stdout


def test_profile_step_cache_k_above_vocabulary(subprocess_env):
    result = run_script(PROFILE_STEP, [*PROFILE_TINY, "--teacher-cache", "257", "--objective",
                                       "kd"], subprocess_env)
    assert result.returncode == 2
    assert "--teacher-cache=257 exceeds the model's vocabulary of 256 tokens" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args, fragment", [
    (["--teacher-cache", "8", "--objective", "ce_lora"], "has no kd term"),
    (["--teacher-cache", "8", "--memory"], "separate modes"),
    (["--teacher-cache", "-1"], "--teacher-cache=-1 is invalid"),
    (["--remats", "full"], "--remats applies only to memory mode"),
    (["--chunk-sizes", "a,16"], "'a,16' is not a comma-separated list of integers"),
    (["--chunk-sizes", "1,,2"], "'1,,2' is not a comma-separated list of integers"),
    (["--remats", "full,"], "unknown policies ['']"),
    (["--json", "/proc/no/such.json"], "is not writable"),
    (["--json", "/proc/x.json"], "is not writable"),
    (["--json", "/tmp"], "is a directory"),
    (["--teacher-cache", "0"], "--teacher-cache=0 is invalid"),
    (["--teacher-cache", "8", "--hlo", "/tmp/x.hlo"], "--hlo applies only to time mode"),
    (["--remats", "none,most"], "unknown policies ['most']"),
    (["--steps", "0"], "--steps=0 is invalid"),
    (["--seq-len", "1"], "--seq-len=1 is invalid; pass a number >= 2"),
])
def test_profile_step_bad_options_one_line(subprocess_env, args, fragment):
    result = run_script(PROFILE_STEP, args, subprocess_env)
    assert result.returncode == 2
    assert fragment in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args, fragment", [
    (["--json", "/tmp"], "is a directory"),
    (["--json", "{file}/x.json"], "is a file, not a directory"),
    (["--peak-tflops", "0"], "--peak-tflops=0.0 is invalid"),
    (["--peak-tflops", "-5"], "--peak-tflops=-5.0 is invalid"),
    (["--peak-tflops", "inf"], "--peak-tflops=inf is invalid"),
    (["--time-budget", "0"], "--time-budget=0.0 is invalid"),
    (["--seq-len", "1"], "--seq-len=1 is invalid; pass an integer >= 2"),
])
def test_accelerator_bad_options_one_line(subprocess_env, tmp_path, args, fragment):
    blocking = tmp_path / "a_file"
    blocking.write_text("")
    args = [arg.format(file=blocking) for arg in args]
    result = run_script(ACCELERATOR, ["--tiny", *args], subprocess_env, timeout=60)
    assert result.returncode == 2
    assert fragment in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
