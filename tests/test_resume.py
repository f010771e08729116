"""Pre-emption: kill -9 at several moments and SIGTERM, then resume bit for bit.

Every run is a subprocess of `tests/tiny_training.py` on one CPU device: 8 steps, an
asynchronous checkpoint every 2 steps. The reference is the same run without interruption.
"""

import json
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import tiny_training
from ckt_jax import batching, checkpoint, sharding

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "tiny_training.py"
STEPS = 8


def command(out: pathlib.Path, checkpoint_dir: pathlib.Path, *extra: str) -> list[str]:
    return [sys.executable, str(SCRIPT), "--out", str(out), "--steps", str(STEPS),
            "--checkpoint-dir", str(checkpoint_dir), "--every", "2", *extra]


def run_to_end(env, out, checkpoint_dir, *extra) -> subprocess.CompletedProcess:
    result = subprocess.run(command(out, checkpoint_dir, *extra), cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def kill_when(env, out, checkpoint_dir, line: str, delay: float, *extra) -> str:
    """Start a run, SIGKILL it `delay` seconds after it prints `line`; return its log."""
    log_path = out.parent / f"log-{time.monotonic_ns()}.txt"
    with log_path.open("w") as log:
        process = subprocess.Popen(command(out, checkpoint_dir, "--print-steps", *extra),
                                   cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log,
                                   text=True)
        seen = []
        try:
            for text in process.stdout:
                seen.append(text.strip())
                if text.strip() == line:
                    time.sleep(delay)
                    process.send_signal(signal.SIGKILL)
                    break
        finally:
            process.wait(timeout=600)
    assert process.returncode == -signal.SIGKILL, (line, seen)
    return log_path.read_text()


def read_results(out: pathlib.Path) -> tuple[list[dict], dict]:
    history = json.loads((out / "losses.json").read_text())
    with np.load(out / "adapters.npz") as adapters:
        return history, {k: adapters[k] for k in adapters.files}


def assert_same_run(out: pathlib.Path, reference: tuple[list[dict], dict]) -> None:
    history, adapters = read_results(out)
    ref_history, ref_adapters = reference
    assert [row["step"] for row in history] == list(range(1, STEPS + 1))
    for row, ref_row in zip(history, ref_history):
        for key in ("loss", "grad_norm", "param_norm"):
            assert row[key] == ref_row[key], (row["step"], key)
    assert set(adapters) == set(ref_adapters)
    for path, value in adapters.items():
        assert np.array_equal(value, ref_adapters[path]), path


@pytest.fixture(scope="module")
def reference(subprocess_env, tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    run_to_end(subprocess_env, root / "out", root / "checkpoints")
    return root


def test_kill_and_resume_bitwise(reference, subprocess_env, tmp_path):
    out, checkpoint_dir = tmp_path / "out", tmp_path / "checkpoints"
    rng = random.Random(4)

    # 1. SIGKILL inside the save of step 4, before orbax renames its temporary directory.
    process = subprocess.run(command(out, checkpoint_dir, "--kill-after-save", "4"), cwd=ROOT,
                             env=subprocess_env, capture_output=True, text=True, timeout=600)
    assert process.returncode == -signal.SIGKILL, process.stderr[-4000:]
    assert (checkpoint_dir / "4.orbax-checkpoint-tmp").is_dir()

    # 2. Restart: it skips the half-written step 4 and resumes from step 2. SIGKILL at a random
    # moment after step 5 (each step first sleeps 0.2 s, so the kill lands inside the run).
    log = kill_when(subprocess_env, out, checkpoint_dir, "step 5", rng.uniform(0.0, 0.2),
                    "--sleep-per-step", "0.2")
    assert "skipping half-written checkpoint" in log
    assert "resumed from checkpoint step 2 of 8" in log

    # 3. Restart twice more: SIGKILL right after the save of step 6 starts, then at a random
    # moment after step 7. Which step each restart resumes from depends on how far the
    # asynchronous saves got, so only the final results are compared.
    log = kill_when(subprocess_env, out, checkpoint_dir, "saving 6", 0.0)
    assert "resumed from checkpoint step" in log
    log = kill_when(subprocess_env, out, checkpoint_dir, "step 7", rng.uniform(0.0, 0.2),
                    "--sleep-per-step", "0.2")
    assert "resumed from checkpoint step" in log

    # 4. Restart and finish.
    result = run_to_end(subprocess_env, out, checkpoint_dir)
    assert "resumed from checkpoint step" in result.stderr
    assert_same_run(out, read_results(reference / "out"))
    assert not checkpoint.half_written_steps(checkpoint_dir)


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)],
                         ids=["SIGTERM", "SIGINT"])
