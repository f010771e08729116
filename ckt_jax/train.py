"""The train step and the training loop for adapter parameters.

The step is a pure function `(adapter_params, opt_state, frozen_params, batch, rng) ->
(adapter_params, opt_state, metrics)`, compiled once per batch shape with the adapter and optimizer
buffers donated. It reports every loss term plus gradient, parameter and update norms. The loop
stops with an error at the first non-finite loss, naming the step.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from ckt_jax.objective import LossFn


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation) -> Callable:
    """Build the jitted train step for `loss_fn`; gradients are taken for adapter leaves only."""

    def step(adapter_params, opt_state, frozen_params, batch, rng):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, aux), grads = grad_fn(adapter_params, frozen_params, batch, rng)
        updates, opt_state = optimizer.update(grads, opt_state, adapter_params)
        adapter_params = optax.apply_updates(adapter_params, updates)
        metrics = dict(aux)
        metrics["loss"] = loss
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["update_norm"] = optax.tree.norm(updates)
        metrics["param_norm"] = optax.tree.norm(adapter_params)
        return adapter_params, opt_state, metrics

    return jax.jit(step, donate_argnums=(0, 1))


class NonFiniteLossError(FloatingPointError):
    pass


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
) -> tuple[Any, Any, list[dict]]:
    """Run `num_steps` steps; return (adapter_params, opt_state, per-step metrics as floats).

    Logs `name`, the step, every loss term, tokens per second and the estimated time left.
    """
    history: list[dict] = []
    start = time.perf_counter()
    steady_start = start  # Reset after step 1, so compilation does not inflate the estimates.
    tokens_seen = 0
    for step in range(1, num_steps + 1):
        batch = next(batches)
        step_rng = jax.random.fold_in(rng, step)
        adapter_params, opt_state, metrics = step_fn(
            adapter_params, opt_state, frozen_params, batch, step_rng)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not np.isfinite(metrics["loss"]):
            terms = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k.startswith("loss"))
            raise NonFiniteLossError(
                f"{name}: non-finite loss at step {step} ({terms}); lower the learning rate or "
                "check the batch for empty reply masks")
        batch_tokens = int(np.sum(batch["attention_mask"]))
        if step == 1:
            steady_start = time.perf_counter()
        else:
            tokens_seen += batch_tokens
        metrics["step"] = step
        metrics["tokens"] = batch_tokens
        metrics["seconds"] = time.perf_counter() - start
        history.append(metrics)
        if on_metrics is not None:
            on_metrics(step, metrics)
        if step % log_every == 0 or step == num_steps or step == 1:
            steady = time.perf_counter() - steady_start
            per_step = steady / (step - 1) if step > 1 else time.perf_counter() - start
            terms = " ".join(f"{k.split('/', 1)[1]}={v:.4f}" for k, v in metrics.items()
                             if k.startswith("loss/"))
            logging.info(
                "%s step %d/%d loss=%.4f %s grad_norm=%.3f | %.0f tokens/s, %.1f s/step, "
                "%.0f s left", name, step, num_steps, metrics["loss"], terms,
                metrics["grad_norm"], tokens_seen / max(steady, 1e-9), per_step,
                per_step * (num_steps - step))
    return adapter_params, opt_state, history


def to_device_tree(tree: Any, dtype=jnp.float32) -> Any:
    """Move a NumPy parameter tree onto the default device as `dtype` arrays."""
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), tree)
