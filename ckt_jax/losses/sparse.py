"""Forward KL from a cache of the teacher's top-k log-probabilities instead of its full logits.

`teacher_top_k` turns teacher logits `B x L x V` into `K` indices and log-probabilities per
position, which can be stored once and reused every epoch. `sparse_forward_kl` compares the
student's full distribution with that cache. The cache must be built with the same temperature
that is passed to `sparse_forward_kl`, because the cached values are `log softmax(z / T)`.

Like the dense divergences, the result is one value per position, multiplied by `T**2`
(Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural Network", 2015), and computed in
float32 whatever the input dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SPARSE_TAILS = ("bucket", "renormalize")


def _check_temperature(temperature: float) -> None:
    """Raise ValueError for a non-positive Python number; a traced temperature is not checked."""
    if isinstance(temperature, (int, float)) and not temperature > 0:
        raise ValueError(f"temperature={temperature} is not positive; pass a temperature > 0")


def teacher_top_k(teacher_logits_BxLxV: jax.Array, k: int,
                  temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """Select the teacher's `k` most likely tokens per position.

    Returns `(indices_BxLxK int32, log_probs_BxLxK float32)` where
    `log_probs = log softmax(teacher_logits / T)[indices]`, the log-probabilities of the full
    temperature-scaled softmax (not renormalised over the `k` tokens), in decreasing order. Ties
    are broken by `jax.lax.top_k`, which prefers the lower index.
    """
    _check_temperature(temperature)
    vocab = teacher_logits_BxLxV.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"k={k} is outside [1, {vocab}]; pass 1 <= k <= vocabulary size")
    log_probs_BxLxV = jax.nn.log_softmax(
            jnp.asarray(teacher_logits_BxLxV, jnp.float32) / temperature, axis=-1)
    log_probs_BxLxK, indices_BxLxK = jax.lax.top_k(log_probs_BxLxV, k)
    return indices_BxLxK.astype(jnp.int32), log_probs_BxLxK


def teacher_tail_log_mass(teacher_logits_BxLxV: jax.Array, indices_BxLxK: jax.Array,
                          temperature: float = 1.0) -> jax.Array:
    """Compute the teacher's log-probability mass outside the cached indices, shape `B x L`.

    `log sum_{v not in S} softmax(teacher_logits / T)_v`, summed over the entries themselves
    (`-inf` where nothing is left). Storing it next to the top-k cache lets `sparse_forward_kl`
    use the exact remainder instead of `1 - sum_{v in S} p_v`, which float32 rounding limits to
    about `K * 1e-7`.
    """
    _check_temperature(temperature)
    log_probs_BxLxV = jax.nn.log_softmax(
            jnp.asarray(teacher_logits_BxLxV, jnp.float32) / temperature, axis=-1)
    return _tail_log_mass(log_probs_BxLxV, indices_BxLxK)


def _safe_kl_terms(log_p_xK: jax.Array, log_q_xK: jax.Array) -> jax.Array:
    """`p * (log p - log q)` per entry, 0 where `p == 0`, with no NaN in value or gradient."""
    p_xK = jnp.exp(log_p_xK)
    support_xK = p_xK > 0
    safe_log_p = jnp.where(support_xK, log_p_xK, 0.0)
    safe_log_q = jnp.where(support_xK, log_q_xK, 0.0)
    return jnp.where(support_xK, p_xK * (safe_log_p - safe_log_q), 0.0)


def _tail_log_mass(log_q_xV: jax.Array, indices_xK: jax.Array) -> jax.Array:
    """`log sum_{v not in indices} q_v`, computed from the entries themselves, not as `1 - sum`."""
    in_top_k_xV = jnp.put_along_axis(
            jnp.zeros(log_q_xV.shape, bool), indices_xK, True, axis=-1, inplace=False)
    outside_xV = ~in_top_k_xV & (log_q_xV > -jnp.inf)
    has_tail_x = jnp.any(outside_xV, axis=-1)
    # logsumexp over only -inf entries is -inf with a NaN gradient, so feed it zeros there.
    masked_xV = jnp.where(outside_xV, log_q_xV, -jnp.inf)
    masked_xV = jnp.where(has_tail_x[..., None], masked_xV, 0.0)
    return jnp.where(has_tail_x, jax.nn.logsumexp(masked_xV, axis=-1), -jnp.inf)


def _bucket_kl(log_q_xV, indices_xK, log_p_xK, log_q_xK, log_p_tail_x):
    top_k_x = jnp.sum(_safe_kl_terms(log_p_xK, log_q_xK), axis=-1)

    top_k_count = log_p_xK.shape[-1]
    if log_p_tail_x is None:
        # NOTE: the remainder is then known only to float32 rounding of the sum (about K * 1e-7),
        # so the tail term has an absolute error up to about that times |log(p_rest / q_rest)|.
        p_tail_x = jnp.maximum(1.0 - jnp.sum(jnp.exp(log_p_xK), axis=-1), 0.0)
        rounding = top_k_count * jnp.finfo(jnp.float32).eps
    else:
        p_tail_x = jnp.exp(jnp.asarray(log_p_tail_x, jnp.float32))
        rounding = 0.0
    log_q_tail_x = _tail_log_mass(log_q_xV, indices_xK)
    has_q_tail_x = log_q_tail_x > -jnp.inf
    use_tail_x = (p_tail_x > 0) & has_q_tail_x
    safe_p_tail_x = jnp.where(use_tail_x, p_tail_x, 1.0)
    safe_log_q_tail_x = jnp.where(use_tail_x, log_q_tail_x, 0.0)
    tail_x = jnp.where(
            use_tail_x, p_tail_x * (jnp.log(safe_p_tail_x) - safe_log_q_tail_x), 0.0)

    # When the student has no mass outside the top-k (k = V, or the rest masked to -inf), a teacher
    # remainder within the rounding of `1 - sum` counts as 0. A larger remainder makes the KL
    # infinite, as the dense forward KL is.
    missing_tail_x = ~has_q_tail_x & (p_tail_x > rounding)
    return jnp.where(missing_tail_x, jnp.inf, top_k_x + tail_x)


def _renormalized_kl(log_p_xK, scaled_student_xK):
    """KL between the teacher and student distributions renormalised over the cached tokens."""
    log_p_xK = log_p_xK - jax.nn.logsumexp(log_p_xK, axis=-1, keepdims=True)
    # Renormalising the student's scaled logits, not its full log-probabilities, avoids the
    # float32 rounding of a large log-partition (1e-3 at 1e4) that log_softmax would add.
    # A student that masks every cached token has no distribution over them: the KL is infinite.
    has_q_mass_x = jnp.any(scaled_student_xK > -jnp.inf, axis=-1)
    safe_student_xK = jnp.where(has_q_mass_x[..., None], scaled_student_xK, 0.0)
    log_q_xK = jax.nn.log_softmax(safe_student_xK, axis=-1)
    value_x = jnp.sum(_safe_kl_terms(log_p_xK, log_q_xK), axis=-1)
    return jnp.where(has_q_mass_x, value_x, jnp.inf)


def sparse_forward_kl(student_logits_BxLxV: jax.Array, indices_BxLxK: jax.Array,
                      teacher_log_probs_BxLxK: jax.Array, temperature: float = 1.0,
                      tail: str = "bucket",
                      teacher_tail_log_mass_BxL: jax.Array | None = None) -> jax.Array:
    """Forward KL from the teacher's cached top-k to the student, `B x L`, times `T**2`.

    With `S` the cached indices, `p` the teacher's and `q = softmax(student_logits / T)` the
    student's distribution:

    - `tail="bucket"` (default) treats everything outside `S` as one extra outcome:
      `sum_{v in S} p_v log(p_v / q_v) + p_rest log(p_rest / q_rest)` with
      `p_rest = 1 - sum_{v in S} p_v` and `q_rest = sum_{v not in S} q_v`. This is the exact KL
      between two distributions over `K + 1` outcomes, so by the data-processing inequality it is
      a lower bound on the full KL. It never decreases as `k` grows (each new token splits the
      remainder), up to the rounding of `p_rest` described below, and it equals the dense
      `forward_kl` at `k = V`.
    - `tail="renormalize"` renormalises both distributions over `S`:
      `sum_{v in S} p'_v log(p'_v / q'_v)` with `p'_v = p_v / sum_S p` and `q'_v = q_v / sum_S q`.
      It ignores how much mass the student puts outside `S`, is not a bound on the full KL, and
      also equals `forward_kl` at `k = V`.

    Bucket is the default because it still penalises a student that spreads mass over tokens the
    teacher rules out.

    `teacher_log_probs_BxLxK` must be `teacher_top_k(..., temperature=T)[1]` with the same `T`.
    Entries of `-inf` (teacher tokens with probability 0) contribute 0. For the bucket tail,
    pass `teacher_tail_log_mass(..., temperature=T)` as `teacher_tail_log_mass_BxL` to use the
    exact teacher remainder. Without it `p_rest = 1 - sum_S p`, whose float32 rounding (about
    `K * 1e-7`) gives an absolute error up to about that times `|log(p_rest / q_rest)|`.
    """
    _check_temperature(temperature)
    if tail not in SPARSE_TAILS:
        raise ValueError(f"tail={tail!r} is unknown; use one of {SPARSE_TAILS}")
    if indices_BxLxK.shape != teacher_log_probs_BxLxK.shape:
        raise ValueError(
                f"indices shape {indices_BxLxK.shape} differs from teacher_log_probs shape "
                f"{teacher_log_probs_BxLxK.shape}; pass both outputs of teacher_top_k")
    if indices_BxLxK.shape[:-1] != student_logits_BxLxV.shape[:-1]:
        raise ValueError(f"indices shape {indices_BxLxK.shape} and student logits shape "
                         f"{student_logits_BxLxV.shape} differ in their leading dimensions")

    if (teacher_tail_log_mass_BxL is not None
            and teacher_tail_log_mass_BxL.shape != indices_BxLxK.shape[:-1]):
        raise ValueError(
                f"teacher_tail_log_mass shape {teacher_tail_log_mass_BxL.shape} is not "
                f"{indices_BxLxK.shape[:-1]}; pass the output of teacher_tail_log_mass")

    scaled_student_BxLxV = jnp.asarray(student_logits_BxLxV, jnp.float32) / temperature
    log_p_BxLxK = jnp.asarray(teacher_log_probs_BxLxK, jnp.float32)
    if tail == "bucket":
        log_q_BxLxV = jax.nn.log_softmax(scaled_student_BxLxV, axis=-1)
        log_q_BxLxK = jnp.take_along_axis(log_q_BxLxV, indices_BxLxK, axis=-1)
        value_BxL = _bucket_kl(log_q_BxLxV, indices_BxLxK, log_p_BxLxK, log_q_BxLxK,
                               teacher_tail_log_mass_BxL)
    else:
        scaled_student_BxLxK = jnp.take_along_axis(scaled_student_BxLxV, indices_BxLxK, axis=-1)
        value_BxL = _renormalized_kl(log_p_BxLxK, scaled_student_BxLxK)
    return temperature**2 * value_BxL
