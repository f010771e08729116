"""Cross-entropy on target tokens (supervised fine-tuning of the teacher and the SFT baseline)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def next_token_cross_entropy(logits_BxLxV: jax.Array, input_ids_BxL: jax.Array) -> jax.Array:
    """Per-position cross-entropy of the next token, shape `B x L` (last position is 0).

    Position `t` is scored on token `t + 1`; mask the result with
    `reductions.next_token_mask(loss_mask)`.
    """
    log_probs = jax.nn.log_softmax(jnp.asarray(logits_BxLxV[:, :-1], jnp.float32), axis=-1)
    targets_BxL = input_ids_BxL[:, 1:]
    nll = -jnp.take_along_axis(log_probs, targets_BxL[..., None], axis=-1)[..., 0]
    return jnp.concatenate([nll, jnp.zeros_like(nll[:, :1])], axis=1)
