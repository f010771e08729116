"""Regularization terms on adapter parameters."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ckt_jax.losses.divergences import forward_kl


def l2_penalty(params) -> jax.Array:
    """`0.5 * sum ||w||^2` over every leaf of `params` (pass only the adapter tree), float32."""
    leaves = jax.tree_util.tree_leaves(params)
    if not leaves:
        return jnp.zeros((), jnp.float32)
    return 0.5 * sum(jnp.sum(jnp.square(jnp.asarray(x, jnp.float32))) for x in leaves)


def lora_delta_penalty(adapter_params, scale: float) -> jax.Array:
    """`0.5 * sum ||scale * A @ B||_F^2` over every LoRA pair: the size of the weight change.

    Penalising the update `scale * A @ B` instead of `A` and `B` themselves leaves the random
    initialisation of `A` alone (B starts at zero, so the penalty starts at zero). Computed with
    `||A B||_F^2 = sum((A^T A) * (B B^T))`, which needs only rank x rank matrices. Expects the
    adapter tree layout of `ckt_jax.model` (`lora_a` [..., in, r] next to `lora_b` [..., r, out]).
    """
    total = jnp.zeros((), jnp.float32)

    def visit(node):
        nonlocal total
        if not isinstance(node, dict):
            return
        if "lora_a" in node and "lora_b" in node:
            a = jnp.asarray(node["lora_a"], jnp.float32)
            b = jnp.asarray(node["lora_b"], jnp.float32)
            gram_a = jnp.einsum("...ir,...is->...rs", a, a)
            gram_b = jnp.einsum("...ro,...so->...rs", b, b)
            total = total + jnp.sum(gram_a * gram_b)
        for key, child in node.items():
            if key not in ("lora_a", "lora_b"):
                visit(child)

    visit(adapter_params)
    return 0.5 * scale**2 * total


def kl_to_base(student_logits: jax.Array, base_logits: jax.Array,
               temperature: float = 1.0) -> jax.Array:
    """Forward KL from the base model to the student, `T^2 * KL(p_base || q_student)`, per position.

    Keeps the student's next-token distribution close to the unadapted base model, so helpfulness
    is preserved. Mask it to benign rows before reducing, because on harmful rows the student is
    meant to move away from the base. This is the KL penalty to a reference policy used in RLHF
    (Ouyang et al., "Training Language Models to Follow Instructions with Human Feedback", 2022),
    taken here in the forward direction so the student keeps every token the base gives mass to.
    """
    return forward_kl(student_logits, base_logits, temperature)