def test_signal_saves_step_in_progress(reference, subprocess_env, tmp_path, signum, status):
    out, checkpoint_dir = tmp_path / "out", tmp_path / "checkpoints"
    # No periodic saves: the only checkpoint before the end comes from the signal.
    process = subprocess.Popen(
        command(out, checkpoint_dir, "--every", "100", "--print-steps", "--sleep-per-step", "0.2"),
        cwd=ROOT, env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    steps = []
    for text in process.stdout:
        if text.startswith("step "):
            steps.append(int(text.split()[1]))
            if steps[-1] == 3:
                process.send_signal(signum)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == status, stderr[-4000:]
    last = steps[-1]
    assert last >= 3
    assert f"stopped by {signal.Signals(signum).name} after step {last}" in stderr

    # The step in progress is saved completely: orbax lists it, and it restores.
    assert not checkpoint.half_written_steps(checkpoint_dir)
    ckpt = checkpoint.TrainCheckpoints(checkpoint_dir, checkpoint.CheckpointOptions(), {})
    try:
        assert ckpt.latest_step() == last
        meta = ckpt.manager.restore(last, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"]
    finally:
        ckpt.close()
    assert meta["step"] == last
    assert meta["data_position"] == last

    result = run_to_end(subprocess_env, out, checkpoint_dir)
    assert f"resumed from checkpoint step {last} of {STEPS}" in result.stderr
    assert_same_run(out, read_results(reference / "out"))


@pytest.fixture(scope="module")
def tiny_setup():
    return tiny_training.build(seed=0, steps=STEPS)


def test_restore_rejects_other_teacher(reference, tiny_setup, tmp_path):
    checkpoint_dir = tmp_path / "checkpoints"
    shutil.copytree(reference / "checkpoints", checkpoint_dir)
    setup = dict(tiny_setup)
    teacher = dict(setup["frozen"]["teacher"])
    teacher["final_norm"] = {"scale": teacher["final_norm"]["scale"] * 2}
    setup["frozen"] = {**setup["frozen"], "teacher": teacher}
    with pytest.raises(checkpoint.CheckpointMismatchError, match=r"frozen\.teacher: checkpoint"):
        tiny_training.run(setup, sharding.make_mesh(), checkpoint_dir=checkpoint_dir)


def test_restore_rejects_other_examples(reference, tiny_setup, tmp_path):
    checkpoint_dir = tmp_path / "checkpoints"
    shutil.copytree(reference / "checkpoints", checkpoint_dir)
    setup = dict(tiny_setup)
    setup["examples"] = setup["examples"][:-2]
    fingerprint = batching.examples_fingerprint(setup["examples"])
    with pytest.raises(checkpoint.CheckpointMismatchError, match=f"now '{fingerprint}'"):
        tiny_training.run(setup, sharding.make_mesh(), checkpoint_dir=checkpoint_dir)


def test_damaged_newest_checkpoint_falls_back(tmp_path):
    # Files of the newest checkpoint overwritten with garbage: the older one is restored, and
    # when every checkpoint is damaged the error names the directory and the fix.
    state = {"adapter_params": {"w": jnp.arange(4.0)}, "opt_state": {"m": jnp.zeros(2)},
             "rng": jnp.zeros(2, jnp.uint32)}
    options = checkpoint.CheckpointOptions(async_save=False, keep_last=3)
    ckpt = checkpoint.TrainCheckpoints(tmp_path / "ckpt", options, {"run": "a"})
    try:
        for step in (1, 2):
            ckpt.save(step, jax.tree.map(lambda x, s=step: x + s, state), data_position=step)
        ckpt.wait()
    finally:
        ckpt.close()

    def damage(step):
        for path in (tmp_path / "ckpt" / str(step)).rglob("*"):
            if path.is_file():
                path.write_bytes(b"not a checkpoint")

    abstract = checkpoint.abstract_like(state)
    damage(2)
    ckpt = checkpoint.TrainCheckpoints(tmp_path / "ckpt", options, {"run": "a"})
    try:
        restored, meta = ckpt.restore_newest_readable(abstract)
        assert meta["step"] == 1
        np.testing.assert_array_equal(np.asarray(restored["adapter_params"]["w"]),
                                      np.arange(4.0) + 1)
        # The damaged step is gone, so training from step 1 can save step 2 again.
        assert not (tmp_path / "ckpt" / "2").exists()
        assert ckpt.latest_step() == 1
        ckpt.save(2, jax.tree.map(lambda x: x + 20, state), data_position=2)
        ckpt.wait()
        restored, meta = ckpt.restore_newest_readable(abstract)
        assert meta["step"] == 2
        np.testing.assert_array_equal(np.asarray(restored["adapter_params"]["w"]),
                                      np.arange(4.0) + 20)
        damage(2)
        damage(1)
        with pytest.raises(checkpoint.CheckpointUnreadableError, match="steps 2, 1 are damaged"):
            ckpt.restore_newest_readable(abstract)
    finally:
        ckpt.close()
