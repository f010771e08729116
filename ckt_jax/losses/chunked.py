"""Per-position vocabulary-side losses computed in chunks, so `B x K x V` logits never coexist.

A per-token divergence over the vocabulary needs the logits `hidden @ W_out` of every scored
position. For SmolLM2 (V = 49152) a batch of 8 rows x 80 scored positions is 126 MB of float32
logits per model, and the softmax, the divergence and their gradients each add arrays of that
size. `chunked_vocab_map` runs the output projection and the per-token loss on `chunk_size`
positions of every row at a time, under `jax.lax.map`, and wraps each chunk in `jax.checkpoint`.
The backward pass therefore recomputes one chunk's logits at a time instead of keeping all of
them, and peak memory on the vocabulary side scales with `B x chunk_size x V`.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

import jax
import jax.numpy as jnp

PerTokenFn = Callable[[dict[str, jax.Array], dict[str, jax.Array]], jax.Array]


def chunked_vocab_map(fn: PerTokenFn,
                      project: Mapping[str, Callable[[jax.Array], jax.Array]],
                      hidden: Mapping[str, jax.Array], extras: Mapping[str, jax.Array],
                      chunk_size: int) -> jax.Array:
    """Compute `fn(logits, extras)` over the position axis in chunks; returns `B x K` values.

    `hidden[name]` is `B x K x D` (the final hidden states at the scored positions) and
    `project[name]` maps a `B x C x D` slice of it to `B x C x V` logits. `extras[name]` is
    `B x K x ...` (target ids, cached teacher values) and is sliced like the hidden states.
    `fn` receives `{name: B x C x V logits}` and `{name: B x C x ...}` and returns the
    per-position loss `B x C`. The result equals `fn` applied to the whole `K` axis, up to float
    rounding, and so do its gradients.

    Positions are padded to a multiple of `chunk_size` with copies of the last position, which
    keeps values and gradients finite, and the padding is dropped from the result.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    if set(project) != set(hidden):
        raise ValueError(f"project has keys {sorted(project)} and hidden {sorted(hidden)}; "
                         "pass one projection per hidden-state array")
    leading = {tuple(x.shape[:2]) for x in list(hidden.values()) + list(extras.values())}
    if len(leading) != 1:
        raise ValueError(f"hidden and extras differ in their leading B x K shapes: {leading}")
    (batch, positions), = leading
    chunk_count = math.ceil(positions / chunk_size)
    padding = chunk_count * chunk_size - positions

    def to_chunks(x):
        widths = [(0, 0), (0, padding)] + [(0, 0)] * (x.ndim - 2)
        x = jnp.pad(x, widths, mode="edge")
        x = x.reshape((batch, chunk_count, chunk_size) + x.shape[2:])
        return jnp.moveaxis(x, 1, 0)

    @jax.checkpoint
    def chunk_values(chunk):
        hidden_chunk, extras_chunk = chunk
        logits = {name: project[name](value) for name, value in hidden_chunk.items()}
        return fn(logits, extras_chunk)

    chunks = (jax.tree_util.tree_map(to_chunks, dict(hidden)),
              jax.tree_util.tree_map(to_chunks, dict(extras)))
    values_NxBxC = jax.lax.map(chunk_values, chunks)
    values_BxNC = jnp.moveaxis(values_NxBxC, 0, 1).reshape(batch, chunk_count * chunk_size)
    return values_BxNC[:, :positions]
