"""The train step and the training loop for adapter parameters.

The step is a pure function `(adapter_params, opt_state, frozen_params, batch, rng) ->
(adapter_params, opt_state, metrics)`, compiled once per batch shape with the adapter and optimizer
buffers donated. With `StepShardings` it is compiled for a device mesh with explicit input and
output shardings, and without them it runs on the default device. With `accumulation_steps > 1`
the batch is split into that many micro-batches whose gradients are averaged before one
optimizer update.
It reports every loss term plus gradient, parameter and update norms and the batch's real-token
count.

The loop stops with an error at the first non-finite loss, naming the step. It can resume from a
step, save checkpoints, stop cleanly on SIGTERM after saving, and logs throughput.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ckt_jax import sharding as sharding_lib
from ckt_jax.objective import LossFn
from ckt_jax.profiling import StepProfiler
from ckt_jax.throughput import Throughput

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Metrics that count things: summed over micro-batches. Every other metric is averaged.
SUMMED_METRICS = ("target_tokens", "target_tokens_dropped")


@dataclasses.dataclass(frozen=True)
class Precision:
    """Mixed-precision policy. Adapters, optimizer state and every loss stay float32."""

    param: str = "float32"    # Storage dtype of the frozen backbone and teacher weights.
    compute: str = "float32"  # Dtype of activations and matrix products.
    output: str = "float32"   # Dtype of the logits the model returns.

    def __post_init__(self):
        for field in ("param", "compute", "output"):
            value = getattr(self, field)
            if value not in DTYPES:
                raise ValueError(f"config.train.{field}_dtype={value!r} is unknown; use one of "
                                 f"{', '.join(DTYPES)}")

    @classmethod
    def from_config(cls, train_config) -> "Precision":
        return cls(param=train_config.param_dtype, compute=train_config.compute_dtype,
                   output=train_config.output_dtype)

    @property
    def param_dtype(self):
        return DTYPES[self.param]

    @property
    def compute_dtype(self):
        return DTYPES[self.compute]

    @property
    def output_dtype(self):
        return DTYPES[self.output]


@dataclasses.dataclass(frozen=True)
class StepShardings:
    """Shardings of the train step's arguments, as trees shaped like the trees they shard."""

    mesh: Mesh
    adapter: Any
    opt_state: Any
    frozen: Any

    @property
    def batch(self) -> NamedSharding:
        return sharding_lib.batch_sharding(self.mesh)

    @property
    def replicated(self) -> NamedSharding:
        return sharding_lib.replicated(self.mesh)


def opt_state_shardings(optimizer: optax.GradientTransformation, adapter_params: Any,
                        adapter_shardings: Any, mesh: Mesh) -> Any:
    """Shard each parameter-shaped optimizer leaf like its parameter; replicate the rest.

    A leaf is parameter-shaped when its tree path ends with a parameter's path and the shapes
    agree (Adam's `mu` and `nu`). The rest (step counters) is replicated explicitly: left to
    `jit`, scalars end up on one device and then do not match the mesh.
    """
    abstract = jax.eval_shape(optimizer.init, adapter_params)
    by_path = {tuple(path): (np.shape(value), sharding) for (path, value), sharding in zip(
        jax.tree_util.tree_flatten_with_path(adapter_params)[0],
        jax.tree_util.tree_leaves(adapter_shardings))}

    def leaf_sharding(path, leaf):
        for start in range(len(path)):
            match = by_path.get(tuple(path[start:]))
            if match is not None and match[0] == leaf.shape:
                return match[1]
        return sharding_lib.replicated(mesh)

    return jax.tree_util.tree_map_with_path(leaf_sharding, abstract)


