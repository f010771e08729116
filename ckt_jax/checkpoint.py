"""Training checkpoints with orbax-checkpoint: save, keep, verify and restore a training run.

A checkpoint is one orbax step directory `<directory>/<step>/` with two items:

    state  adapter parameters, optimizer state and the run's PRNG key (sharded arrays; each
           process writes its own shards);
    meta   JSON: the step, the data-iterator position and the run identity (below).

The frozen backbone and teacher are not copied into checkpoints. The run identity records a
SHA-256 fingerprint of each, of the training examples, and the config values the stage depends
on. A restore compares the identity with the current run and stops with the first difference,
so a run never resumes on top of other weights, data or settings.

Saves are asynchronous: the device-to-host copy happens before `save` returns, and the files are
written in the background while training continues. Orbax writes a step into a temporary
`<step>.orbax-checkpoint-tmp*` directory and renames it when complete, so a process killed during
a save leaves only that temporary directory. `TrainCheckpoints` logs such directories, removes
them, and resumes from the newest complete step. The newest `keep_last` steps and the `keep_best`
steps with the best `best_metric` are kept; older ones are deleted after each save.

`metrics.jsonl` next to the step directories contains one line of training metrics per step,
written by process 0. On restore, lines after the restored step are dropped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util
from orbax.checkpoint import checkpoint_managers

from ckt_jax import workdir

TMP_MARKER = ".orbax-checkpoint-tmp"
METRICS_FILE = "metrics.jsonl"
BEST_MODES = ("min", "max")


class CheckpointMismatchError(ValueError):
    """A checkpoint was written by a run with other frozen weights, data or config."""


class CheckpointUnreadableError(ValueError):
    """No checkpoint of a run's directory could be read back."""


@dataclasses.dataclass(frozen=True)
class CheckpointOptions:
    every_steps: int = 0          # Save every this many steps; 0 saves only at the end and on stop.
    keep_last: int = 2            # Newest checkpoints kept.
    keep_best: int = 1            # Checkpoints with the best `best_metric` kept as well.
    best_metric: str = "loss"     # Training metric averaged over the steps since the last save.
    best_mode: str = "min"        # "min" or "max": which end of `best_metric` is best.
    async_save: bool = True       # Write files in the background while training continues.

    def __post_init__(self):
        if self.every_steps < 0:
            raise ValueError(f"config.checkpoint.every_steps={self.every_steps} must be >= 0 "
                             "(0 saves only at the end)")
        if self.keep_last < 1:
            raise ValueError(f"config.checkpoint.keep_last={self.keep_last} must be >= 1, so "
                             "a stopped run can resume")
        if self.keep_best < 0:
            raise ValueError(f"config.checkpoint.keep_best={self.keep_best} must be >= 0")
        if self.best_mode not in BEST_MODES:
            raise ValueError(f"config.checkpoint.best_mode={self.best_mode!r} is unknown; use "
                             "min or max")

    @classmethod
    def from_config(cls, section) -> "CheckpointOptions":
        return cls(**{field.name: section[field.name] for field in dataclasses.fields(cls)})


