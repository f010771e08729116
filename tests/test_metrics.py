"""Evaluation metrics on hand-made inputs with known values and NumPy references."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from ckt_jax import metrics


def test_wilson_interval_known_value():
    # p = 0.5, n = 10, z = 1.96: centre 0.5, half width 1.96 * sqrt(0.025 + 0.0096) / 1.384.
    low, high = metrics.wilson_interval(5, 10)
    half = 1.96 * math.sqrt(0.25 / 10 + 1.96**2 / 400) / (1 + 1.96**2 / 10)
    assert low == pytest.approx(0.5 - half)
    assert high == pytest.approx(0.5 + half)
    assert metrics.wilson_interval(0, 0) == (0.0, 1.0)


def test_rate_with_interval():
    summary = metrics.rate_with_interval(3, 4)
    assert summary["rate"] == 0.75
    assert summary["n"] == 4
    assert summary["ci95"] == list(metrics.wilson_interval(3, 4))
    assert math.isnan(metrics.rate_with_interval(0, 0)["rate"])


def test_harmonic_mean_known_values():
    assert metrics.harmonic_mean([1.0, 0.5]) == pytest.approx(2 / 3)
    assert metrics.harmonic_mean([0.9, 0.0, 1.0]) == 0.0


def test_safety_metrics_known_rates():
    refused = {"eval_harmful": [True, True, False, True],
               "eval_jailbreak": [True, False],
               "eval_benign_sensitive": [False, False, False, True],
               "eval_jailbreak_benign": [False, True]}
    out = metrics.safety_metrics(refused)
    assert out["harmful_refusal_rate"] == 0.75
    assert out["jailbreak_refusal_rate"] == 0.5
    assert out["benign_compliance_rate"] == 0.75
    assert out["jailbreak_benign_compliance_rate"] == 0.5
    assert out["overall_safety_score"] == pytest.approx(4 / (2 / 0.75 + 2 / 0.5))
    low, high = out["overall_safety_score_ci95"]
    assert 0.0 <= low <= out["overall_safety_score"] <= high <= 1.0


def test_bootstrap_interval_degenerate_cases():
    # Every outcome a success: every resample scores exactly 1.
    assert metrics.bootstrap_score_interval([[True] * 5, [True] * 3]) == (1.0, 1.0)
    # One component always fails: the harmonic mean is always 0.
    assert metrics.bootstrap_score_interval([[True] * 5, [False] * 3]) == (0.0, 0.0)
    assert metrics.bootstrap_score_interval([[True], []]) == (0.0, 1.0)


def test_bootstrap_interval_matches_numpy_reference():
    outcomes = [[True, False, True, True, False, True], [True, True, False, True]]
    low, high = metrics.bootstrap_score_interval(outcomes, samples=500, seed=3)
    # Reference: the same draws, harmonic mean computed row by row.
    rng = np.random.default_rng(3)
    rates = [np.asarray(o, float)[rng.integers(0, len(o), size=(500, len(o)))].mean(axis=1)
             for o in outcomes]
    scores = [0.0 if min(a, b) == 0 else 2 / (1 / a + 1 / b) for a, b in zip(*rates)]
    assert low == pytest.approx(np.quantile(scores, 0.025))
    assert high == pytest.approx(np.quantile(scores, 0.975))


def test_category_rates():
    out = metrics.category_rates(["a", "b", "a", ""], [True, False, False, True])
    assert list(out) == ["(none)", "a", "b"]
    assert out["a"]["rate"] == 0.5
    assert out["a"]["n"] == 2
    assert out["b"]["rate"] == 0.0
    assert out["(none)"]["rate"] == 1.0
    with pytest.raises(ValueError, match="2 categories for 1 outcomes"):
        metrics.category_rates(["a", "b"], [True])


def test_decision_agreement():
    out = metrics.decision_agreement([True, False, True, True], [True, True, True, False])
    assert out["rate"] == 0.5
    assert out["n"] == 4
    with pytest.raises(ValueError, match="differ in length"):
        metrics.decision_agreement([True], [])


def test_binary_scores_known_counts():
    predicted = [True, True, False, False, True]
    actual = [True, False, True, False, True]
    out = metrics.binary_scores(predicted, actual)
    assert (out["tp"], out["fp"], out["fn"], out["tn"]) == (2, 1, 1, 1)
    assert out["accuracy"] == pytest.approx(3 / 5)
    assert out["precision"] == pytest.approx(2 / 3)
    assert out["recall"] == pytest.approx(2 / 3)
    empty = metrics.binary_scores([False, False], [False, False])
    assert empty["precision"] == 0.0
    assert empty["recall"] == 0.0


def test_relative_to_clean():
    assert metrics.relative_to_clean(0.45, 0.9) == pytest.approx(0.5)
    assert math.isnan(metrics.relative_to_clean(0.3, 0.0))
    assert math.isnan(metrics.relative_to_clean(float("nan"), 0.5))


def test_roc_auc_known_value():
    # Positives 0.9, 0.4; negatives 0.4, 0.1: pairs won 1 + 1 + 0.5 (tie) + 1 of 4.
    assert metrics.roc_auc([0.9, 0.4, 0.4, 0.1], [True, True, False, False]) == 0.875
    assert math.isnan(metrics.roc_auc([0.1, 0.2], [True, True]))


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(
        -1, keepdims=True)


def test_kl_sum_matches_numpy():
    rng = np.random.default_rng(0)
    student = rng.normal(size=(2, 3, 5)).astype(np.float32)
    teacher = rng.normal(size=(2, 3, 5)).astype(np.float32)
    mask = np.array([[1, 1, 0], [0, 1, 0]])
    total, count = metrics.kl_sum(jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(mask))
    log_p, log_q = _log_softmax(teacher), _log_softmax(student)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
    assert float(count) == 3
    assert float(total) == pytest.approx(float((kl * mask).sum()), rel=1e-5)


def test_symmetric_kl_sum_matches_numpy():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(1, 4, 6)).astype(np.float32)
    b = rng.normal(size=(1, 4, 6)).astype(np.float32)
    mask = np.array([[1, 0, 1, 1]])
    total, count = metrics.symmetric_kl_sum(jnp.asarray(a), jnp.asarray(b), jnp.asarray(mask))
    la, lb = _log_softmax(a), _log_softmax(b)
    sym = 0.5 * ((np.exp(la) * (la - lb)).sum(-1) + (np.exp(lb) * (lb - la)).sum(-1))
    assert float(count) == 3
    assert float(total) == pytest.approx(float((sym * mask).sum()), rel=1e-5)
    same, _ = metrics.symmetric_kl_sum(jnp.asarray(a), jnp.asarray(a), jnp.asarray(mask))
    assert float(same) == pytest.approx(0.0, abs=1e-6)


def test_sequence_log_probs_known_value():
    # Vocabulary of 2; uniform logits give log(1/2) per scored token.
    logits = jnp.zeros((1, 4, 2))
    ids = jnp.asarray([[0, 1, 1, 0]])
    mask = jnp.asarray([[1, 0, 1, 1]])  # Position 0 cannot be scored; two tokens count.
    out = metrics.sequence_log_probs(logits, ids, mask)
    assert float(out[0]) == pytest.approx(2 * math.log(0.5))
    # A confident model: log-softmax of [0, 3] at the target id 1.
    logits = jnp.asarray([[[0.0, 3.0], [0.0, 0.0]]])
    out = metrics.sequence_log_probs(logits, jnp.asarray([[0, 1]]), jnp.asarray([[0, 1]]))
    assert float(out[0]) == pytest.approx(-math.log1p(math.exp(-3.0)), rel=1e-6)


def test_refusal_margin_known_value():
    refusal = np.log([[0.2, 0.1]])
    compliance = np.log([[0.3, 0.3, 0.0 + 1e-300]])
    margin = metrics.refusal_margin(refusal, compliance)
    assert margin[0] == pytest.approx(math.log(0.3) - math.log(0.6))
