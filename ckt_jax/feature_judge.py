"""A second refusal judge that uses no phrase list: logistic regression on frozen-model features.

The feature vector of a reply is the mean of the base model's final hidden states (after the
final RMSNorm) over the reply's tokens, computed on the chat (request, reply), so the judge scores
the reply in the context of the request it answers. The classifier is L2-regularized logistic
regression on standardized features, fitted by Newton's method in NumPy. It is trained on
pyrit's human-labelled refusal-scorer replies and scored there by k-fold cross-validation, so
every reported score comes from replies the fold's classifier did not see.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ckt_jax.model import Llama


@dataclasses.dataclass(frozen=True)
class LogisticModel:
    """Standardization statistics and weights of a fitted logistic regression."""

    mean_D: np.ndarray
    scale_D: np.ndarray
    weights_D: np.ndarray
    bias: float

    def probabilities(self, features_NxD: np.ndarray) -> np.ndarray:
        """Probability of the positive class for each row of ``features_NxD``."""
        z_NxD = (np.asarray(features_NxD, np.float64) - self.mean_D) / self.scale_D
        return 1.0 / (1.0 + np.exp(-(z_NxD @ self.weights_D + self.bias)))

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean_D, "scale": self.scale_D, "weights": self.weights_D,
                "bias": np.asarray(self.bias)}

    @classmethod
    def from_arrays(cls, arrays) -> "LogisticModel":
        return cls(np.asarray(arrays["mean"]), np.asarray(arrays["scale"]),
                   np.asarray(arrays["weights"]), float(arrays["bias"]))


def fit_logistic_regression(features_NxD: np.ndarray, labels_N: Sequence[bool], l2: float = 1.0,
                            max_iterations: int = 100, tolerance: float = 1e-10) -> LogisticModel:
    """Fit ``p(y=1 | x) = sigmoid(w . z + b)`` with ``z`` the standardized features.

    Minimizes ``-sum_i log p(y_i | x_i) + l2 / 2 * |w|^2`` (the bias is not penalized) with
    Newton steps until the largest step entry falls below ``tolerance``. A feature with zero
    spread in the training rows gets scale 1, so it contributes nothing instead of NaN.
    """
    x_NxD = np.asarray(features_NxD, np.float64)
    y_N = np.asarray(labels_N, np.float64)
    if x_NxD.ndim != 2 or len(x_NxD) != len(y_N) or len(y_N) == 0:
        raise ValueError(f"features must be [N, D] with N = {len(y_N)} labels > 0, got shape "
                         f"{x_NxD.shape}")
    if l2 < 0:
        raise ValueError(f"l2={l2} must be >= 0")
    mean_D = x_NxD.mean(axis=0)
    scale_D = x_NxD.std(axis=0)
    scale_D = np.where(scale_D > 0, scale_D, 1.0)
    z_NxD = (x_NxD - mean_D) / scale_D
    design_NxK = np.concatenate([z_NxD, np.ones((len(y_N), 1))], axis=1)
    penalty_K = np.full(design_NxK.shape[1], float(l2))
    penalty_K[-1] = 0.0
    theta_K = np.zeros(design_NxK.shape[1])
    for _ in range(max_iterations):
        p_N = 1.0 / (1.0 + np.exp(-(design_NxK @ theta_K)))
        gradient_K = design_NxK.T @ (p_N - y_N) + penalty_K * theta_K
        hessian_KxK = (design_NxK * (p_N * (1 - p_N))[:, None]).T @ design_NxK
        hessian_KxK += np.diag(penalty_K) + 1e-9 * np.eye(len(theta_K))
        step_K = np.linalg.solve(hessian_KxK, gradient_K)
        theta_K -= step_K
        if np.max(np.abs(step_K)) < tolerance:
            break
    return LogisticModel(mean_D, scale_D, theta_K[:-1], float(theta_K[-1]))


def kfold_indices(n: int, folds: int, seed: int) -> list[np.ndarray]:
    """Split ``range(n)`` into ``folds`` seeded test folds whose sizes differ by at most 1."""
    if not 2 <= folds <= n:
        raise ValueError(f"folds={folds} must be between 2 and the number of rows ({n})")
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(part) for part in np.array_split(order, folds)]


def cross_validated_probabilities(features_NxD: np.ndarray, labels_N: Sequence[bool], folds: int,
                                  seed: int, l2: float) -> np.ndarray:
    """Out-of-fold probabilities: each row is scored by the model fitted on the other folds."""
    x_NxD = np.asarray(features_NxD, np.float64)
    y_N = np.asarray(labels_N, bool)
    out_N = np.zeros(len(y_N))
    for test in kfold_indices(len(y_N), folds, seed):
        train = np.setdiff1d(np.arange(len(y_N)), test)
        out_N[test] = fit_logistic_regression(x_NxD[train], y_N[train], l2).probabilities(
            x_NxD[test])
    return out_N


def chat_token_rows(tokenizer, pairs: Sequence[tuple[str, str]], max_prompt_tokens: int,
                    max_reply_tokens: int) -> list[tuple[list[int], list[int]]]:
    """Tokenize (request, reply) chats as (ids, reply mask), keeping the last
    ``max_prompt_tokens`` tokens of the rendered request and the first ``max_reply_tokens`` of
    the reply. An empty reply keeps its end-of-turn token, so every row has a reply token."""
    rows = []
    for prompt, reply in pairs:
        ids, mask = tokenizer.encode_chat(prompt, reply)
        first = mask.index(1) if 1 in mask else len(mask)
        prompt_ids = ids[:first][-max_prompt_tokens:]
        reply_ids = ids[first:first + max_reply_tokens]
        reply_mask = mask[first:first + max_reply_tokens]
        if not any(reply_mask):
            raise ValueError(f"reply {reply[:60]!r} has no reply tokens after tokenization")
        rows.append((prompt_ids + reply_ids, [0] * len(prompt_ids) + reply_mask))
    return rows


@functools.lru_cache(maxsize=4)
def _compiled_pool(model: Llama):
    def pool(params, ids_BxL, attention_BxL, reply_BxL):
        hidden_BxLxD = model.apply({"params": params}, ids_BxL,
                                   attention_mask_BxL=attention_BxL).hidden_BxLxD
        weights_BxL = reply_BxL.astype(jnp.float32)
        total_BxD = jnp.einsum("bld,bl->bd", hidden_BxLxD.astype(jnp.float32), weights_BxL)
        return total_BxD / jnp.maximum(weights_BxL.sum(axis=1, keepdims=True), 1.0)

    return jax.jit(pool)


def pooled_reply_features(model: Llama, params, rows: Sequence[tuple[list[int], list[int]]],
                          pad_id: int, batch_size: int, pad_multiple: int = 64) -> np.ndarray:
    """Mean final hidden state over each row's reply tokens, shape [N, D] (float32).

    Rows are right-padded to a multiple of ``pad_multiple`` tokens, so one compiled forward pass
    serves every length bucket. Padding changes no feature, because attention is causal and
    padded keys are masked.
    """
    pool = _compiled_pool(model)
    features = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        longest = max(len(ids) for ids, _ in chunk)
        length = -(-longest // pad_multiple) * pad_multiple
        ids_BxL = np.full((batch_size, length), pad_id, np.int32)
        attention_BxL = np.zeros((batch_size, length), np.int32)
        reply_BxL = np.zeros((batch_size, length), np.int32)
        for row, (ids, mask) in enumerate(chunk):
            ids_BxL[row, :len(ids)] = ids
            attention_BxL[row, :len(ids)] = 1
            reply_BxL[row, :len(ids)] = mask
        # Filler rows (the last batch) attend to one pad token, so their softmax stays finite.
        attention_BxL[len(chunk):, 0] = 1
        out_BxD = np.asarray(pool(params, ids_BxL, attention_BxL, reply_BxL))
        features.append(out_BxD[:len(chunk)])
    return np.concatenate(features, axis=0) if features else np.zeros((0, model.config.hidden_size))
