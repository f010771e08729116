"""The launchers' --dry-run output: the exact gcloud, sbatch/srun and local command lines."""

import pathlib
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]


def dry_run(script: str, *args: str) -> list[str]:
    result = subprocess.run(["bash", f"launch/{script}", *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_tpu_pod_dry_run():
    lines = dry_run("tpu_pod.sh", "--tpu", "v5e-32", "--zone", "us-west4-a", "--project",
                    "my-project", "--dry-run", "configs/smollm2_cpu.py", "/mnt/shared/runs/a",
                    "--config.mesh.fsdp=4")
    assert lines == [
        f"git -C {ROOT} archive --format=tar.gz --output=/tmp/ckt_jax-v5e-32.tar.gz HEAD",
        "gcloud compute tpus tpu-vm scp /tmp/ckt_jax-v5e-32.tar.gz v5e-32:ckt_jax.tar.gz "
        "--worker=all --zone=us-west4-a --project=my-project",
        "gcloud compute tpus tpu-vm ssh v5e-32 --worker=all --zone=us-west4-a "
        "--project=my-project '--command=mkdir -p ckt_jax && tar -xzf ckt_jax.tar.gz -C ckt_jax "
        "&& cd ckt_jax && bash launch/setup.sh tpu && env JAX_PLATFORMS=tpu .venv/bin/python -m "
        "ckt_jax.main --config configs/smollm2_cpu.py --workdir /mnt/shared/runs/a "
        "--config.distributed.initialize=on --config.mesh.fsdp=4'",
    ]


def test_slurm_gpu_dry_run():
    lines = dry_run("slurm_gpu.sh", "--nodes", "4", "--gpus-per-node", "8", "--time",
                    "02:00:00", "--partition", "gpu", "--dry-run", "configs/smollm2_cpu.py",
                    "/shared/runs/a", "--config.mesh.fsdp=8")
    assert lines == [
        "sbatch --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 --time=02:00:00 "
        f"--job-name=ckt_jax --chdir={ROOT} --output=slurm-ckt_jax-%j.out --signal=TERM@120 "
        "--requeue --partition=gpu launch/slurm_gpu.sh --in-job configs/smollm2_cpu.py "
        "/shared/runs/a --config.mesh.fsdp=8",
        "# inside the allocation, on the first node:",
        "bash launch/setup.sh cuda12",
        "srun --ntasks-per-node=1 --kill-on-bad-exit=1 env JAX_PLATFORMS=cuda .venv/bin/python "
        "-m ckt_jax.main --config configs/smollm2_cpu.py --workdir /shared/runs/a "
        "--config.mesh.fsdp=8",
    ]


def test_local_dry_run_quotes_arguments():
    lines = dry_run("local.sh", "--dry-run", "configs/smoke.py", "/tmp/smoke run",
                    "--config.student_name=it's")
    assert lines == [
        "bash launch/setup.sh",
        "env JAX_PLATFORMS=cpu .venv/bin/python -m ckt_jax.main --config configs/smoke.py "
        "--workdir '/tmp/smoke run' '--config.student_name=it'\\''s'",
    ]


def test_launcher_usage_errors():
    for script, args in (("tpu_pod.sh", ["--zone", "z", "configs/smoke.py", "runs/x"]),
                         ("slurm_gpu.sh", ["--dry-run", "configs/smoke.py"]),
                         ("tpu_pod.sh", ["--tpu", "t", "--zone", "z", "--bogus", "a", "b"])):
        result = subprocess.run(["bash", f"launch/{script}", *args], cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, (script, args)
        assert "usage: bash launch/" in result.stderr


def test_dry_run_flag_anywhere():
    # A --dry-run after CONFIG WORKDIR must still only print, never launch.
    before = dry_run("tpu_pod.sh", "--tpu", "t", "--zone", "z", "--dry-run", "configs/smoke.py",
                     "/mnt/shared/x", "--config.seed=1")
    after = dry_run("tpu_pod.sh", "--tpu", "t", "--zone", "z", "configs/smoke.py",
                    "/mnt/shared/x", "--config.seed=1", "--dry-run")
    assert after == before
    assert dry_run("slurm_gpu.sh", "configs/smoke.py", "/mnt/shared/x", "--dry-run")[0].startswith(
        "sbatch ")
    assert dry_run("local.sh", "configs/smoke.py", "runs/x", "--dry-run")[0] == (
        "bash launch/setup.sh")


def test_launcher_option_values_checked():
    cases = ((["--nodes"], "option --nodes needs a value"),
             (["--nodes", "abc", "c", "w", "--dry-run"], "--nodes must be a positive integer"),
             (["--gpus-per-node", "0", "c", "w", "--dry-run"],
              "--gpus-per-node must be a positive integer"),
             (["--time", "soon", "c", "w", "--dry-run"], "--time must be a SLURM time"),
             (["--time", "1:00", "c", "w", "--dry-run"], "--time 1:00 is under 10 minutes"),
             (["--time", "0-00:09:59", "c", "w", "--dry-run"],
              "--time 0-00:09:59 is under 10 minutes"))
    for args, message in cases:
        result = subprocess.run(["bash", "launch/slurm_gpu.sh", *args], cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, args
        assert message in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_cluster_launchers_check_arguments_locally():
    # Each mistake fails on this machine, before anything is queued or copied.
    cases = ((["configs/no_such.py", "/mnt/shared/x"], "config file configs/no_such.py not found"),
             (["configs/smoke.py", "runs/x"], "WORKDIR runs/x is a relative path"),
             (["configs/smoke.py:full", "/mnt/shared/x"],
              "config file 'configs/smoke.py' takes no argument"),
             (["configs/smoke.py", "/mnt/shared/x", "--config.distill.kd_weight=nan"],
              "config.distill.kd_weight=nan is not a finite number"),
             (["configs/smoke.py", "/mnt/shared/x", "stray"], "unexpected arguments ['stray']"),
             (["configs/smoke.py", "/mnt/shared/x", "--config.distill.stepz=1"],
              "unknown config field 'distill.stepz'"))
    for script, options in (("slurm_gpu.sh", []), ("tpu_pod.sh", ["--tpu", "t", "--zone", "z"])):
        for args, message in cases:
            result = subprocess.run(["bash", f"launch/{script}", *options, "--dry-run", *args],
                                    cwd=ROOT, capture_output=True, text=True, timeout=120)
            assert result.returncode == 2, (script, args, result.stdout)
            assert result.stderr.startswith(f"{script}: {message}"), (script, result.stderr)
            assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_cluster_launchers_accept_a_config_argument():
    # FILE:full selects a study's accelerator size, the size these launchers are for.
    for script, options in (("slurm_gpu.sh", []), ("tpu_pod.sh", ["--tpu", "t", "--zone", "z"])):
        lines = dry_run(script, *options, "--dry-run", "configs/studies/kd_weight.py:full",
                        "/mnt/shared/x")
        assert any("configs/studies/kd_weight.py:full" in line for line in lines), lines
