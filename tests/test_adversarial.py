"""Adversarial embedding perturbations: projection, ascent, determinism and FreeLB averaging."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ckt_jax import losses

MASK = jnp.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 1, 1, 1, 0]], jnp.float32)


def embeddings(seed=0, shape=(3, 5, 4)):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def smooth_loss(embeds, weights):
    """Convex loss of the masked embeddings, so ascent from any point increases it."""
    def loss(delta):
        projected = jnp.einsum("bld,de->ble", embeds + delta, weights)
        return jnp.sum(jnp.log(jnp.cosh(projected)) * MASK[..., None])
    return loss


def linear_loss(weights_BxLxD):
    return lambda delta: jnp.sum(delta * weights_BxLxD * MASK[..., None])


def test_project_to_ball_l2_per_sequence():
    delta = embeddings(1) * 10.0
    projected = np.asarray(losses.project_to_ball(delta, 0.5, "l2", MASK))
    norms = np.linalg.norm(projected.reshape(3, -1), axis=-1)
    np.testing.assert_allclose(norms, 0.5, rtol=1e-5)
    assert np.all(projected[np.asarray(MASK) == 0] == 0.0)

    small = np.asarray(MASK)[..., None] * np.asarray(delta) * 1e-3
    np.testing.assert_allclose(np.asarray(losses.project_to_ball(jnp.asarray(small), 0.5, "l2",
                                                                 MASK)), small, rtol=1e-6)


def test_project_to_ball_linf_elementwise():
    delta = embeddings(2)
    projected = np.asarray(losses.project_to_ball(delta, 0.3, "linf", MASK))
    assert np.max(np.abs(projected)) <= 0.3
    assert np.all(projected[np.asarray(MASK) == 0] == 0.0)
    inside = (np.abs(np.asarray(delta)) < 0.3) & (np.asarray(MASK)[..., None] > 0)
    np.testing.assert_array_equal(projected[inside], np.asarray(delta)[inside])


def test_project_to_ball_rejects_bad_norm():
    with pytest.raises(ValueError, match="'l1'"):
        losses.project_to_ball(embeddings(), 0.1, "l1")
    with pytest.raises(ValueError, match="epsilon=-0.1"):
        losses.project_to_ball(embeddings(), -0.1)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_perturbation_increases_inner_loss(norm):
    embeds = embeddings(3)
    inner = smooth_loss(embeds, embeddings(4, (4, 4)))
    delta = losses.adversarial_perturbation(inner, embeds, MASK, jax.random.key(0), epsilon=0.5,
                                            step_size=0.2, steps=1, norm=norm)
    assert float(inner(delta)) > float(inner(jnp.zeros_like(embeds))) + 1e-3


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_perturbation_stays_in_ball_and_off_padding(norm):
    embeds = embeddings(5)
    inner = smooth_loss(embeds, embeddings(6, (4, 4)))
    delta = np.asarray(losses.adversarial_perturbation(
            inner, embeds, MASK, jax.random.key(1), epsilon=0.3, step_size=0.25, steps=4,
            norm=norm))
    assert np.all(delta[np.asarray(MASK) == 0] == 0.0)
    if norm == "l2":
        assert np.all(np.linalg.norm(delta.reshape(3, -1), axis=-1) <= 0.3 * (1 + 1e-5))
    else:
        assert np.max(np.abs(delta)) <= 0.3 * (1 + 1e-6)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_inner_loss_non_decreasing_over_steps(norm):
    embeds = embeddings(7)
    # The convex loss with a large ball (no projection active) and the linear loss with a small
    # ball (projection active from the second step) both increase at every projected step.
    for inner, epsilon in ((smooth_loss(embeds, embeddings(8, (4, 4))), 10.0),
                           (linear_loss(embeddings(9)), 0.2)):
        values = []
        for steps in range(1, 6):
            delta = losses.adversarial_perturbation(inner, embeds, MASK, jax.random.key(2),
                                                    epsilon=epsilon, step_size=0.1, steps=steps,
                                                    norm=norm)
            values.append(float(inner(delta)))
        assert all(b >= a - 1e-5 for a, b in zip(values, values[1:])), values
        assert values[-1] > values[0], values


def test_perturbation_deterministic_for_key():
    embeds = embeddings(10)
    inner = smooth_loss(embeds, embeddings(11, (4, 4)))
    kwargs = dict(epsilon=0.3, step_size=0.1, steps=2, init_scale=0.1)
    first = losses.adversarial_perturbation(inner, embeds, MASK, jax.random.key(3), **kwargs)
    again = losses.adversarial_perturbation(inner, embeds, MASK, jax.random.key(3), **kwargs)
    other = losses.adversarial_perturbation(inner, embeds, MASK, jax.random.key(4), **kwargs)
    np.testing.assert_array_equal(np.asarray(first), np.asarray(again))
    assert not np.array_equal(np.asarray(first), np.asarray(other))


def test_perturbation_keeps_embedding_dtype():
    embeds = embeddings(12).astype(jnp.bfloat16)
    seen_dtypes = []

    def inner(delta):
        seen_dtypes.append(delta.dtype)
        return jnp.sum(jnp.square(embeds + delta).astype(jnp.float32))

    delta = losses.adversarial_perturbation(inner, embeds, MASK, jax.random.key(5), epsilon=0.1,
                                            step_size=0.05)
    assert delta.dtype == jnp.bfloat16
    assert set(seen_dtypes) == {jnp.dtype(jnp.bfloat16)}


def test_perturbation_has_no_gradient():
    embeds = embeddings(13)

    def through_perturbation(weights):
        delta = losses.adversarial_perturbation(smooth_loss(embeds, weights), embeds, MASK,
                                                jax.random.key(6), epsilon=0.2, step_size=0.1,
                                                steps=2)
        return jnp.sum(delta * embeds)

    grad = np.asarray(jax.grad(through_perturbation)(embeddings(14, (4, 4))))
    np.testing.assert_array_equal(grad, 0.0)


def test_freelb_averages_outer_loss_over_iterates():
    embeds = embeddings(14)
    weights = embeddings(15, (4, 4))
    key = jax.random.key(7)
    kwargs = dict(epsilon=0.4, step_size=0.15, norm="l2")

    def outer(weights, delta):
        return smooth_loss(embeds, weights)(delta)

    def freelb(weights):
        loss = lambda delta: outer(weights, delta)
        return losses.freelb_average_loss(loss, loss, embeds, MASK, key, steps=3, **kwargs)

    # Iterate k of a 3-step ascent is the result of a k-step ascent from the same start.
    inner = smooth_loss(embeds, weights)
    iterates = [losses.adversarial_perturbation(inner, embeds, MASK, key, steps=k, **kwargs)
                for k in (1, 2, 3)]
    expected_value = np.mean([float(outer(weights, d)) for d in iterates])
    np.testing.assert_allclose(float(freelb(weights)), expected_value, rtol=1e-5)

    # The weight gradient is the mean of the gradients at the fixed iterates, with no term
    # through the dependence of the ascent direction on the weights.
    expected_grad = np.mean([np.asarray(jax.grad(outer)(weights, d)) for d in iterates], axis=0)
    np.testing.assert_allclose(np.asarray(jax.grad(freelb)(weights)), expected_grad, rtol=1e-5,
                               atol=1e-6)


def test_ascent_rejects_bad_arguments():
    embeds = embeddings(16)
    inner = smooth_loss(embeds, embeddings(17, (4, 4)))
    with pytest.raises(ValueError, match="steps=0"):
        losses.adversarial_perturbation(inner, embeds, MASK, jax.random.key(0), epsilon=0.1,
                                        step_size=0.1, steps=0)
    with pytest.raises(ValueError, match="mask shape"):
        losses.adversarial_perturbation(inner, embeds, MASK[:, :3], jax.random.key(0),
                                        epsilon=0.1, step_size=0.1)
