"""Input-embedding perturbations and the consistency loss between clean and perturbed outputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ckt_jax.losses.divergences import forward_kl, symmetric_kl


def length_scaled_noise(key: jax.Array, embeds_BxLxD: jax.Array, mask_BxL: jax.Array,
                        alpha: float, distribution: str = "gaussian",
                        segment_ids_BxL: jax.Array | None = None) -> jax.Array:
    """Sample embedding noise whose magnitude is `alpha / sqrt(L_b * D)` for sequence `b`.

    `L_b` is the number of real tokens of sequence `b` (its own length, not the padded length), as in
    NEFTune (Jain et al., 2023), so a short prompt in a long padded batch is perturbed as strongly as
    it would be alone. `distribution="uniform"` draws from `U(-1, 1)` like NEFTune; `"gaussian"` draws
    from `N(0, 1)`. Padding positions get zero noise. Returns the noise, shaped like `embeds_BxLxD`.

    With `segment_ids_BxL` (rows that pack several sequences), `L_b` is the real-token count of
    each token's own segment, so every packed sequence gets the noise it would get alone.
    """
    mask = jnp.asarray(mask_BxL, jnp.float32)
    dim = embeds_BxLxD.shape[-1]
    if segment_ids_BxL is None:
        length_B = jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
        scale_BxL = jnp.broadcast_to((alpha / jnp.sqrt(length_B * dim))[:, None], mask.shape)
    else:
        same_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
        length_BxL = jnp.maximum(jnp.sum(same_BxLxL * mask[:, None, :], axis=-1), 1.0)
        scale_BxL = alpha / jnp.sqrt(length_BxL * dim)
    if distribution == "gaussian":
        unit = jax.random.normal(key, embeds_BxLxD.shape, jnp.float32)
    elif distribution == "uniform":
        unit = jax.random.uniform(key, embeds_BxLxD.shape, jnp.float32, -1.0, 1.0)
    else:
        raise ValueError(f"noise distribution {distribution!r} is unknown; use 'gaussian' or 'uniform'")
    noise = unit * (scale_BxL * mask)[..., None]
    return noise.astype(embeds_BxLxD.dtype)


def consistency_loss(clean_logits: jax.Array, perturbed_logits: jax.Array,
                     temperature: float = 1.0) -> jax.Array:
    """Symmetric KL between clean and perturbed output distributions, per position.

    Gradients flow through both passes, so the clean output also moves toward a region where small
    input changes do not change it (as in R-Drop and SMART).
    """
    return symmetric_kl(clean_logits, perturbed_logits, temperature)


def teacher_consistency_loss(perturbed_student_logits: jax.Array, clean_teacher_logits: jax.Array,
                             temperature: float = 1.0) -> jax.Array:
    """Forward KL from the teacher's clean output to the student's perturbed output, per position.

    `T^2 * KL(p_teacher(x) || q_student(x + delta))`, shape of the logits without the vocabulary
    axis. Unlike `consistency_loss`, which ties the student's perturbed output to its own clean
    output, this anchors it to the teacher, so the student cannot become consistent by drifting
    away from the teacher on both passes. It is the smoothness-inducing term of SMART (Jiang et
    al., "SMART", 2020) with the teacher's clean output in place of the model's own, taken in the
    forward direction only.
    """
    return forward_kl(perturbed_student_logits, clean_teacher_logits, temperature)
