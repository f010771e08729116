"""One training run on a device mesh: placement, restore, the loop, checkpoints and SIGTERM.

`run_training` is what the teacher and distill stages call, and what the multi-device and
resume tests call with a tiny model:

    1. shardings from the partition rules; frozen and adapter trees placed on the mesh;
    2. the optimizer state initialised directly into its shardings;
    3. the newest complete checkpoint restored (onto this mesh, whatever mesh wrote it), with
       its data position, PRNG key and the metrics of the steps before it;
    4. the sharded train step, and the loop with checkpoints and the SIGTERM flag;
    5. the last step saved, and the adapters returned (sharded) with every step's metrics.

Every process calls it with the same arguments; each one pads only its own rows of a batch.
"""

from __future__ import annotations

import pathlib
from typing import Any, Callable

import jax
import optax
from absl import logging
from jax.sharding import Mesh

from ckt_jax import batching, checkpoint, distributed
from ckt_jax import sharding as sharding_lib
from ckt_jax.objective import LossFn
from ckt_jax.profiling import StepProfiler
from ckt_jax.throughput import Throughput
from ckt_jax.train import StepShardings, make_train_step, opt_state_shardings, train_loop


def run_training(
    *,
    name: str,
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    adapter_params: Any,
    frozen_params: Any,
    batches: batching.BatchStream,
    batch_size: int,
    num_steps: int,
    rng: jax.Array,
    mesh: Mesh,
    accumulation_steps: int = 1,
    checkpoint_dir: str | pathlib.Path | None = None,
    checkpoint_options: checkpoint.CheckpointOptions | None = None,
    identity: dict | None = None,
    log_every: int = 10,
    flops_per_step: Callable[[tuple], float] | None = None,
    peak_flops_per_device: float = 0.0,
    on_metrics: Callable[[int, dict], None] | None = None,
    profiler: StepProfiler | None = None,
) -> tuple[Any, list[dict]]:
    """Train adapters for `num_steps` steps, resuming from `checkpoint_dir` when it has a step.

    `adapter_params` and `frozen_params` hold the same full values on every process. `identity`
    is stored in every checkpoint and must match on restore; fingerprints of the frozen trees
    are added to it here. `on_metrics(step, metrics)` is called after every step, and
    `profiler` traces the steps it names. Returns (adapter_params, metrics of steps
    1..num_steps).
    """
    sharding_lib.check_batch_fits_mesh(batch_size, mesh, accumulation_steps)
    packed_rows = getattr(batches, "pack_rows", 0)
    if packed_rows:
        sharding_lib.check_batch_fits_mesh(packed_rows, mesh, field="train.pack_rows")
        if accumulation_steps > 1:
            # Micro-batches split every array by rows, which breaks the example-to-row map.
            raise ValueError(f"config.train.pack_rows={packed_rows} cannot be combined with "
                             f"config.train.grad_accum_steps={accumulation_steps}; set one of "
                             "them off (0 or 1)")
    adapter_shardings = sharding_lib.param_shardings(adapter_params, mesh)
    frozen_shardings = sharding_lib.param_shardings(frozen_params, mesh)
    shardings = StepShardings(
        mesh=mesh, adapter=adapter_shardings, frozen=frozen_shardings,
        opt_state=opt_state_shardings(optimizer, adapter_params, adapter_shardings, mesh))

    checkpoints = None
    if checkpoint_dir is not None:
        identity = dict(identity or {})
        identity["frozen"] = {key: checkpoint.tree_fingerprint(tree)
                              for key, tree in sorted(frozen_params.items())}
        checkpoints = checkpoint.TrainCheckpoints(
            checkpoint_dir, checkpoint_options or checkpoint.CheckpointOptions(), identity)

    # From here on SIGTERM only sets a flag, and the loop saves and stops after the current step.
    try:
        with distributed.StopSignal() as stop_signal:
            adapter_params, opt_state, frozen_params, rng, start_step, history = _initial_state(
                name, adapter_params, frozen_params, rng, optimizer, shardings, batches,
                checkpoints, num_steps)
            placer = sharding_lib.BatchPlacer(mesh, batch_size, packed_rows)
            batches.rows = placer.rows
            step_fn = make_train_step(loss_fn, optimizer, accumulation_steps=accumulation_steps,
                                      shardings=shardings)
            throughput = Throughput(flops_per_step, peak_flops_per_device, num_devices=mesh.size)
            logging.info("%s: mesh %s over %d processes, %d rows of each batch of %d on this "
                         "process", name, sharding_lib.describe(mesh), jax.process_count(),
                         len(placer.rows), batch_size)
            adapter_params, opt_state, history = train_loop(
                step_fn=step_fn, adapter_params=adapter_params, opt_state=opt_state,
                frozen_params=frozen_params, batches=batches, num_steps=num_steps, rng=rng,
                log_every=log_every, name=name, start_step=start_step, history=history,
                place_batch=placer, checkpoints=checkpoints, stop_signal=stop_signal,
                throughput=throughput, on_metrics=on_metrics, profiler=profiler)
    finally:
        if checkpoints is not None:
            checkpoints.close()
    return adapter_params, history


def _initial_state(name, adapter_params, frozen_params, rng, optimizer, shardings,
                   batches, checkpoints, num_steps):
    """Place the trees on the mesh and restore the newest checkpoint, if there is one.

    Returns (adapter_params, opt_state, frozen_params, rng, start_step, history).
    """
    frozen_params = sharding_lib.put_tree(frozen_params, shardings.frozen)
    adapter_params = sharding_lib.put_tree(adapter_params, shardings.adapter)
    opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(adapter_params)
    rng = sharding_lib.put(rng, shardings.replicated)
    restored = None
    if checkpoints is not None:
        abstract = checkpoint.abstract_like(
            {"adapter_params": adapter_params, "opt_state": opt_state, "rng": rng})
        restored = checkpoints.restore_newest_readable(abstract)
    if restored is None:
        if checkpoints is not None:
            # Drop metrics of a run that was killed before its first checkpoint.
            checkpoints.read_metrics(0)
            logging.info("%s: no checkpoint in %s yet, starting at step 1 of %d", name,
                         checkpoints.directory, num_steps)
        return adapter_params, opt_state, frozen_params, rng, 0, []

    state, meta = restored
    start_step = int(meta["step"])
    batches.skip_to(int(meta["data_position"]))
    history = checkpoints.read_metrics(start_step)
    logging.info("%s: resumed from checkpoint step %d of %d in %s", name, start_step, num_steps,
                 checkpoints.directory)
    return (state["adapter_params"], state["opt_state"], frozen_params, state["rng"], start_step,
            history)
