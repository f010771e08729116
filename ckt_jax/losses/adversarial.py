"""Adversarial perturbations of input embeddings (PGD, SMART and FreeLB style).

A perturbation `delta_BxLxD` is added to the input embeddings by the caller, inside the loss
functions passed here: `inner_loss_fn(delta) -> scalar` is the loss the perturbation ascends, and
`outer_loss_fn(delta) -> scalar` is the training loss evaluated at the perturbation. Both close
over the model parameters and the batch. Iterates are kept in float32 and cast to the embeddings'
dtype before each call and on return. Padding positions (`mask_BxL == 0`) are never perturbed.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

NORMS = ("l2", "linf")

_NORM_EPS = 1e-12


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r} is unknown; use one of {NORMS}")


def _mask_or_ones(mask_BxL: jax.Array | None, shape_BxLxD: tuple[int, ...]) -> jax.Array:
    if mask_BxL is None:
        return jnp.ones(shape_BxLxD[:2], jnp.float32)
    if mask_BxL.shape != shape_BxLxD[:2]:
        raise ValueError(f"mask shape {mask_BxL.shape} does not match the perturbation shape "
                         f"{shape_BxLxD}; pass a B x L mask")
    return jnp.asarray(mask_BxL, jnp.float32)


def _sequence_l2_norm(x_BxLxD: jax.Array) -> jax.Array:
    """L2 norm of each sequence's `L x D` block, shape `B x 1 x 1`, at least 1e-12."""
    squared_Bx1x1 = jnp.sum(jnp.square(x_BxLxD), axis=(1, 2), keepdims=True)
    return jnp.sqrt(jnp.maximum(squared_Bx1x1, _NORM_EPS**2))


def project_to_ball(delta_BxLxD: jax.Array, epsilon: float, norm: str = "l2",
                    mask_BxL: jax.Array | None = None) -> jax.Array:
    """Project a perturbation onto its `epsilon`-ball and zero it at padding positions.

    `norm="l2"`: each sequence's masked block is rescaled by `min(1, epsilon / ||delta_b||_2)`,
    where the norm runs over all its real tokens and embedding dimensions together.
    `norm="linf"`: each entry is clipped to `[-epsilon, epsilon]`. Both are the Euclidean
    projections used by projected gradient descent (Madry et al., "Towards Deep Learning Models
    Resistant to Adversarial Attacks", 2018). Returns the input's shape and dtype.
    """
    _check_norm(norm)
    if isinstance(epsilon, (int, float)) and not epsilon >= 0:
        raise ValueError(f"epsilon={epsilon} is negative; pass a ball radius >= 0")
    mask_BxLx1 = _mask_or_ones(mask_BxL, delta_BxLxD.shape)[..., None]
    delta32_BxLxD = jnp.asarray(delta_BxLxD, jnp.float32) * mask_BxLx1
    if norm == "l2":
        scale_Bx1x1 = jnp.minimum(1.0, epsilon / _sequence_l2_norm(delta32_BxLxD))
        projected_BxLxD = delta32_BxLxD * scale_Bx1x1
    else:
        projected_BxLxD = jnp.clip(delta32_BxLxD, -epsilon, epsilon)
    return projected_BxLxD.astype(delta_BxLxD.dtype)


def _random_start(key, shape_BxLxD, mask_BxLx1, norm, init_scale):
    """Random perturbation of L2 norm `init_scale` per sequence, or uniform in +-init_scale."""
    if norm == "l2":
        direction_BxLxD = jax.random.normal(key, shape_BxLxD, jnp.float32) * mask_BxLx1
        return init_scale * direction_BxLxD / _sequence_l2_norm(direction_BxLxD)
    return jax.random.uniform(key, shape_BxLxD, jnp.float32, -init_scale, init_scale) * mask_BxLx1


def _ascent_step(inner_loss_fn, delta_BxLxD, mask_BxLx1, dtype, epsilon, step_size, norm):
    """Take one projected ascent step on `inner_loss_fn`, in float32."""
    grad_BxLxD = jax.grad(lambda d: inner_loss_fn(d.astype(dtype)))(delta_BxLxD)
    grad_BxLxD = jnp.asarray(grad_BxLxD, jnp.float32) * mask_BxLx1
    if norm == "l2":
        direction_BxLxD = grad_BxLxD / _sequence_l2_norm(grad_BxLxD)
    else:
        direction_BxLxD = jnp.sign(grad_BxLxD)
    delta_BxLxD = delta_BxLxD + step_size * direction_BxLxD
    return project_to_ball(delta_BxLxD, epsilon, norm, mask_BxLx1[..., 0])


