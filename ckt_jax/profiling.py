"""Trace chosen training steps with `jax.profiler` and sum where the time went.

`config.train.profile_steps = "A:B"` traces steps A to B of every training stage into
`<workdir>/logs/<run>/profile/`, a directory that TensorBoard's profile plugin and Perfetto open.
When the trace stops, the busy time of XLA's CPU worker threads is summed by kind of operation.
A kind is the name of a fused operation without its number. So `ynn_fusion` counts every matrix
product that XLA hands to YNNPACK, and `copy_bitcast_fusion` every loop fusion that ends in a
layout copy. The sums, in thread-seconds per traced step, go to `profile/summary.json` and the
log. They count only the threads of XLA's CPU backend: on an accelerator, read the device's
kernels from the trace in TensorBoard.
"""

from __future__ import annotations

import collections
import json
import pathlib
import re

import jax
from absl import logging


def parse_steps(text: str, field: str = "config.train.profile_steps") -> tuple[int, int] | None:
    """Parse `"A:B"` (steps A to B, 1 <= A <= B) or `""` (no profile)."""
    text = str(text).strip()
    if not text:
        return None
    match = re.fullmatch(r"(\d+):(\d+)", text)
    if not match or not 1 <= int(match.group(1)) <= int(match.group(2)):
        raise ValueError(f"{field}={text!r} is invalid; use 'A:B' with 1 <= A <= B, such as "
                         "'2:4' (step 1 compiles), or '' for no profile")
    return int(match.group(1)), int(match.group(2))


def thread_seconds_by_kind(trace_dir: str | pathlib.Path, steps: int) -> tuple[dict, float]:
    """Sum the busy seconds per step of XLA's CPU worker threads by kind of operation.

    Reads the newest `*.xplane.pb` under `trace_dir`. Returns ({kind: seconds}, total), largest
    kind first, each divided by `steps`. The kinds include `SlinkyThreadPool::Await`, the time a
    thread waits inside XLA's pool for work it handed out.
    """
    planes = sorted(pathlib.Path(trace_dir).rglob("*.xplane.pb"),
                    key=lambda path: path.stat().st_mtime)
    if not planes:
        raise RuntimeError(f"jax.profiler wrote no trace under {trace_dir}")
    profile = jax.profiler.ProfileData.from_file(str(planes[-1]))
    kinds = collections.Counter()
    for plane in profile.planes:
        for line in plane.lines:
            # Thunks run on the threads of XLA's intra-op pool, named after Eigen.
            if "XLAEigen" not in line.name:
                continue
            for event in line.events:
                if event.name.startswith("ThunkExecutor"):
                    continue
                kinds[re.sub(r"\.\d+$", "", event.name)] += event.duration_ns / 1e9 / steps
    return dict(kinds.most_common()), sum(kinds.values())


class StepProfiler:
    """A trace started before step `first` and stopped after step `last` (or at `close`)."""

    def __init__(self, steps: tuple[int, int] | None, directory: str | pathlib.Path,
                 name: str = "train"):
        self.first, self.last = steps or (0, -1)
        self.directory = pathlib.Path(directory)
        self.name = name
        self.started_at: int | None = None
        self.summary: dict | None = None

    def before_step(self, step: int) -> None:
        # A run resumed inside the range traces the steps left in it.
        if self.started_at is None and self.summary is None and self.first <= step <= self.last:
            self.directory.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.directory))
            self.started_at = step

    def after_step(self, step: int) -> None:
        if self.started_at is not None and step >= self.last:
            self._stop(step)

    def close(self, step: int) -> None:
        """Stop a trace that is still running after `step`, the last step that ran."""
        if self.started_at is not None:
            self._stop(step)
        elif self.summary is None and step < self.first:
            logging.warning("%s: profile steps %d-%d start after the last step %d; nothing was "
                            "traced", self.name, self.first, self.last, step)

    def _stop(self, step: int) -> None:
        jax.profiler.stop_trace()
        steps = max(step - self.started_at + 1, 1)
        try:
            kinds, busy = thread_seconds_by_kind(self.directory, steps)
        except (OSError, RuntimeError) as error:
            # The trace stays on disk for TensorBoard; only the summary is missing.
            logging.warning("%s: no profile summary for steps %d-%d: %s", self.name,
                            self.started_at, step, error)
            self.started_at = None
            return
        self.summary = {"first_step": self.started_at, "last_step": step,
                        "busy_thread_seconds_per_step": busy, "thread_seconds_by_kind": kinds}
        self.started_at = None
        if jax.process_index() == 0:
            path = self.directory / "summary.json"
            if path.exists():
                # A resumed run traces the rest of the range; the earlier summary is kept.
                earlier = json.loads(path.read_text())
                path.rename(path.with_name(
                    f"summary-steps-{earlier['first_step']}-{earlier['last_step']}.json"))
            path.write_text(json.dumps(self.summary, indent=1))
            top = ", ".join(f"{kind} {seconds:.2f}" for kind, seconds in list(kinds.items())[:5])
            logging.info("%s: profiled steps %d-%d in %s; busy CPU thread-seconds per step "
                         "%.2f (%s)", self.name, self.summary["first_step"], step,
                         self.directory, busy, top or "no CPU thread events")
