"""Multi-process start-up decisions and the SIGTERM flag, without starting a runtime."""

import os
import signal

import pytest
from ml_collections import config_dict

from ckt_jax import distributed


def dist_config(**overrides):
    config = config_dict.ConfigDict({"initialize": "auto", "coordinator_address": "",
                                     "num_processes": 0, "process_id": -1})
    config.update(overrides)
    return config


def test_environment_detection():
    cases = [
        ({}, None),
        ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, "JAX_COORDINATOR_ADDRESS is set"),
        ({"SLURM_STEP_NODELIST": "gpu[1-2]", "SLURM_NTASKS": "2"}, "SLURM_NTASKS=2 inside srun"),
        ({"SLURM_STEP_NODELIST": "gpu1", "SLURM_NTASKS": "1"}, None),
        ({"SLURM_NTASKS": "4"}, None),  # sbatch's own shell, outside srun.
        ({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}, "TPU_WORKER_HOSTNAMES lists several hosts"),
        ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),
    ]
    for environ, reason in cases:
        assert distributed.environment_requests_distributed(environ) == reason, environ


def test_config_errors():
    cases = [
        (dict(initialize="yes"), "config.distributed.initialize='yes' is unknown"),
        (dict(coordinator_address="h:1"), "config.distributed.num_processes=0 must be >= 1"),
        (dict(coordinator_address="h:1", num_processes=2, process_id=2),
         r"config.distributed.process_id=2 must be in \[0, 2\)"),
    ]
    for overrides, message in cases:
        with pytest.raises(ValueError, match=message):
            distributed.validate_config(dist_config(**overrides))
    distributed.validate_config(dist_config(coordinator_address="h:1", num_processes=2,
                                            process_id=1))


def test_single_process_is_not_initialized(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_STEP_NODELIST", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.initialize(dist_config()) is False
    assert distributed.initialize(dist_config(initialize="off",
                                              coordinator_address="h:1", num_processes=2,
                                              process_id=0)) is False


def test_stop_signal_records_sigterm():
    previous = signal.getsignal(signal.SIGTERM)
    with distributed.StopSignal() as stop:
        assert not stop.requested()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested()
    assert signal.getsignal(signal.SIGTERM) is previous
