"""The feature-based refusal judge: logistic regression, folds and pooled features."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ckt_jax import feature_judge
from ckt_jax.model import Llama, LlamaConfig


def test_logistic_regression_matches_group_means():
    # One binary feature and no penalty: the maximum-likelihood fit predicts each group's mean.
    x = np.array([[0.0]] * 4 + [[1.0]] * 5)
    y = np.array([1, 0, 0, 0, 1, 1, 1, 0, 1], bool)
    model = feature_judge.fit_logistic_regression(x, y, l2=0.0)
    probs = model.probabilities(np.array([[0.0], [1.0]]))
    assert probs[0] == pytest.approx(0.25, abs=1e-8)
    assert probs[1] == pytest.approx(0.8, abs=1e-8)


def test_logistic_regression_gradient_is_zero():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3))
    y = (x[:, 0] + 0.5 * rng.normal(size=40)) > 0
    l2 = 2.0
    model = feature_judge.fit_logistic_regression(x, y, l2=l2)
    z = (x - model.mean_D) / model.scale_D
    p = model.probabilities(x)
    grad_w = z.T @ (p - y) + l2 * model.weights_D
    grad_b = np.sum(p - y)
    assert np.max(np.abs(grad_w)) < 1e-8
    assert abs(grad_b) < 1e-8
    assert model.weights_D[0] > 0  # The informative feature gets a positive weight.


def test_logistic_regression_constant_feature():
    x = np.array([[1.0, 0.0], [1.0, 1.0], [1.0, 2.0], [1.0, 3.0]])
    model = feature_judge.fit_logistic_regression(x, [False, False, True, True], l2=1.0)
    assert np.all(np.isfinite(model.probabilities(x)))
    assert model.weights_D[0] == 0.0


def test_logistic_model_round_trip():
    model = feature_judge.fit_logistic_regression(np.eye(3), [True, False, True])
    again = feature_judge.LogisticModel.from_arrays(model.to_arrays())
    np.testing.assert_array_equal(again.probabilities(np.eye(3)), model.probabilities(np.eye(3)))


def test_kfold_indices_partition():
    folds = feature_judge.kfold_indices(11, 3, seed=0)
    assert sorted(len(f) for f in folds) == [3, 4, 4]
    assert sorted(np.concatenate(folds).tolist()) == list(range(11))
    with pytest.raises(ValueError, match="folds=1 must be between 2"):
        feature_judge.kfold_indices(5, 1, seed=0)


def test_cross_validation_scores_held_out_rows():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 2))
    y = x[:, 1] > 0
    probs = feature_judge.cross_validated_probabilities(x, y, folds=5, seed=0, l2=0.1)
    assert probs.shape == (60,)
    assert np.mean((probs > 0.5) == y) > 0.9
    # Each fold's rows are scored by a model fitted without them.
    test = feature_judge.kfold_indices(60, 5, seed=0)[0]
    train = np.setdiff1d(np.arange(60), test)
    expected = feature_judge.fit_logistic_regression(x[train], y[train], 0.1).probabilities(x[test])
    np.testing.assert_allclose(probs[test], expected)


def test_pooled_features_mean_of_reply_states():
    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_layers=2,
                         num_heads=2, num_kv_heads=1, head_dim=8)
    model = Llama(config)
    params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    rows = [([5, 6, 7, 8, 9], [0, 0, 1, 1, 1]), ([3, 4, 5], [0, 1, 1])]
    features = feature_judge.pooled_reply_features(model, params, rows, pad_id=0, batch_size=4,
                                                   pad_multiple=8)
    assert features.shape == (2, 16)
    for (ids, mask), feature in zip(rows, features):
        hidden = model.apply({"params": params}, jnp.asarray([ids])).hidden_BxLxD[0]
        expected = np.asarray(hidden)[np.asarray(mask, bool)].mean(axis=0)
        np.testing.assert_allclose(feature, expected, rtol=1e-4, atol=1e-5)