def split_micro_batches(batch: dict, accumulation_steps: int,
                        sharding: NamedSharding | None) -> dict:
    """Reshape every `B x ...` array to `A x (B / A) x ...`, micro-batch i taking rows i, i + A, ...

    Strided rows keep each micro-batch spread over all data shards, so the split needs no
    communication when `A` divides each device's share of the batch.
    """
    def split(x):
        rows = x.shape[0] // accumulation_steps
        x = x.reshape((rows, accumulation_steps) + x.shape[1:])
        x = jnp.swapaxes(x, 0, 1)
        if sharding is not None:
            spec = PartitionSpec(None, *sharding.spec)
            x = jax.lax.with_sharding_constraint(x, NamedSharding(sharding.mesh, spec))
        return x
    return jax.tree_util.tree_map(split, batch)


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *,
                    accumulation_steps: int = 1,
                    shardings: StepShardings | None = None) -> Callable:
    """Build the jitted train step for `loss_fn`; gradients are taken for adapter leaves only."""
    if accumulation_steps < 1:
        raise ValueError(f"config.train.grad_accum_steps={accumulation_steps} must be >= 1")
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    # NOTE: accumulation averages the micro-batch losses, each already a mean over its own reply
    # tokens. It equals the full-batch loss only when every micro-batch has as many scored
    # tokens; otherwise tokens of short micro-batches weigh a little more.
    def accumulated_grads(adapter_params, frozen_params, batch, rng):
        micro_batches = split_micro_batches(
            batch, accumulation_steps, shardings.batch if shardings is not None else None)

        def body(carry, inputs):
            index, micro_batch = inputs
            (loss, aux), grads = grad_fn(adapter_params, frozen_params, micro_batch,
                                         jax.random.fold_in(rng, index))
            total_loss, total_aux, total_grads = carry
            total_grads = jax.tree_util.tree_map(jnp.add, total_grads, grads)
            total_aux = jax.tree_util.tree_map(jnp.add, total_aux, aux)
            return (total_loss + loss, total_aux, total_grads), None

        # Zero-valued accumulators of the right structure, from a shape-only trace.
        loss_shape, aux_shape = jax.eval_shape(
            lambda: loss_fn(adapter_params, frozen_params,
                            jax.tree_util.tree_map(lambda x: x[0], micro_batches), rng))
        zeros = lambda tree: jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), tree)
        init = (zeros(loss_shape), zeros(aux_shape),
                jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), adapter_params))
        (loss, aux, grads), _ = jax.lax.scan(
            body, init, (jnp.arange(accumulation_steps), micro_batches))
        scale = 1.0 / accumulation_steps
        grads = jax.tree_util.tree_map(lambda g: g * scale, grads)
        aux = {k: v if k in SUMMED_METRICS else v * scale for k, v in aux.items()}
        return (loss * scale, aux), grads

    def step(adapter_params, opt_state, frozen_params, batch, rng):
        if accumulation_steps == 1:
            (loss, aux), grads = grad_fn(adapter_params, frozen_params, batch, rng)
        else:
            (loss, aux), grads = accumulated_grads(adapter_params, frozen_params, batch, rng)
        updates, opt_state = optimizer.update(grads, opt_state, adapter_params)
        adapter_params = optax.apply_updates(adapter_params, updates)
        metrics = dict(aux)
        metrics["loss"] = loss
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["update_norm"] = optax.tree.norm(updates)
        metrics["param_norm"] = optax.tree.norm(adapter_params)
        metrics["tokens"] = jnp.sum(batch["attention_mask"])
        return adapter_params, opt_state, metrics

    if shardings is None:
        return jax.jit(step, donate_argnums=(0, 1))
    return jax.jit(
        step, donate_argnums=(0, 1),
        in_shardings=(shardings.adapter, shardings.opt_state, shardings.frozen, shardings.batch,
                      shardings.replicated),
        out_shardings=(shardings.adapter, shardings.opt_state, shardings.replicated))


class NonFiniteLossError(FloatingPointError):
    pass


class TrainingStopped(Exception):
    """Training stopped on a signal after step `step`, and saved it when it had a directory.

    ``exit_status`` is 128 plus the signal number, the status of a process that the signal
    killed: 143 for SIGTERM, 130 for SIGINT.
    """

    def __init__(self, name: str, step: int, directory: str | None, signal_name: str = "SIGTERM"):
        if directory is None:
            message = f"{name}: stopped by {signal_name} after step {step}; no checkpoint directory"
        else:
            message = (f"{name}: stopped by {signal_name} after step {step}; checkpoint saved in "
                       f"{directory}; run the same command again to resume")
        super().__init__(message)
        self.step = step
        self.exit_status = 130 if signal_name == "SIGINT" else 143


