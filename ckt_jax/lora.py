"""LoRA adapters: splitting parameter trees, the adapter-only optimizer, and merging.

The Llama module stores each adapted projection as `{"kernel", "lora_a", "lora_b"}`, so a leaf is
an adapter leaf when its name is `lora_a` or `lora_b`, or when it sits under the top-level
`contrastive_head` group (the projection head of the contrastive term). Training keeps two trees:

    adapter_params  the LoRA leaves; the only leaves that receive gradients;
    frozen_params   everything else; wrapped in `jax.lax.stop_gradient` inside the loss.

The optimizer is built with `optax.multi_transform` and labels every leaf of whatever tree it is
given: adapter leaves get the update rule, every other leaf gets `optax.set_to_zero()` and keeps no
optimizer state. Gradients are taken only with respect to `adapter_params`, so the label rule is a
second guard: a frozen leaf that slips into the trainable tree still never moves.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

ADAPTER_LEAF_NAMES = ("lora_a", "lora_b")
# Top-level parameter groups that train with the adapters (the contrastive projection head).
ADAPTER_GROUPS = ("contrastive_head",)
ADAPTER_LABEL = "adapter"
FROZEN_LABEL = "frozen"

Params = dict[str, Any]


def is_adapter_path(path: tuple[str, ...]) -> bool:
    """Return whether a flattened parameter path names a trainable (adapter) leaf."""
    return path[-1] in ADAPTER_LEAF_NAMES or path[0] in ADAPTER_GROUPS


def split_params(params: Params) -> tuple[Params, Params]:
    """Split a full parameter tree into (adapter_params, frozen_params) with disjoint leaves."""
    flat = traverse_util.flatten_dict(params)
    adapter = {p: v for p, v in flat.items() if is_adapter_path(p)}
    frozen = {p: v for p, v in flat.items() if not is_adapter_path(p)}
    return traverse_util.unflatten_dict(adapter), traverse_util.unflatten_dict(frozen)


def combine_params(adapter_params: Params, frozen_params: Params) -> Params:
    """Rebuild the full tree the model expects from its two halves."""
    flat = traverse_util.flatten_dict(frozen_params)
    for path, value in traverse_util.flatten_dict(adapter_params).items():
        if path in flat:
            raise ValueError(
                f"parameter {'/'.join(path)} is in both the adapter and the frozen tree")
        flat[path] = value
    return traverse_util.unflatten_dict(flat)


def adapter_labels(params: Params) -> Params:
    """Label every leaf `adapter` or `frozen`; the result has exactly the structure of `params`."""
    flat = traverse_util.flatten_dict(params)
    labels = {p: ADAPTER_LABEL if is_adapter_path(p) else FROZEN_LABEL for p in flat}
    if set(labels) != set(flat):  # Every leaf must be covered by some rule.
        raise AssertionError("adapter labels do not cover every parameter leaf")
    return traverse_util.unflatten_dict(labels)


def make_adapter_optimizer(
        learning_rate: float | optax.Schedule,
        *,
        weight_decay: float = 0.0,
        max_grad_norm: float | None = 1.0,
        b1: float = 0.9,
        b2: float = 0.999,
) -> optax.GradientTransformation:
    """Build AdamW for adapter leaves and a zero update for every other leaf.

    Weight decay here is decoupled AdamW decay; the objective's explicit L2 term is separate.
    """
    inner = [optax.adamw(learning_rate, b1=b1, b2=b2, weight_decay=weight_decay)]
    if max_grad_norm:
        inner.insert(0, optax.clip_by_global_norm(max_grad_norm))
    return optax.multi_transform(
            {ADAPTER_LABEL: optax.chain(*inner), FROZEN_LABEL: optax.set_to_zero()},
            adapter_labels,
    )


def warmup_cosine(peak: float, total_steps: int, warmup_steps: int) -> optax.Schedule:
    """Linear warm-up to `peak`, then cosine decay to 10% of it at `total_steps`."""
    warmup_steps = max(1, min(warmup_steps, total_steps - 1)) if total_steps > 1 else 1
    return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=peak, warmup_steps=warmup_steps,
            decay_steps=max(total_steps, warmup_steps + 1), end_value=0.1 * peak)


def lora_scale(rank: int, alpha: float) -> float:
    return float(alpha) / float(rank)


def merge_lora(params: Params, scale: float) -> Params:
    """Fold every LoRA pair into its kernel (`kernel + scale * a @ b`) and drop the adapter leaves.

    Works on the scanned layout, where every leaf under `layers` has a leading layer axis. The result
    is a plain backbone tree, which runs without the LoRA matmuls (used for the teacher).
    """
    flat = traverse_util.flatten_dict(params)
    merged = {}
    for path, value in flat.items():
        if is_adapter_path(path):
            continue
        if path[-1] == "kernel" and path[:-1] + ("lora_a",) in flat:
            a = flat[path[:-1] + ("lora_a",)]
            b = flat[path[:-1] + ("lora_b",)]
            delta = jnp.einsum("...ir,...ro->...io", jnp.asarray(a, jnp.float32),
                               jnp.asarray(b, jnp.float32))
            value = (jnp.asarray(value, jnp.float32) + scale * delta).astype(
                jnp.asarray(value).dtype)
        merged[path] = value
    return traverse_util.unflatten_dict(merged)


def init_adapter_params(init_fn: Callable[[jax.Array], Params], rng: jax.Array) -> Params:
    """Initialise only the adapter leaves of a LoRA model.

    `init_fn(rng)` returns the full parameter tree of the LoRA model (for example
    `lambda r: model.init(r, ids)["params"]`). It runs under `jax.jit` and returns only the adapter
    leaves, so XLA drops the backbone initialisers: loaded weights replace those anyway.
    """
    def adapters_only(r):
        return split_params(init_fn(r))[0]
    return jax.jit(adapters_only)(rng)


def count_params(tree: Params) -> int:
    return int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(tree)))
