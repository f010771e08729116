"""Multi-process start-up, the primary process, and a SIGTERM flag that every process agrees on.

A multi-host job runs one process per host (one per GPU node under SLURM, one per TPU VM worker).
`initialize` calls `jax.distributed.initialize` before any other JAX call when the config or the
environment describes such a job:

    config.distributed.coordinator_address   host:port of process 0, with num_processes and
                                             process_id (a manual launch);
    JAX_COORDINATOR_ADDRESS                  read by JAX itself;
    SLURM_NTASKS > 1 inside `srun`           JAX reads the SLURM variables;
    TPU_WORKER_HOSTNAMES with several hosts  JAX reads the TPU VM metadata.

Cloud TPU VMs do not always export `TPU_WORKER_HOSTNAMES`, so `launch/tpu_pod.sh` sets
`config.distributed.initialize=on`, which initialises with whatever JAX detects. Process 0 is the
primary process: it alone writes logs, metric files and stage outputs. Orbax coordinates the
checkpoint writes of all processes itself.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Callable

import jax
import numpy as np
from absl import logging

MODES = ("auto", "on", "off")


def environment_requests_distributed(environ=os.environ) -> str | None:
    """Return why the environment looks like a multi-process launch, or None."""
    if environ.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS is set"
    if "SLURM_STEP_NODELIST" in environ and int(environ.get("SLURM_NTASKS", "1")) > 1:
        return f"SLURM_NTASKS={environ['SLURM_NTASKS']} inside srun"
    hosts = environ.get("TPU_WORKER_HOSTNAMES", "")
    if len([h for h in hosts.split(",") if h.strip()]) > 1:
        return "TPU_WORKER_HOSTNAMES lists several hosts"
    return None


def validate_config(dist_config) -> None:
    """Reject inconsistent `config.distributed` values with a one-line ValueError."""
    if dist_config.initialize not in MODES:
        raise ValueError(f"config.distributed.initialize={dist_config.initialize!r} is unknown; "
                         f"use one of {', '.join(MODES)}")
    if dist_config.coordinator_address:
        if dist_config.num_processes < 1:
            raise ValueError(
                f"config.distributed.num_processes={dist_config.num_processes} must be >= 1 when "
                "config.distributed.coordinator_address is set")
        if not 0 <= dist_config.process_id < dist_config.num_processes:
            raise ValueError(
                f"config.distributed.process_id={dist_config.process_id} must be in [0, "
                f"{dist_config.num_processes}) when config.distributed.coordinator_address is set")


def initialize(dist_config) -> bool:
    """Start the JAX distributed runtime when the config or the environment requests it.

    Returns whether it was started. Call it before any other JAX function: afterwards the device
    list is fixed.
    """
    validate_config(dist_config)
    mode = dist_config.initialize
    reason = None
    if mode == "on":
        reason = "config.distributed.initialize=on"
    elif mode == "auto":
        if dist_config.coordinator_address:
            reason = "config.distributed.coordinator_address is set"
        else:
            reason = environment_requests_distributed()
    if reason is None:
        return False
    kwargs = {}
    if dist_config.coordinator_address:
        kwargs = dict(coordinator_address=dist_config.coordinator_address,
                      num_processes=dist_config.num_processes,
                      process_id=dist_config.process_id)
    logging.info("starting jax.distributed (%s)", reason)
    jax.distributed.initialize(**kwargs)
    logging.info("process %d of %d, %d local and %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def is_primary() -> bool:
    return jax.process_index() == 0


def agree_any(flag: bool) -> bool:
    """Return True on every process if `flag` is True on any process (a collective call)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.asarray(flag, np.int32))
    return bool(np.any(flags))


def run_on_primary(name: str, fn: Callable[[], None]) -> None:
    """Run `fn` on process 0 only; the other processes wait for it and fail if it failed."""
    if jax.process_count() == 1:
        fn()
        return
    from jax.experimental import multihost_utils
    ok = True
    try:
        if is_primary():
            fn()
    except BaseException:
        ok = False
        raise
    finally:
        # NOTE: the other processes wait here in a collective for as long as `fn` runs. A
        # runtime whose collective timeout is shorter than the stage fails at this point.
        status = multihost_utils.broadcast_one_to_all(np.asarray(ok, np.int32))
        if not is_primary() and not int(status):
            raise RuntimeError(f"{name} failed on process 0; see its log")


class StopSignal:
    """Record SIGTERM or SIGINT (Ctrl-C) so the training loop can save and stop between steps.

    Use as a context manager around the loop; the previous handlers come back on exit. The
    handler only sets a flag, and `requested()` is a collective call on multi-process runs, so
    every process stops after the same step even when the signal reaches them at different times.
    A second Ctrl-C raises KeyboardInterrupt at once, without waiting for the step to end.
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self._signals = signals
        self._previous: dict[int, object] = {}
        self._received: int | None = None

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in self._signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        else:
            logging.warning("not on the main thread: SIGTERM will not save a checkpoint")
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        del frame
        if signum == signal.SIGINT and self._received is not None:
            raise KeyboardInterrupt
        if signum == signal.SIGINT:
            logging.warning("Ctrl-C: saving a checkpoint after the current step, then stopping; "
                            "press Ctrl-C again to stop at once without saving")
        self._received = signum

    @property
    def signal_name(self) -> str:
        """Name of the signal this process received; SIGTERM when it came to another process."""
        return "SIGINT" if self._received == signal.SIGINT else "SIGTERM"

    def requested(self) -> bool:
        return agree_any(self._received is not None)
