"""Loss terms against float64 NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ckt_jax import losses


def np_softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def np_kl(p, q):
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0)
    return terms.sum(-1)


def random_logits(seed, shape=(2, 5, 11), scale=3.0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=shape) * scale, rng.normal(size=shape) * scale


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
def test_divergences_match_numpy(temperature):
    s, t = random_logits(0)
    p, q = np_softmax(t / temperature), np_softmax(s / temperature)
    m = 0.3 * p + 0.7 * q
    mix = 0.2 * p + 0.8 * q
    expected = {
        "forward_kl": temperature**2 * np_kl(p, q),
        "reverse_kl": temperature**2 * np_kl(q, p),
        "jsd": temperature**2 * (0.3 * np_kl(p, m) + 0.7 * np_kl(q, m)),
        "skew_kl": temperature**2 * np_kl(p, mix),
        "tvd": 0.5 * np.abs(p - q).sum(-1),
    }
    kwargs = {"jsd": {"beta": 0.3}, "skew_kl": {"alpha": 0.2}}
    for name, fn in losses.DIVERGENCES.items():
        got = fn(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32),
                 temperature=temperature, **kwargs.get(name, {}))
        np.testing.assert_allclose(np.asarray(got), expected[name], rtol=1e-5, atol=1e-6,
                                   err_msg=name)


def test_masked_vocabulary_has_no_nan():
    s, t = random_logits(1)
    s[..., :3] = -np.inf
    t[..., :3] = -np.inf
    s, t = jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32)
    for name, fn in losses.DIVERGENCES.items():
        value, grad = jax.value_and_grad(lambda x: fn(x, t).sum())(s)
        assert np.isfinite(float(value)), name
        assert np.all(np.isfinite(np.asarray(grad)[..., 3:])), name


def test_jsd_limits_tend_to_kl():
    # Moderate logits: the second-order term grows with the teacher/student probability ratio.
    s, t = random_logits(2, scale=1.0)
    s, t = jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32)
    small = 1e-4
    np.testing.assert_allclose(losses.generalized_jsd(s, t, beta=small) / small,
                               losses.forward_kl(s, t), rtol=1e-2)
    np.testing.assert_allclose(losses.generalized_jsd(s, t, beta=1 - small) / small,
                               losses.reverse_kl(s, t), rtol=1e-2)


def test_length_scaled_noise_uses_own_length():
    embeds = jnp.zeros((2, 64, 16))
    mask = np.zeros((2, 64), np.int32)
    mask[0, :16] = 1   # 16 real tokens, padded to 64.
    mask[1, :] = 1     # 64 real tokens.
    noise = losses.length_scaled_noise(jax.random.PRNGKey(0), embeds, jnp.asarray(mask), 4.0)
    noise = np.asarray(noise)
    assert np.all(noise[0, 16:] == 0)
    std0 = noise[0, :16].std()
    std1 = noise[1].std()
    np.testing.assert_allclose(std0, 4.0 / np.sqrt(16 * 16), rtol=0.15)
    np.testing.assert_allclose(std1, 4.0 / np.sqrt(64 * 16), rtol=0.1)


def test_reductions_and_next_token_mask():
    values = jnp.asarray([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]])
    mask = jnp.asarray([[1, 1, 0, 0], [0, 0, 0, 1]])
    assert float(losses.per_token_mean(values, mask)) == pytest.approx((1 + 2 + 40) / 3)
    np.testing.assert_allclose(losses.per_sequence_mean(values, mask), [1.5, 40.0])
    assert float(losses.per_batch_mean(values, mask)) == pytest.approx((1.5 + 40) / 2)
    np.testing.assert_array_equal(losses.next_token_mask(mask), [[1, 0, 0, 0], [0, 0, 1, 0]])


def test_cross_entropy_matches_numpy():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, 6, 9))
    ids = rng.integers(0, 9, size=(2, 6))
    got = np.asarray(losses.next_token_cross_entropy(jnp.asarray(logits, jnp.float32),
                                                     jnp.asarray(ids)))
    p = np_softmax(logits)
    expected = -np.log(np.take_along_axis(p[:, :-1], ids[:, 1:, None], -1)[..., 0])
    np.testing.assert_allclose(got[:, :-1], expected, rtol=1e-5)
    assert np.all(got[:, -1] == 0)


def test_lora_delta_penalty_matches_explicit_product():
    rng = np.random.default_rng(4)
    tree = {"attn": {"q": {"kernel": np.ones((2, 6, 5)), "lora_a": rng.normal(size=(2, 6, 3)),
                           "lora_b": rng.normal(size=(2, 3, 5))}},
            "mlp": {"up": {"lora_a": rng.normal(size=(2, 5, 3)), "lora_b": rng.normal(size=(2, 3, 4))}}}
    adapters = {"attn": {"q": {k: v for k, v in tree["attn"]["q"].items() if k != "kernel"}},
                "mlp": tree["mlp"]}
    expected = 0.0
    for pair in (tree["attn"]["q"], tree["mlp"]["up"]):
        expected += np.sum((2.0 * pair["lora_a"] @ pair["lora_b"]) ** 2)
    got = float(losses.lora_delta_penalty(adapters, scale=2.0))
    assert got == pytest.approx(0.5 * expected, rel=1e-5)


def np_log_softmax(z):
    finite_max = np.max(np.where(np.isfinite(z), z, -np.inf), axis=-1, keepdims=True)
    shifted = z - finite_max
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def np_kl_from_log(log_p, log_q):
    p = np.exp(log_p)
    with np.errstate(invalid="ignore"):
        terms = np.where(p > 0, p * (log_p - log_q), 0.0)
    return terms.sum(-1)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_divergences_extreme_and_masked_logits(temperature):
    # Logits of +/-1e4 and -inf (masked) entries, against a float64 log-space reference.
    rng = np.random.default_rng(7)
    s = rng.normal(size=(3, 4, 13)) * 5.0
    t = rng.normal(size=(3, 4, 13)) * 5.0
    s[0, :, 2] = 1e4
    t[0, :, 2] = 1e4 - 3.0
    s[1, :, 5] = -1e4
    t[1, :, 5] = 1e4
    s[2, :, :3] = -np.inf
    t[2, :, :3] = -np.inf
    log_p, log_q = np_log_softmax(t / temperature), np_log_softmax(s / temperature)
    p, q = np.exp(log_p), np.exp(log_q)
    log_m = np.logaddexp(log_p + np.log(0.5), log_q + np.log(0.5))
    log_mix = np.logaddexp(log_p + np.log(0.1), log_q + np.log(0.9))
    expected = {
        "forward_kl": temperature**2 * np_kl_from_log(log_p, log_q),
        "reverse_kl": temperature**2 * np_kl_from_log(log_q, log_p),
        "jsd": temperature**2 * (0.5 * np_kl_from_log(log_p, log_m)
                                 + 0.5 * np_kl_from_log(log_q, log_m)),
        "skew_kl": temperature**2 * np_kl_from_log(log_p, log_mix),
        "tvd": 0.5 * np.abs(p - q).sum(-1),
    }
    kwargs = {"jsd": {"beta": 0.5}, "skew_kl": {"alpha": 0.1}}
    for name, fn in losses.DIVERGENCES.items():
        got = np.asarray(fn(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32),
                            temperature=temperature, **kwargs.get(name, {})))
        assert np.all(np.isfinite(got)), name
        np.testing.assert_allclose(got, expected[name], rtol=1e-5, atol=1e-5, err_msg=name)
