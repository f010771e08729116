"""Contrastive representation terms against NumPy references, and sharded against unsharded."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ckt_jax import losses
from ckt_jax.losses import contrastive


def np_normalize(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_logsumexp(z, axis=-1):
    top = z.max(axis, keepdims=True)
    return (top + np.log(np.exp(z - top).sum(axis, keepdims=True))).squeeze(axis)


def np_info_nce(student, teacher, temperature, symmetric=False):
    s, t = np_normalize(student), np_normalize(teacher)
    logits = s @ t.T / temperature
    forward = np_logsumexp(logits, 1) - np.diag(logits)
    if not symmetric:
        return forward
    backward = np_logsumexp(logits.T, 1) - np.diag(logits)
    return 0.5 * (forward + backward)


def np_supcon(student, labels, temperature, valid):
    z = np_normalize(student)
    logits = z @ z.T / temperature
    n = len(labels)
    out = np.zeros(n)
    for i in range(n):
        others = [a for a in range(n) if a != i and valid[a]]
        positives = [p for p in others if labels[p] == labels[i]]
        if not valid[i] or not positives:
            continue
        log_denominator = np_logsumexp(logits[i, others], 0)
        out[i] = -np.mean([logits[i, p] - log_denominator for p in positives])
    return out


def np_relation(student, teacher, valid):
    s, t = np_normalize(student), np_normalize(teacher)
    diff = (s @ s.T - t @ t.T) ** 2
    pairs = [(i, j) for i in range(len(s)) for j in range(len(s))
             if i != j and valid[i] and valid[j]]
    return np.mean([diff[i, j] for i, j in pairs]) if pairs else 0.0


def representations(seed, batch=6, dim=5):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(batch, dim)), rng.normal(size=(batch, dim))


def test_pool_hidden_mean_and_last():
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(3, 4, 2))
    mask = np.array([[1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 0, 0]])

    mean = np.asarray(losses.pool_hidden(jnp.asarray(hidden), jnp.asarray(mask), "mean"))
    np.testing.assert_allclose(mean[0], hidden[0, :3].mean(0), rtol=1e-6)
    np.testing.assert_allclose(mean[1], hidden[1, 1:].mean(0), rtol=1e-6)
    np.testing.assert_array_equal(mean[2], 0.0)

    last = np.asarray(losses.pool_hidden(jnp.asarray(hidden), jnp.asarray(mask), "last"))
    np.testing.assert_allclose(last[0], hidden[0, 2], rtol=1e-6)
    np.testing.assert_allclose(last[1], hidden[1, 3], rtol=1e-6)
    np.testing.assert_array_equal(last[2], 0.0)
    assert last.dtype == np.float32

    with pytest.raises(ValueError, match="'max'"):
        losses.pool_hidden(jnp.asarray(hidden), jnp.asarray(mask), "max")


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("temperature", [0.1, 1.0])
def test_info_nce_matches_numpy(symmetric, temperature):
    student, teacher = representations(1)
    got = losses.info_nce(jnp.asarray(student, jnp.float32), jnp.asarray(teacher, jnp.float32),
                          temperature, symmetric=symmetric)
    expected = np_info_nce(student, teacher, temperature, symmetric)
    assert got.shape == (6,)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)


def test_info_nce_mask_drops_rows():
    student, teacher = representations(2)
    valid = np.array([True, False, True, True, False, True])
    got = losses.info_nce(jnp.asarray(student, jnp.float32), jnp.asarray(teacher, jnp.float32),
                          0.2, mask_B=jnp.asarray(valid))
    expected = np_info_nce(student[valid], teacher[valid], 0.2)
    np.testing.assert_allclose(np.asarray(got)[valid], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(got)[~valid], 0.0)


@pytest.mark.parametrize("symmetric", [False, True])
def test_info_nce_gradient_finite_differences(symmetric):
    student, teacher = representations(3)
    teacher = jnp.asarray(teacher, jnp.float32)

    def total(x):
        return jnp.sum(losses.info_nce(x, teacher, 0.5, symmetric=symmetric))

    x = jnp.asarray(student, jnp.float32)
    grad = np.asarray(jax.grad(total)(x), np.float64)
    rng = np.random.default_rng(4)
    for _ in range(3):
        direction = rng.normal(size=x.shape)
        step = 1e-2
        plus = float(total(x + step * jnp.asarray(direction, jnp.float32)))
        minus = float(total(x - step * jnp.asarray(direction, jnp.float32)))
        numeric = (plus - minus) / (2 * step)
        analytic = float(np.sum(grad * direction))
        # Central differences in float32 with step 1e-2: truncation ~1e-4, rounding ~1e-5.
        assert abs(numeric - analytic) <= 2e-3 * max(1.0, abs(analytic)), (numeric, analytic)


def test_info_nce_lower_for_aligned_pairs():
    rng = np.random.default_rng(5)
    teacher = rng.normal(size=(8, 16))
    student = teacher + 0.1 * rng.normal(size=teacher.shape)
    shuffled = student[rng.permutation(8)]
    aligned = float(jnp.mean(losses.info_nce(jnp.asarray(student, jnp.float32),
                                             jnp.asarray(teacher, jnp.float32))))
    mismatched = float(jnp.mean(losses.info_nce(jnp.asarray(shuffled, jnp.float32),
                                                jnp.asarray(teacher, jnp.float32))))
    assert aligned < 0.1
    assert mismatched > aligned + 1.0


def test_info_nce_rejects_bad_input():
    student, teacher = representations(6)
    with pytest.raises(ValueError, match="temperature=0"):
        losses.info_nce(jnp.asarray(student), jnp.asarray(teacher), temperature=0.0)
    with pytest.raises(ValueError, match="are invalid"):
        losses.info_nce(jnp.asarray(student), jnp.asarray(teacher[:3]))


def test_supervised_contrastive_matches_numpy():
    student, _ = representations(7, batch=7)
    labels = np.array([1, 0, 1, 1, 0, 0, 2])
    valid = np.array([True, True, True, False, True, True, True])
    got = losses.supervised_contrastive(jnp.asarray(student, jnp.float32), jnp.asarray(labels),
                                        0.3, mask_B=jnp.asarray(valid))
    expected = np_supcon(student, labels, 0.3, valid)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)
    # Row 6 is the only one of its class, so it has no positive and contributes 0.
    assert float(got[6]) == 0.0


def test_supcon_empty_denominator_gradient_finite():
    student = jnp.ones((2, 3), jnp.float32)
    grad = jax.grad(lambda x: jnp.sum(losses.supervised_contrastive(
            x, jnp.array([0, 0]), mask_B=jnp.array([True, False]))))(student)
    assert np.all(np.isfinite(np.asarray(grad)))


def test_relation_matching_matches_numpy():
    student, teacher = representations(8)
    valid = np.array([True, True, False, True, True, True])
    got = losses.relation_matching(jnp.asarray(student, jnp.float32),
                                   jnp.asarray(teacher, jnp.float32), mask_B=jnp.asarray(valid))
    np.testing.assert_allclose(float(got), np_relation(student, teacher, valid), rtol=1e-5)
    same = losses.relation_matching(jnp.asarray(teacher * 3.0, jnp.float32),
                                    jnp.asarray(teacher, jnp.float32))
    assert float(same) < 1e-10


def test_projection_head_parameter_key():
    for head in (losses.ProjectionHead(features=4),
                 losses.ProjectionHead(features=4, hidden_features=8)):
        params = losses.init_projection_head(head, jax.random.key(0), input_dim=6)
        assert list(params) == [losses.CONTRASTIVE_HEAD] == ["contrastive_head"]
        x = jnp.ones((3, 6), jnp.bfloat16)
        out = losses.apply_projection_head(head, params, x)
        assert out.shape == (3, 4)
        assert out.dtype == jnp.float32
    paths = jax.tree_util.tree_flatten_with_path(params)[0]
    names = {"/".join(str(k.key) for k in path) for path, _ in paths}
    assert names == {"contrastive_head/hidden/kernel", "contrastive_head/hidden/bias",
                     "contrastive_head/output/kernel", "contrastive_head/output/bias"}
    with pytest.raises(KeyError, match="init_projection_head"):
        losses.apply_projection_head(head, {"model": {}}, x)


SHARDED_SCRIPT = textwrap.dedent("""
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import PartitionSpec as P
    from ckt_jax import losses

    assert jax.device_count() == 8, jax.devices()
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rng = np.random.default_rng(0)
    student = jnp.asarray(rng.normal(size=(16, 5)), jnp.float32)
    teacher = jnp.asarray(rng.normal(size=(16, 5)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 2, size=16))
    valid = jnp.asarray(rng.random(16) > 0.2)

    def sharded(fn, out_spec):
        return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=P("data"), out_specs=out_spec))

    def check(name, got, expected):
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-6,
                                   err_msg=name)

    for symmetric in (False, True):
        def local(s, t, m):
            return losses.info_nce(s, t, 0.2, symmetric, axis_name="data", mask_B=m)
        def full(s, t, m):
            return losses.info_nce(s, t, 0.2, symmetric, mask_B=m)
        check(f"info_nce symmetric={symmetric}", sharded(local, P("data"))(student, teacher, valid),
              full(student, teacher, valid))
        check(f"info_nce mean symmetric={symmetric}",
              jnp.mean(sharded(local, P("data"))(student, teacher, valid)),
              jnp.mean(full(student, teacher, valid)))
        grad_sharded = jax.grad(lambda s: jnp.sum(sharded(local, P("data"))(s, teacher, valid)))
        grad_full = jax.grad(lambda s: jnp.sum(full(s, teacher, valid)))
        check(f"info_nce gradient symmetric={symmetric}", grad_sharded(student), grad_full(student))

    def local_supcon(s, y, m):
        return losses.supervised_contrastive(s, y, 0.2, mask_B=m, axis_name="data")
    check("supervised_contrastive", sharded(local_supcon, P("data"))(student, labels, valid),
          losses.supervised_contrastive(student, labels, 0.2, mask_B=valid))

    def local_relation(s, t, m):
        return losses.relation_matching(s, t, mask_B=m, axis_name="data")
    relation = sharded(local_relation, P())
    check("relation_matching", relation(student, teacher, valid),
          losses.relation_matching(student, teacher, mask_B=valid))
    check("relation_matching gradient",
          jax.grad(lambda s: relation(s, teacher, valid))(student),
          jax.grad(lambda s: losses.relation_matching(s, teacher, mask_B=valid))(student))
    print("sharded terms match")
""")


def test_sharded_terms_match_single_device():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "sharded terms match" in result.stdout


def test_gather_helpers_are_identity_without_axis():
    x = jnp.arange(6.0).reshape(3, 2)
    assert contrastive._gather(x, None) is x
    assert contrastive._row_offset(3, None) == 0
