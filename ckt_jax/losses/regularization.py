"""Regularization terms on adapter parameters."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def l2_penalty(params) -> jax.Array:
    """`0.5 * sum ||w||^2` over every leaf of `params` (pass only the adapter tree), float32."""
    leaves = jax.tree_util.tree_leaves(params)
    if not leaves:
        return jnp.zeros((), jnp.float32)
    return 0.5 * sum(jnp.sum(jnp.square(jnp.asarray(x, jnp.float32))) for x in leaves)
