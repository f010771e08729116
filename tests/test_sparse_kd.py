"""Top-k sparse distillation against a float64 NumPy reference and the dense forward KL."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ckt_jax import losses


def np_log_softmax(z):
    finite_max = np.max(np.where(np.isfinite(z), z, -np.inf), -1, keepdims=True)
    shifted = z - finite_max
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def np_plogp_ratio(log_p, log_q):
    """Sum of p (log p - log q) with 0 log 0 = 0, in float64."""
    p = np.exp(log_p)
    with np.errstate(invalid="ignore"):
        terms = np.where(p > 0, p * (log_p - log_q), 0.0)
    return terms.sum(-1)


def np_sparse_kl(student, teacher, indices, temperature, tail):
    """Reference from the full float64 teacher distribution, with the indices of the cache."""
    log_p = np_log_softmax(teacher.astype(np.float64) / temperature)
    log_q = np_log_softmax(student.astype(np.float64) / temperature)
    log_p_k = np.take_along_axis(log_p, indices, -1)
    log_q_k = np.take_along_axis(log_q, indices, -1)
    if tail == "renormalize":
        log_p_k = np_log_softmax(log_p_k)
        log_q_k = np_log_softmax(log_q_k)
        return temperature**2 * np_plogp_ratio(log_p_k, log_q_k)

    outside = np.ones(log_p.shape, bool)
    np.put_along_axis(outside, indices, False, -1)
    p_rest = np.where(outside, np.exp(log_p), 0.0).sum(-1)
    q_rest = np.where(outside, np.exp(log_q), 0.0).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        rest = np.where(p_rest > 0, p_rest * (np.log(p_rest) - np.log(q_rest)), 0.0)
    return temperature**2 * (np_plogp_ratio(log_p_k, log_q_k) + rest)


def logits_pair(seed, shape=(2, 4, 13), scale=3.0):
    rng = np.random.default_rng(seed)
    student = (rng.normal(size=shape) * scale).astype(np.float32)
    teacher = (rng.normal(size=shape) * scale).astype(np.float32)
    return student, teacher




@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("case", ["moderate", "extreme", "masked"])
def test_sparse_kl_matches_numpy(tail, temperature, case):
    student, teacher = logits_pair(0, scale=1e4 if case == "extreme" else 3.0)
    if case == "masked":
        # Tokens 0-5 are masked in the teacher, so top-8 contains two -inf log-probabilities.
        # The student masks tokens 0-2, where the teacher has no mass.
        teacher[..., :6] = -np.inf
        student[..., :3] = -np.inf
    for k in (1, 3, 8, 13):
        indices, log_probs = losses.teacher_top_k(jnp.asarray(teacher), k, temperature)
        got = losses.sparse_forward_kl(jnp.asarray(student), indices, log_probs, temperature,
                                       tail=tail)
        expected = np_sparse_kl(student, teacher, np.asarray(indices), temperature, tail)
        assert got.shape == student.shape[:-1]
        assert np.all(np.isfinite(np.asarray(got))), (case, k)
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5,
                                   atol=1e-5 * temperature**2, err_msg=f"{case} k={k}")


def test_teacher_top_k_values_and_dtypes():
    _, teacher = logits_pair(1)
    indices, log_probs = losses.teacher_top_k(jnp.asarray(teacher, jnp.bfloat16), 4, 2.0)
    assert indices.dtype == jnp.int32
    assert log_probs.dtype == jnp.float32
    assert indices.shape == (2, 4, 4)

    full = np_log_softmax(np.asarray(jnp.asarray(teacher, jnp.bfloat16), np.float64) / 2.0)
    expected_indices = np.argsort(-full, -1)[..., :4]
    np.testing.assert_array_equal(np.asarray(indices), expected_indices)
    np.testing.assert_allclose(np.asarray(log_probs),
                               np.take_along_axis(full, expected_indices, -1), rtol=1e-5)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_sparse_kl_equals_dense_at_full_vocabulary(temperature):
    student, teacher = logits_pair(2)
    dense = losses.forward_kl(jnp.asarray(student), jnp.asarray(teacher), temperature)
    indices, log_probs = losses.teacher_top_k(jnp.asarray(teacher), 13, temperature)
    for tail in ("bucket", "renormalize"):
        sparse = losses.sparse_forward_kl(jnp.asarray(student), indices, log_probs, temperature,
                                          tail=tail)
        np.testing.assert_allclose(np.asarray(sparse), np.asarray(dense), rtol=1e-5, atol=1e-6,
                                   err_msg=tail)


def test_bucket_kl_increases_toward_dense():
    student, teacher = logits_pair(3)
    dense = np.asarray(losses.forward_kl(jnp.asarray(student), jnp.asarray(teacher)))
    previous = np.zeros_like(dense)
    for k in range(1, 14):
        indices, log_probs = losses.teacher_top_k(jnp.asarray(teacher), k)
        value = np.asarray(losses.sparse_forward_kl(jnp.asarray(student), indices, log_probs))
        assert np.all(value >= previous - 1e-6), k
        assert np.all(value <= dense + 1e-5), k
        previous = value
    np.testing.assert_allclose(previous, dense, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_exact_tail_matches_numpy_where_sum_rounds(temperature):
    # The teacher leaves e^-15 / 6 outside its top-6, below float32 rounding of 1 - sum p, while
    # the student's remainder is e^-175 / 6, so |log(p_rest / q_rest)| is large.
    student = np.full((1, 2, 7), 175.0, np.float32)
    teacher = np.full((1, 2, 7), 15.0, np.float32)
    student[..., 0] = 0.0
    teacher[..., 0] = 0.0
    teacher[0, 1, 0] = -np.inf
    indices, log_probs = losses.teacher_top_k(jnp.asarray(teacher), 6, temperature)

    tail_log_mass = losses.teacher_tail_log_mass(jnp.asarray(teacher), indices, temperature)
    expected_tail = np_log_softmax(teacher.astype(np.float64) / temperature)[..., 0]
    np.testing.assert_allclose(np.asarray(tail_log_mass)[0, 0], expected_tail[0, 0], rtol=1e-6)
    assert np.asarray(tail_log_mass)[0, 1] == -np.inf

    got = losses.sparse_forward_kl(jnp.asarray(student), indices, log_probs, temperature,
                                   teacher_tail_log_mass_BxL=tail_log_mass)
    expected = np_sparse_kl(student, teacher, np.asarray(indices), temperature, "bucket")
    # The top-6 terms carry float32 rounding of about 1e-7 (times T^2) however the tail is found.
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=2e-7 * temperature**2)
    dense = losses.forward_kl(jnp.asarray(student), jnp.asarray(teacher), temperature)
    np.testing.assert_allclose(np.asarray(got), np.asarray(dense), rtol=1e-5,
                               atol=2e-7 * temperature**2)

    # Without the exact remainder the value is off by about 1e-7 * |log(p_rest / q_rest)|.
    approximate = losses.sparse_forward_kl(jnp.asarray(student), indices, log_probs, temperature)
    error_bound = 6 * 2 * np.finfo(np.float32).eps * (20 + 175 / temperature) * temperature**2
    assert np.all(np.abs(np.asarray(approximate) - expected) <= error_bound)

    with pytest.raises(ValueError, match="teacher_tail_log_mass shape"):
        losses.sparse_forward_kl(jnp.asarray(student), indices, log_probs,
                                 teacher_tail_log_mass_BxL=tail_log_mass[:, :1])


def test_sparse_kl_infinite_when_student_masks_teacher_token():
    student, teacher = logits_pair(4)
    student[0, 0, np.argmax(teacher[0, 0])] = -np.inf
    indices, log_probs = losses.teacher_top_k(jnp.asarray(teacher), 3)
    for tail in ("bucket", "renormalize"):
        value = np.asarray(losses.sparse_forward_kl(jnp.asarray(student), indices, log_probs,
                                                    tail=tail))
        assert value[0, 0] == np.inf, tail
        assert np.all(np.isfinite(value.reshape(-1)[1:])), tail


def test_bucket_kl_infinite_when_student_tail_masked():
    student, teacher = logits_pair(5)
    indices, log_probs = losses.teacher_top_k(jnp.asarray(teacher), 3)
    # The student masks every token outside the teacher's top-3, where the teacher has mass.
    outside = np.ones(student.shape, bool)
    np.put_along_axis(outside, np.asarray(indices), False, -1)
    student[outside] = -np.inf
    value = np.asarray(losses.sparse_forward_kl(jnp.asarray(student), indices, log_probs))
    assert np.all(value == np.inf)


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_sparse_kl_gradient_finite_with_masks(tail):
    student, teacher = logits_pair(6)
    teacher[..., :4] = -np.inf
    student[..., :2] = -np.inf
    for k in (3, 13):
        indices, log_probs = losses.teacher_top_k(jnp.asarray(teacher), k, 2.0)
        grad = jax.grad(lambda s: jnp.sum(losses.sparse_forward_kl(
                s, indices, log_probs, 2.0, tail=tail)))(jnp.asarray(student))
        assert np.all(np.isfinite(np.asarray(grad)[..., 2:])), k


def test_sparse_kl_gradient_matches_dense_at_full_vocabulary():
    student, teacher = logits_pair(7)
    indices, log_probs = losses.teacher_top_k(jnp.asarray(teacher), 13)
    sparse_grad = jax.grad(lambda s: jnp.sum(losses.sparse_forward_kl(s, indices, log_probs)))(
            jnp.asarray(student))
    dense_grad = jax.grad(lambda s: jnp.sum(losses.forward_kl(s, jnp.asarray(teacher))))(
            jnp.asarray(student))
    np.testing.assert_allclose(np.asarray(sparse_grad), np.asarray(dense_grad), atol=1e-5)


def test_sparse_kl_rejects_bad_arguments():
    student, teacher = logits_pair(8)
    with pytest.raises(ValueError, match="k=0"):
        losses.teacher_top_k(jnp.asarray(teacher), 0)
    with pytest.raises(ValueError, match="k=14"):
        losses.teacher_top_k(jnp.asarray(teacher), 14)
    indices, log_probs = losses.teacher_top_k(jnp.asarray(teacher), 3)
    with pytest.raises(ValueError, match="'dense'"):
        losses.sparse_forward_kl(jnp.asarray(student), indices, log_probs, tail="dense")
    with pytest.raises(ValueError, match="differs"):
        losses.sparse_forward_kl(jnp.asarray(student), indices, log_probs[..., :2])
    with pytest.raises(ValueError, match="temperature=-1"):
        losses.sparse_forward_kl(jnp.asarray(student), indices, log_probs, temperature=-1.0)