def tree_fingerprint(tree: Any) -> str:
    """Return a SHA-256 hex digest of every leaf's path, dtype, shape and bytes.

    Leaves are fetched to the host, so call it on single-process or replicated trees.
    """
    digest = hashlib.sha256()
    flat = traverse_util.flatten_dict(tree) if isinstance(tree, dict) else {(): tree}
    for path in sorted(flat, key=lambda p: "/".join(map(str, p))):
        value = np.ascontiguousarray(np.asarray(jax.device_get(flat[path])))
        digest.update("/".join(map(str, path)).encode())
        digest.update(f"{value.dtype.str}{value.shape}".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def first_difference(stored: Any, current: Any) -> str | None:
    """Describe the first differing flattened key (`key: checkpoint A, now B`), or None."""
    old = workdir.flatten_record(json.loads(json.dumps(stored)))
    new = workdir.flatten_record(json.loads(json.dumps(current)))
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            return f"{key}: checkpoint {old.get(key)!r}, now {new.get(key)!r}"
    return None


def half_written_steps(directory: pathlib.Path) -> list[pathlib.Path]:
    """Return the temporary directories of saves that never finished."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if TMP_MARKER in p.name)


class TrainCheckpoints:
    """Save and restore one training run's checkpoints in `directory`.

    Create it on every process: orbax saves and restores are collective. `identity` is the JSON
    record that a restored checkpoint must match (fingerprints and config values).
    """

    def __init__(self, directory: str | os.PathLike, options: CheckpointOptions,
                 identity: dict, *, primary: bool | None = None):
        self.directory = pathlib.Path(directory).resolve()
        self.options = options
        self.identity = identity
        self.primary = jax.process_index() == 0 if primary is None else primary
        for path in half_written_steps(self.directory):
            logging.warning("skipping half-written checkpoint %s (its save never finished); "
                            "removing it", path)
        policies = [checkpoint_managers.LatestN(n=options.keep_last)]
        if options.keep_best:
            metric = options.best_metric
            policies.append(checkpoint_managers.BestN(
                get_metric_fn=lambda metrics: metrics[metric],
                # BestN keeps the end of an ascending sort; reverse it when lower is better.
                reverse=options.best_mode == "min", n=options.keep_best,
                keep_checkpoints_without_metrics=False))
        manager_options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=options.async_save,
            preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
            cleanup_tmp_directories=True,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=manager_options,
                                             item_names=("state", "meta"))
        self._metric_sum = 0.0
        self._metric_count = 0
        self.last_saved_step: int | None = self.manager.latest_step()

    # ---- saving --------------------------------------------------------------------------

    def record_metrics(self, step: int, metrics: dict) -> None:
        """Add one step's metrics: the best-metric average and a line of metrics.jsonl."""
        value = metrics.get(self.options.best_metric)
        if value is not None and math.isfinite(value):
            self._metric_sum += value
            self._metric_count += 1
        if self.primary:
            with (self.directory / METRICS_FILE).open("a") as f:
                f.write(json.dumps({**metrics, "step": step}) + "\n")

    def due(self, step: int) -> bool:
        every = self.options.every_steps
        return bool(every) and step % every == 0

    def save(self, step: int, state: dict, data_position: int) -> None:
        """Start saving `state` (adapter_params, opt_state, rng) as `step`; returns at once."""
        if step == self.last_saved_step:
            return
        meta = {"step": step, "data_position": data_position, "identity": self.identity}
        metrics = None
        if self._metric_count:
            metrics = {self.options.best_metric: self._metric_sum / self._metric_count}
        self._metric_sum, self._metric_count = 0.0, 0
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            metrics=metrics, force=True)
        self.last_saved_step = step
        logging.info("checkpoint: saving step %d into %s", step, self.directory)

    def wait(self) -> None:
        """Block until every started save is complete on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    # ---- restoring -----------------------------------------------------------------------

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def steps_newest_first(self) -> list[int]:
        return sorted(self.manager.all_steps(), reverse=True)

    def restore_newest_readable(self, abstract_state: dict) -> tuple[dict, dict] | None:
        """Restore the newest checkpoint that reads back; None when there is no checkpoint.

        A damaged checkpoint (a deleted or overwritten file) is skipped with a warning and the
        next older one is tried. Raises CheckpointUnreadableError when none reads back, and
        CheckpointMismatchError when one belongs to another run.
        """
        steps = self.steps_newest_first()
        damaged = []
        for step in steps:
            try:
                restored = self.restore(step, abstract_state)
            except CheckpointMismatchError:
                raise
            except Exception as err:  # noqa: BLE001 - orbax and TensorStore raise many types.
                logging.warning("checkpoint %s is unreadable (%s); trying an older one",
                                self.directory / str(step), workdir.error_summary(err))
                damaged.append(step)
                continue
            # Training goes on from `step` and saves the damaged steps again, which the
            # manager refuses while they exist.
            for bad in damaged:
                logging.warning("removing damaged checkpoint %s", self.directory / str(bad))
                self.manager.delete(bad)
            self.last_saved_step = self.manager.latest_step()
            return restored
        if not steps:
            return None
        raise CheckpointUnreadableError(
            f"no checkpoint in {self.directory} reads back (steps {', '.join(map(str, steps))} "
            f"are damaged); delete {self.directory} to restart this training stage from step 1")

    def restore(self, step: int, abstract_state: dict) -> tuple[dict, dict]:
        """Restore `step` onto the shardings of `abstract_state` (a tree of ShapeDtypeStructs).

        The shardings may differ from those the checkpoint was saved with (another mesh).
        Returns (state, meta); raises CheckpointMismatchError when the identity differs.
        """
        meta = self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"]
        difference = first_difference(meta["identity"], self.identity)
        if difference is not None:
            raise CheckpointMismatchError(
                f"checkpoint {self.directory / str(step)} belongs to another run ({difference}); "
                f"restore the original weights and config, or delete {self.directory} to start "
                "over")
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))
        return restored["state"], meta

    def read_metrics(self, up_to_step: int) -> list[dict]:
        """Return metrics.jsonl rows for steps 1..up_to_step, and cut the file after them.

        A process killed while writing leaves a partial last line, which is dropped.
        """
        path = self.directory / METRICS_FILE
        rows: dict[int, dict] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if row.get("step", 0) <= up_to_step:
                    rows[row["step"]] = row
        history = [rows[step] for step in sorted(rows)]
        missing = sorted(set(range(1, up_to_step + 1)) - set(rows))
        if missing:
            logging.warning("checkpoint: %s lacks metrics of %d steps (first %d)", path,
                            len(missing), missing[0])
        if self.primary:
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(row) + "\n" for row in history))
            os.replace(tmp, path)
        return history


def abstract_like(tree: Any) -> Any:
    """Return ShapeDtypeStructs with the shape, dtype and sharding of each array of `tree`."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