def _check_ascent_args(embeds_BxLxD, epsilon, step_size, steps, norm, init_scale):
    _check_norm(norm)
    if embeds_BxLxD.ndim != 3:
        raise ValueError(f"embeds shape {embeds_BxLxD.shape} is not B x L x D")
    # Traced values (such as a scheduled epsilon under jit) are not checked.
    scalars = [x for x in (epsilon, step_size, init_scale) if isinstance(x, (int, float))]
    if any(not x >= 0 for x in scalars):
        raise ValueError(f"epsilon={epsilon}, step_size={step_size} and init_scale={init_scale} "
                         "must all be >= 0")
    if steps < 1:
        raise ValueError(f"steps={steps} is below 1; pass at least one ascent step")


def adversarial_perturbation(inner_loss_fn: Callable[[jax.Array], jax.Array],
                             embeds_BxLxD: jax.Array, mask_BxL: jax.Array, key: jax.Array, *,
                             epsilon: float, step_size: float, steps: int = 1, norm: str = "l2",
                             init_scale: float = 1e-3) -> jax.Array:
    """Find an embedding perturbation that increases `inner_loss_fn` by projected gradient ascent.

    `delta_0` is random, drawn from `key` with size `init_scale` (L2 norm per sequence for
    `"l2"`, uniform in `[-init_scale, init_scale]` per entry for `"linf"`). Then, `steps` times,
    `delta <- Proj(delta + step_size * g / ||g||_2)` for `"l2"` (norm per sequence) or
    `delta <- Proj(delta + step_size * sign(g))` for `"linf"`, with `g = grad inner_loss_fn(delta)`
    and `Proj = project_to_ball` (projected gradient descent, Madry et al., "Towards Deep
    Learning Models Resistant to Adversarial Attacks", 2018). With `steps=1` and a small random
    start this is the perturbation step of SMART (Jiang et al., "SMART: Robust and Efficient
    Fine-Tuning for Pre-trained Natural Language Models through Principled Regularized
    Optimization", 2020).

    `embeds_BxLxD` supplies the shape and dtype. Returns `stop_gradient(delta_steps)`, shaped and
    typed like `embeds_BxLxD`, so the outer loss gets no gradient through the ascent.
    """
    _check_ascent_args(embeds_BxLxD, epsilon, step_size, steps, norm, init_scale)
    mask_BxLx1 = _mask_or_ones(mask_BxL, embeds_BxLxD.shape)[..., None]
    dtype = embeds_BxLxD.dtype
    delta_BxLxD = _random_start(key, embeds_BxLxD.shape, mask_BxLx1, norm, init_scale)
    delta_BxLxD = project_to_ball(delta_BxLxD, epsilon, norm, mask_BxLx1[..., 0])

    def body(delta, _):
        return _ascent_step(inner_loss_fn, delta, mask_BxLx1, dtype, epsilon, step_size, norm), None

    delta_BxLxD, _ = jax.lax.scan(body, delta_BxLxD, None, length=steps)
    return jax.lax.stop_gradient(delta_BxLxD.astype(dtype))


def freelb_average_loss(outer_loss_fn: Callable[[jax.Array], jax.Array],
                        inner_loss_fn: Callable[[jax.Array], jax.Array], embeds_BxLxD: jax.Array,
                        mask_BxL: jax.Array, key: jax.Array, *, epsilon: float, step_size: float,
                        steps: int, norm: str = "l2", init_scale: float = 1e-3) -> jax.Array:
    """Average the outer loss over the iterates of an adversarial ascent, scalar.

    `loss = (1 / K) sum_{k=1..K} outer_loss_fn(stop_gradient(delta_k))`, where `delta_1..delta_K`
    are the iterates of `adversarial_perturbation` with `steps=K` (same start, step and
    projection). Differentiating this with respect to the parameters averages their gradients
    over the `K` perturbations, as FreeLB does (Zhu et al., "FreeLB: Enhanced Adversarial Training
    for Natural Language Understanding", 2020). FreeLB itself evaluates the loss at
    `delta_0..delta_{K-1}` and reuses those gradients for the ascent. Here the ascent uses
    `inner_loss_fn`, which may differ from the outer loss, so it costs `K` extra backward passes
    through the embeddings.
    """
    _check_ascent_args(embeds_BxLxD, epsilon, step_size, steps, norm, init_scale)
    mask_BxLx1 = _mask_or_ones(mask_BxL, embeds_BxLxD.shape)[..., None]
    dtype = embeds_BxLxD.dtype
    delta_BxLxD = _random_start(key, embeds_BxLxD.shape, mask_BxLx1, norm, init_scale)
    delta_BxLxD = project_to_ball(delta_BxLxD, epsilon, norm, mask_BxLx1[..., 0])

    def body(delta, _):
        delta = _ascent_step(inner_loss_fn, delta, mask_BxLx1, dtype, epsilon, step_size, norm)
        delta = jax.lax.stop_gradient(delta)
        outer = jnp.asarray(outer_loss_fn(delta.astype(dtype)), jnp.float32)
        return delta, outer

    _, outer_K = jax.lax.scan(body, delta_BxLxD, None, length=steps)
    return jnp.mean(outer_K)