def train_loop(
    *,
    step_fn: Callable,
    adapter_params: Any,
    opt_state: Any,
    frozen_params: Any,
    batches: Iterator[dict[str, np.ndarray]],
    num_steps: int,
    rng: jax.Array,
    log_every: int = 10,
    name: str = "train",
    on_metrics: Callable[[int, dict], None] | None = None,
    start_step: int = 0,
    history: list[dict] | None = None,
    place_batch: Callable[[dict], dict] | None = None,
    checkpoints=None,
    stop_signal=None,
    throughput: Throughput | None = None,
    profiler: StepProfiler | None = None,
) -> tuple[Any, Any, list[dict]]:
    """Run steps `start_step + 1 .. num_steps`; return (adapter_params, opt_state, history).

    `history` holds the metrics of the steps before `start_step` (from a checkpoint); the returned
    history appends one dict of floats per step. `place_batch` turns a host batch into device
    arrays. `checkpoints` (a `ckt_jax.checkpoint.TrainCheckpoints`) saves when due, after the
    last step, and after the step during which `stop_signal` saw SIGTERM; then TrainingStopped
    is raised. Only process 0 logs: `name`, the step, every loss term, tokens per second per
    device, the estimated model-FLOPs utilisation and the time left. `profiler` traces the
    steps it names (`ckt_jax.profiling.StepProfiler`).
    """
    history = list(history or [])
    primary = jax.process_index() == 0
    throughput = throughput or Throughput()
    # `seconds` counts training time over all runs, so it continues from a restored history.
    start = time.perf_counter() - (history[-1]["seconds"] if history else 0.0)
    profiler = profiler or StepProfiler(None, "")
    try:
        for step in range(start_step + 1, num_steps + 1):
            profiler.before_step(step)
            step_start = time.perf_counter()
            host_batch = next(batches)
            batch = place_batch(host_batch) if place_batch is not None else host_batch
            step_rng = jax.random.fold_in(rng, step)
            adapter_params, opt_state, metrics = step_fn(
                adapter_params, opt_state, frozen_params, batch, step_rng)
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if not np.isfinite(metrics["loss"]):
                terms = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                                  if k.startswith("loss"))
                raise NonFiniteLossError(
                    f"{name}: non-finite loss at step {step} ({terms}); lower the learning rate or "
                    "the loss weights, or check the batch for empty reply masks")
            # The first step of a run includes compilation, so the rates start after it.
            throughput.update(first=step == start_step + 1, tokens=metrics["tokens"],
                              batch_shape=np.shape(batch["input_ids"]))
            metrics["step"] = step
            now = time.perf_counter()
            metrics["seconds"] = now - start
            metrics["step_seconds"] = now - step_start
            profiler.after_step(step)
            history.append(metrics)
            if on_metrics is not None:
                on_metrics(step, metrics)

            if checkpoints is not None:
                checkpoints.record_metrics(step, metrics)
            # Checked after every step's own work, so a SIGTERM during step k saves step k.
            stop = stop_signal is not None and stop_signal.requested()
            if checkpoints is not None:
                if stop or step == num_steps or checkpoints.due(step):
                    state = {"adapter_params": adapter_params, "opt_state": opt_state, "rng": rng}
                    checkpoints.save(step, state, getattr(batches, "position", step))

            if primary and (step % log_every == 0 or step == num_steps or step == start_step + 1):
                terms = " ".join(f"{k.split('/', 1)[1]}={v:.4f}" for k, v in metrics.items()
                                 if k.startswith("loss/"))
                # The time left is estimated from the steps after the first, which compiles.
                left = (f"{throughput.seconds_per_step * (num_steps - step):.0f} s left"
                        if throughput.steady_steps else "time left known after step 2")
                logging.info("%s step %d/%d loss=%.4f %s grad_norm=%.3f | %s, %s", name, step,
                             num_steps, metrics["loss"], terms, metrics["grad_norm"],
                             throughput.summary(), left)
            if stop:
                signal_name = getattr(stop_signal, "signal_name", "SIGTERM")
                if checkpoints is None:
                    raise TrainingStopped(name, step, None, signal_name)
                checkpoints.wait()
                raise TrainingStopped(name, step, str(checkpoints.directory), signal_name)
    finally:
        # A trace still running (training stopped or failed inside its range) ends here.
        profiler.close(len(history))
    return adapter_params, opt_state, history


def to_device_tree(tree: Any, dtype=jnp.float32) -> Any:
    """Move a NumPy parameter tree onto the default device as `dtype` arrays."""
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), tree)
