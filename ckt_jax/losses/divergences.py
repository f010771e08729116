"""Token-level divergences between teacher and student next-token distributions.

Every function takes logits shaped `[..., V]` (any leading shape, typically `B x L`), works in
float32 whatever the input dtype, and returns one value per position, shape `[...]`, with no
reduction: combine it with a mask through `ckt_jax.losses.reductions`. With `temperature=T`, both
distributions are `softmax(logits / T)` and the result is multiplied by `T**2`, so that gradient
magnitudes stay comparable across temperatures (Hinton, Vinyals and Dean, "Distilling the Knowledge
in a Neural Network", 2015).

Vocabulary entries whose logit is `-inf` (masked tokens) have probability 0 and contribute 0; a
position where the teacher puts mass on a token that the student masks out has an infinite
forward KL, which is the true value.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _log_probs(logits_xV: jax.Array, temperature: float) -> jax.Array:
    return jax.nn.log_softmax(jnp.asarray(logits_xV, jnp.float32) / temperature, axis=-1)


def _finite(log_p_xV: jax.Array) -> jax.Array:
    """Replace -inf log-probabilities by -1e30 so `logaddexp` has a finite gradient there."""
    return jnp.maximum(log_p_xV, -1e30)


def _kl_from_log_probs(log_p_xV: jax.Array, log_q_xV: jax.Array) -> jax.Array:
    """KL(p || q) summed over the vocabulary, with 0 * log 0 taken as 0."""
    p_xV = jnp.exp(log_p_xV)
    support_xV = p_xV > 0
    # Replace -inf by 0 where p == 0 before multiplying, so neither the value nor the gradient is NaN.
    safe_log_p = jnp.where(support_xV, log_p_xV, 0.0)
    safe_log_q = jnp.where(support_xV, log_q_xV, 0.0)
    return jnp.sum(jnp.where(support_xV, p_xV * (safe_log_p - safe_log_q), 0.0), axis=-1)


def forward_kl(student_logits: jax.Array, teacher_logits: jax.Array,
               temperature: float = 1.0) -> jax.Array:
    """Forward KL, `T^2 * KL(p_teacher || q_student)`, per position.

    Mean-seeking: the student is pushed to cover every token the teacher gives mass to. This is the
    classic distillation loss.
    """
    log_p = _log_probs(teacher_logits, temperature)
    log_q = _log_probs(student_logits, temperature)
    return temperature**2 * _kl_from_log_probs(log_p, log_q)


def reverse_kl(student_logits: jax.Array, teacher_logits: jax.Array,
               temperature: float = 1.0) -> jax.Array:
    """Reverse KL, `T^2 * KL(q_student || p_teacher)`, per position (mode-seeking)."""
    log_p = _log_probs(teacher_logits, temperature)
    log_q = _log_probs(student_logits, temperature)
    return temperature**2 * _kl_from_log_probs(log_q, log_p)


def generalized_jsd(student_logits: jax.Array, teacher_logits: jax.Array, beta: float = 0.5,
                    temperature: float = 1.0) -> jax.Array:
    """Generalized Jensen-Shannon divergence with interpolation weight `beta`, per position.

    `JSD_beta = beta * KL(p || m) + (1 - beta) * KL(q || m)` with `m = beta * p + (1 - beta) * q`,
    where `p` is the teacher and `q` the student (Agarwal et al., "On-Policy Distillation of Language
    Models", 2024). `beta = 0.5` is the symmetric JSD, bounded by `log 2` (times `T^2`). Both limits
    `beta -> 0` and `beta -> 1` give 0; divided by `beta` (resp. `1 - beta`) the term tends to the
    forward (resp. reverse) KL.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta={beta} is outside [0, 1]; pass an interpolation weight in [0, 1]")
    log_p = _log_probs(teacher_logits, temperature)
    log_q = _log_probs(student_logits, temperature)
    # log m = logsumexp([log p + log beta, log q + log(1 - beta)]), computed stably.
    log_m = jnp.logaddexp(_finite(log_p) + jnp.log(beta), _finite(log_q) + jnp.log1p(-beta))
    value = beta * _kl_from_log_probs(log_p, log_m) + (1.0 - beta) * _kl_from_log_probs(log_q, log_m)
    return temperature**2 * value


def skew_kl(student_logits: jax.Array, teacher_logits: jax.Array, alpha: float = 0.1,
            temperature: float = 1.0) -> jax.Array:
    """Skewed forward KL, `T^2 * KL(p || alpha * p + (1 - alpha) * q)`, per position.

    Mixing a share `alpha` of the teacher into the student keeps the value finite where the student
    assigns (near) zero probability (Ko et al., "DistiLLM", 2024). `alpha = 0` is the forward KL.
    """
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha={alpha} is outside [0, 1); pass a skew weight in [0, 1)")
    log_p = _log_probs(teacher_logits, temperature)
    log_q = _log_probs(student_logits, temperature)
    if alpha == 0.0:
        return temperature**2 * _kl_from_log_probs(log_p, log_q)
    log_mix = jnp.logaddexp(_finite(log_p) + jnp.log(alpha), _finite(log_q) + jnp.log1p(-alpha))
    return temperature**2 * _kl_from_log_probs(log_p, log_mix)


def total_variation(student_logits: jax.Array, teacher_logits: jax.Array,
                    temperature: float = 1.0) -> jax.Array:
    """Total variation distance `0.5 * sum |p - q|`, per position, in [0, 1].

    No `T^2` factor: TVD is bounded and its gradient does not shrink as `1 / T^2` the way KL's does.
    """
    p = jnp.exp(_log_probs(teacher_logits, temperature))
    q = jnp.exp(_log_probs(student_logits, temperature))
    return 0.5 * jnp.sum(jnp.abs(p - q), axis=-1)


def symmetric_kl(logits_a: jax.Array, logits_b: jax.Array, temperature: float = 1.0) -> jax.Array:
    """`T^2 * (KL(a || b) + KL(b || a)) / 2` per position; gradients flow into both sides."""
    log_a = _log_probs(logits_a, temperature)
    log_b = _log_probs(logits_b, temperature)
    return 0.5 * temperature**2 * (_kl_from_log_probs(log_a, log_b) + _kl_from_log_probs(log_b, log_a))


DIVERGENCES = {
        "forward_kl": forward_kl,
        "reverse_kl": reverse_kl,
        "jsd": generalized_jsd,
        "skew_kl": skew_kl,
        "tvd": total_variation,
}
