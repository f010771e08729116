"""Masked reductions for per-position losses shaped `B x L`."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def per_token_mean(values_BxL: jax.Array, mask_BxL: jax.Array) -> jax.Array:
    """Mean over every unmasked position of the batch (each token weighs the same)."""
    mask = jnp.asarray(mask_BxL, jnp.float32)
    return jnp.sum(values_BxL * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def per_sequence_mean(values_BxL: jax.Array, mask_BxL: jax.Array) -> jax.Array:
    """Mean over unmasked positions within each sequence, shape `B` (0 for an empty sequence)."""
    mask = jnp.asarray(mask_BxL, jnp.float32)
    return jnp.sum(values_BxL * mask, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)


def per_batch_mean(values_BxL: jax.Array, mask_BxL: jax.Array) -> jax.Array:
    """Mean of the per-sequence means over sequences with at least one unmasked position."""
    mask = jnp.asarray(mask_BxL, jnp.float32)
    has_tokens_B = (jnp.sum(mask, axis=-1) > 0).astype(jnp.float32)
    return jnp.sum(per_sequence_mean(values_BxL, mask) * has_tokens_B) / jnp.maximum(
            jnp.sum(has_tokens_B), 1.0)


def next_token_mask(loss_mask_BxL: jax.Array) -> jax.Array:
    """Move a mask over target tokens onto the positions whose logits predict them.

    Position `t` predicts token `t + 1`, so `out[:, t] = loss_mask[:, t + 1]` and the last position
    predicts nothing.
    """
    return jnp.concatenate(
            [loss_mask_BxL[:, 1:], jnp.zeros_like(loss_mask_BxL[:, :1])], axis=1)
