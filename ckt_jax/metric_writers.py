"""Per-step training metrics written to TensorBoard event files and a JSON Lines log.

Each training run gets its own directory, ``<workdir>/logs/<run>/<start time>/``, containing
``metrics.jsonl`` (one JSON object per step) and the TensorBoard event file, so
``tensorboard --logdir <workdir>/logs`` shows every run, and a restarted run appears next to the
interrupted one instead of overwriting its curves. Only JAX process 0 writes.

A step's record contains every metric of the train step (each loss term ``loss/<term>``, its
weight ``weight/<term>``, the total ``loss``, gradient, update and parameter norms) plus
``learning_rate``, ``tokens`` (non-padding tokens in the batch), ``step_seconds`` and
``tokens_per_second``. Step 1 includes compilation, so its throughput is low.
"""

from __future__ import annotations

import json
import math
import pathlib
import time
from typing import Callable, Protocol

import jax
from absl import logging

JSONL_FILE = "metrics.jsonl"


class MetricWriter(Protocol):
    def write(self, step: int, scalars: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class JsonlWriter:
    """Appends one JSON object per step, flushed at once so a crash loses no finished step."""

    def __init__(self, path: pathlib.Path):
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", buffering=1)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        # JSON has no NaN or infinity, so non-finite values are written as null.
        record = {"step": step, "wall_time": time.time()}
        record.update({key: value if math.isfinite(value) else None
                       for key, value in scalars.items()})
        self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._file.close()


class TensorBoardWriter:
    """Writes scalars to a TensorBoard event file with tensorboardX (no tensorflow needed)."""

    def __init__(self, log_dir: pathlib.Path, flush_secs: int = 10):
        from tensorboardX import SummaryWriter

        self.log_dir = pathlib.Path(log_dir)
        self._writer = SummaryWriter(logdir=str(self.log_dir), flush_secs=flush_secs)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, global_step=step)

    def close(self) -> None:
        self._writer.close()


class MetricWriters:
    """Fans each step out to several writers; a context manager that closes them all."""

    def __init__(self, writers: list[MetricWriter]):
        self.writers = list(writers)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        for writer in self.writers:
            writer.write(step, scalars)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()

    def __enter__(self) -> "MetricWriters":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def open_run_writers(run_dir: pathlib.Path, *, tensorboard: bool = True,
                     jsonl: bool = True) -> MetricWriters:
    """Open the writers for one run under ``run_dir/<start time>/`` (none on processes > 0)."""
    if jax.process_index() != 0 or not (tensorboard or jsonl):
        return MetricWriters([])
    log_dir = pathlib.Path(run_dir) / time.strftime("%Y%m%d-%H%M%S")
    suffix = 1
    while log_dir.exists():  # Two runs started within one second.
        suffix += 1
        log_dir = log_dir.with_name(f"{log_dir.name.split('.')[0]}.{suffix}")
    log_dir.mkdir(parents=True)
    writers: list[MetricWriter] = []
    if jsonl:
        writers.append(JsonlWriter(log_dir / JSONL_FILE))
    if tensorboard:
        writers.append(TensorBoardWriter(log_dir))
    logging.info("writing per-step metrics to %s", log_dir)
    return MetricWriters(writers)


def training_callback(writers: MetricWriters,
                      learning_rate: Callable[[int], float] | None = None
                      ) -> Callable[[int, dict], None]:
    """Build an ``on_metrics(step, metrics)`` hook for ``train.train_loop``.

    ``metrics`` must contain ``seconds`` (since the loop started) and ``tokens``.
    ``learning_rate(step)`` is the optax schedule, which step ``s`` evaluates at count ``s - 1``.
    """
    previous_seconds = [0.0]

    def on_metrics(step: int, metrics: dict) -> None:
        scalars = {key: float(value) for key, value in metrics.items() if key != "step"}
        # `seconds` continues across resumed runs, so the first step of a run has no previous
        # value here; the loop's own `step_seconds` covers that case.
        step_seconds = scalars.get("step_seconds", scalars["seconds"] - previous_seconds[0])
        previous_seconds[0] = scalars["seconds"]
        scalars["step_seconds"] = step_seconds
        scalars["tokens_per_second"] = scalars["tokens"] / max(step_seconds, 1e-9)
        if learning_rate is not None:
            scalars["learning_rate"] = float(learning_rate(step - 1))
        writers.write(step, scalars)

    return on_metrics
