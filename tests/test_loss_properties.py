"""Property tests of the token divergences and the sparse top-k KL on generated logits."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ckt_jax import losses

SHAPE = (2, 3, 7)
VOCAB = SHAPE[-1]
PROPERTY_SETTINGS = settings(max_examples=30, deadline=None, database=None)

logits_arrays = hnp.arrays(np.float32, SHAPE, elements=st.floats(-1e4, 1e4, width=32))
temperatures = st.floats(0.5, 4.0)


def sparse_kl(tail, k, exact_tail=False):
    def divergence(student, teacher, temperature=1.0):
        indices, log_probs = losses.teacher_top_k(teacher, k, temperature)
        tail_log_mass = None
        if exact_tail:
            tail_log_mass = losses.teacher_tail_log_mass(teacher, indices, temperature)
        return losses.sparse_forward_kl(student, indices, log_probs, temperature, tail=tail,
                                        teacher_tail_log_mass_BxL=tail_log_mass)
    return divergence


ALL_DIVERGENCES = dict(losses.DIVERGENCES)
ALL_DIVERGENCES.update({
    "sparse_bucket_k3": sparse_kl("bucket", 3),
    "sparse_renormalize_k3": sparse_kl("renormalize", 3),
    "sparse_bucket_exact_tail_k3": sparse_kl("bucket", 3, exact_tail=True),
    "sparse_bucket_full": sparse_kl("bucket", VOCAB),
})
KL_LIKE = [name for name in ALL_DIVERGENCES if name != "tvd"]


def _value_and_student_grad(fn):
    def run(student, teacher, temperature):
        total = jax.value_and_grad(lambda s: jnp.sum(fn(s, teacher, temperature=temperature)))
        return total(student), fn(student, teacher, temperature=temperature)
    return jax.jit(run)


COMPILED = {name: _value_and_student_grad(fn) for name, fn in ALL_DIVERGENCES.items()}


@functools.cache
def compiled_bucket_kl(k, exact_tail):
    return jax.jit(sparse_kl("bucket", k, exact_tail))


def np_log_softmax(z):
    shifted = z - z.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def np_student_tail_log_mass(student, teacher, temperature, k):
    """`log q_rest` in float64 for the teacher's top-k tokens (the ones `teacher_top_k` picks)."""
    indices = np.asarray(losses.teacher_top_k(jnp.asarray(teacher), k, temperature)[0])
    log_q = np_log_softmax(student.astype(np.float64) / temperature)
    np.put_along_axis(log_q, indices, -np.inf, -1)
    top = log_q.max(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (top + np.log(np.exp(log_q - top).sum(-1, keepdims=True)))[..., 0]


@PROPERTY_SETTINGS
@given(student=logits_arrays, teacher=logits_arrays, temperature=temperatures)
def test_divergences_finite_non_negative(student, teacher, temperature):
    for name, compiled in COMPILED.items():
        (_, grad), value = compiled(student, teacher, temperature)
        value = np.asarray(value)
        assert value.shape == SHAPE[:-1], name
        assert np.all(np.isfinite(value)), (name, value)
        assert np.all(np.isfinite(np.asarray(grad))), name
        if name in KL_LIKE:
            # Float32 rounding leaves about -1e-7 on an unscaled KL near 0, and T^2 scales it.
            assert np.all(value >= -1e-6 * max(1.0, temperature**2)), (name, value.min())


@PROPERTY_SETTINGS
@given(student=logits_arrays, teacher=logits_arrays, temperature=temperatures)
def test_jsd_symmetric_and_tvd_bounded(student, teacher, temperature):
    (_, _), forward = COMPILED["jsd"](student, teacher, temperature)
    (_, _), backward = COMPILED["jsd"](teacher, student, temperature)
    np.testing.assert_allclose(np.asarray(forward), np.asarray(backward), rtol=1e-5,
                               atol=1e-5 * temperature**2)
    assert np.all(np.asarray(forward) <= np.log(2) * temperature**2 * (1 + 1e-5))

    (_, _), tvd = COMPILED["tvd"](student, teacher, temperature)
    assert np.all(np.asarray(tvd) >= 0.0)
    assert np.all(np.asarray(tvd) <= 1.0 + 1e-6)


@PROPERTY_SETTINGS
@given(student=logits_arrays, teacher=logits_arrays, temperature=temperatures)
def test_bucket_kl_converges_to_dense(student, teacher, temperature):
    (_, _), dense = COMPILED["forward_kl"](student, teacher, temperature)
    dense = np.asarray(dense)
    tolerance = 1e-5 * np.maximum(1.0, np.abs(dense)) + 1e-6 * temperature**2
    for exact_tail in (True, False):
        previous = np.zeros_like(dense)
        previous_bound = 0.0
        for k in range(1, VOCAB + 1):
            value = np.asarray(compiled_bucket_kl(k, exact_tail)(student, teacher, temperature))
            bound = tolerance
            if not exact_tail:
                # Rounding of p_rest = 1 - sum p (at most about K * eps) times |log(p / q)|,
                # with |log p_rest| <= 20 once p_rest exceeds that rounding.
                log_q_rest = np_student_tail_log_mass(student, teacher, temperature, k)
                log_q_rest = np.where(np.isfinite(log_q_rest), log_q_rest, 0.0)
                rounding = 2 * k * np.finfo(np.float32).eps
                bound = tolerance + temperature**2 * rounding * (20.0 + np.abs(log_q_rest))
            assert np.all(value >= previous - bound - previous_bound), (exact_tail, k)
            assert np.all(value <= dense + bound), (exact_tail, k)
            previous, previous_bound = value, bound
        np.testing.assert_allclose(previous, dense, rtol=1e-5, atol=1e-6 * temperature**2,
                                   err_msg=f"exact_tail={exact_tail}")


@PROPERTY_SETTINGS
@given(student=logits_arrays, reference=logits_arrays, temperature=temperatures)
def test_kl_regularizers_are_forward_kl(student, reference, temperature):
    student, reference = jnp.asarray(student), jnp.asarray(reference)
    expected = np.asarray(losses.forward_kl(student, reference, temperature))
    np.testing.assert_array_equal(
            np.asarray(losses.kl_to_base(student, reference, temperature)), expected)
    np.testing.assert_array_equal(
            np.asarray(losses.teacher_consistency_loss(student, reference, temperature)),
            expected)
    assert np.all(np.asarray(losses.kl_to_base(student, student, temperature)) <= 1e-6)
