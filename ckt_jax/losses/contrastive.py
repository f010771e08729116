"""Representation-level contrastive terms between student and teacher sequence embeddings.

Three terms act on pooled hidden states (`pool_hidden`), usually after a small trainable
`ProjectionHead`:

- `info_nce` aligns each student representation with the teacher's representation of the same
  input, against the other inputs of the batch as negatives.
- `relation_matching` makes the student's pairwise cosine-similarity matrix match the teacher's.
- `supervised_contrastive` pulls student representations with the same harmful/benign label
  together and pushes the two classes apart.

The objective uses `relation_matching` as its label-aware term by default, with
`supervised_contrastive` as an option. Relation matching transfers the teacher's geometry,
including how close a borderline benign prompt sits to harmful ones. Supervised contrastive
learning instead forces a hard two-cluster split. The expected cost, not measured in this
repository, is more over-refusal on benign-but-sensitive prompts outside the training set, because
a sharp split puts inputs that resemble harmful prompts on the harmful side.

Every term takes `axis_name`. Inside `jax.shard_map` (or `pmap`) over a data-parallel axis, the
representations are gathered across that axis with `jax.lax.all_gather(..., tiled=True)`, so the
negatives and pairs come from the global batch, and each device's rows are placed in it at the
offset `jax.lax.axis_index(axis_name) * B_local`. The per-example terms then equal, row for row,
the single-device computation on the concatenated batch. All computation is in float32.

No term applies `stop_gradient` to the teacher: pass teacher representations that are already
constant (frozen teacher) or wrap them in `jax.lax.stop_gradient`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

# Top-level key of the projection head's parameters. Paths starting with it are adapter leaves.
CONTRASTIVE_HEAD = "contrastive_head"

_NORM_EPS = 1e-12


def _check_temperature(temperature: float) -> None:
    """Raise ValueError for a non-positive Python number; a traced temperature is not checked."""
    if isinstance(temperature, (int, float)) and not temperature > 0:
        raise ValueError(f"temperature={temperature} is not positive; pass a temperature > 0")


def _check_pair(student_BxD: jax.Array, teacher_BxD: jax.Array) -> None:
    if student_BxD.ndim != 2 or student_BxD.shape != teacher_BxD.shape:
        raise ValueError(
                f"student shape {student_BxD.shape} and teacher shape {teacher_BxD.shape} are "
                "invalid: pass two B x D arrays of equal shape (pool hidden states with "
                "pool_hidden)")


def _l2_normalize(x_BxD: jax.Array) -> jax.Array:
    """Divide each row by its L2 norm (rows of norm below 1e-12 are divided by 1e-12)."""
    x_BxD = jnp.asarray(x_BxD, jnp.float32)
    squared_norm_Bx1 = jnp.sum(jnp.square(x_BxD), axis=-1, keepdims=True)
    return x_BxD * jax.lax.rsqrt(jnp.maximum(squared_norm_Bx1, _NORM_EPS**2))


def _row_mask(mask_B: jax.Array | None, batch: int) -> jax.Array:
    if mask_B is None:
        return jnp.ones((batch,), bool)
    if mask_B.shape != (batch,):
        raise ValueError(
                f"mask_B has shape {mask_B.shape}; pass one entry per row, shape ({batch},)")
    return jnp.asarray(mask_B, bool)


def _gather(x_Bx: jax.Array, axis_name) -> jax.Array:
    """Concatenate the rows of every device along `axis_name` (identity when it is None)."""
    if axis_name is None:
        return x_Bx
    return jax.lax.all_gather(x_Bx, axis_name, axis=0, tiled=True)


def _row_offset(batch: int, axis_name) -> jax.Array | int:
    """Global index of this device's first row in the gathered batch."""
    if axis_name is None:
        return 0
    return jax.lax.axis_index(axis_name) * batch


def pool_hidden(hidden_BxLxD: jax.Array, mask_BxL: jax.Array, method: str = "mean") -> jax.Array:
    """Pool per-token hidden states into one vector per sequence, shape `B x D`, float32.

    `"mean"`: `sum_t m_t h_t / sum_t m_t` over the positions where `mask_BxL` is set.
    `"last"`: `h_t` at the largest position `t` where the mask is set, which is the final token
    of a causal decoder's input with right or left padding. A sequence with no set position pools
    to zeros under both methods.
    """
    hidden_BxLxD = jnp.asarray(hidden_BxLxD, jnp.float32)
    if hidden_BxLxD.ndim != 3 or mask_BxL.shape != hidden_BxLxD.shape[:2]:
        raise ValueError(f"hidden shape {hidden_BxLxD.shape} and mask shape {mask_BxL.shape} are "
                         "invalid: pass B x L x D hidden states and a B x L mask")
    mask_BxL = jnp.asarray(mask_BxL, jnp.float32)
    if method == "mean":
        total_BxD = jnp.einsum("bld,bl->bd", hidden_BxLxD, mask_BxL)
        return total_BxD / jnp.maximum(jnp.sum(mask_BxL, axis=-1), 1.0)[:, None]
    if method == "last":
        positions_L = jnp.arange(mask_BxL.shape[1])
        last_B = jnp.max(jnp.where(mask_BxL > 0, positions_L, -1), axis=-1)
        has_tokens_B = last_B >= 0
        last_BxD = jnp.take_along_axis(
                hidden_BxLxD, jnp.maximum(last_B, 0)[:, None, None], axis=1)[:, 0]
        return jnp.where(has_tokens_B[:, None], last_BxD, 0.0)
    raise ValueError(f"pooling method {method!r} is unknown; use 'mean' or 'last'")


def _info_nce_direction(anchor_BxD, candidates_NxD, valid_N, offset, temperature):
    """Cross-entropy of each anchor against the candidates, the positive at `offset + row`."""
    batch = anchor_BxD.shape[0]
    labels_B = offset + jnp.arange(batch)
    logits_BxN = anchor_BxD @ candidates_NxD.T / temperature
    # The positive column stays in the softmax even for an invalid row, so every row is finite.
    is_positive_BxN = jnp.arange(candidates_NxD.shape[0])[None, :] == labels_B[:, None]
    logits_BxN = jnp.where(valid_N[None, :] | is_positive_BxN, logits_BxN, -jnp.inf)
    positive_B = jnp.take_along_axis(logits_BxN, labels_B[:, None], axis=1)[:, 0]
    return jax.nn.logsumexp(logits_BxN, axis=-1) - positive_B


def info_nce(student_BxD: jax.Array, teacher_BxD: jax.Array, temperature: float = 0.1,
             symmetric: bool = False, axis_name=None, mask_B: jax.Array | None = None) -> jax.Array:
    """InfoNCE loss of each student row against the teacher rows of the batch, shape `B`.

    With `s_i, t_j` the L2-normalised rows and `tau` the temperature,
    `loss_i = -log( exp(s_i . t_i / tau) / sum_j exp(s_i . t_j / tau) )`: the positive of row `i`
    is the teacher's representation of the same input and the negatives are the teacher's other
    rows (van den Oord, Li and Vinyals, "Representation Learning with Contrastive Predictive
    Coding", 2018; used for distillation by Tian, Krishnan and Isola, "Contrastive Representation
    Distillation", 2020). `symmetric=True` averages this student-to-teacher loss with the
    teacher-to-student loss `-log( exp(t_i . s_i / tau) / sum_j exp(t_i . s_j / tau) )`.

    With `axis_name`, the teacher rows (and for `symmetric`, the student rows) are gathered across
    that mesh axis, so `j` runs over the global batch and row `i` of this device has its positive
    at global column `axis_index * B_local + i`. Rows where `mask_B` is False are dropped from
    every denominator and get loss 0. No batch reduction: take the mean yourself.
    """
    _check_pair(student_BxD, teacher_BxD)
    _check_temperature(temperature)
    batch = student_BxD.shape[0]
    valid_B = _row_mask(mask_B, batch)
    student_BxD = _l2_normalize(student_BxD)
    teacher_BxD = _l2_normalize(teacher_BxD)
    valid_N = _gather(valid_B, axis_name)
    offset = _row_offset(batch, axis_name)

    loss_B = _info_nce_direction(
            student_BxD, _gather(teacher_BxD, axis_name), valid_N, offset, temperature)
    if symmetric:
        reverse_B = _info_nce_direction(
                teacher_BxD, _gather(student_BxD, axis_name), valid_N, offset, temperature)
        loss_B = 0.5 * (loss_B + reverse_B)
    return jnp.where(valid_B, loss_B, 0.0)


def relation_matching(student_BxD: jax.Array, teacher_BxD: jax.Array,
                      mask_B: jax.Array | None = None, axis_name=None) -> jax.Array:
    """Mean squared difference between student and teacher pairwise cosine similarities, scalar.

    `loss = mean over pairs i != j, both valid, of (cos(s_i, s_j) - cos(t_i, t_j))^2`, so the
    student reproduces how the teacher separates inputs, such as harmful from benign prompts. The
    idea of matching relations instead of individual outputs is from Park, Kim, Lu and Cho,
    "Relational Knowledge Distillation", 2019. Their distance-wise loss compares normalised
    Euclidean distances with a Huber loss, whereas this term compares cosine similarities with a
    squared error. Returns 0 when fewer than two rows are valid.

    With `axis_name`, this device's rows are compared with the gathered global batch and the sums
    and pair counts are added with `psum`, so every device returns the same global value.
    """
    _check_pair(student_BxD, teacher_BxD)
    batch = student_BxD.shape[0]
    valid_B = _row_mask(mask_B, batch)
    student_BxD = _l2_normalize(student_BxD)
    teacher_BxD = _l2_normalize(teacher_BxD)
    valid_N = _gather(valid_B, axis_name)
    offset = _row_offset(batch, axis_name)

    student_sim_BxN = student_BxD @ _gather(student_BxD, axis_name).T
    teacher_sim_BxN = teacher_BxD @ _gather(teacher_BxD, axis_name).T
    is_self_BxN = jnp.arange(valid_N.shape[0])[None, :] == (offset + jnp.arange(batch))[:, None]
    pair_valid_BxN = valid_B[:, None] & valid_N[None, :] & ~is_self_BxN
    squared_BxN = jnp.where(pair_valid_BxN, jnp.square(student_sim_BxN - teacher_sim_BxN), 0.0)

    total = jnp.sum(squared_BxN)
    count = jnp.sum(pair_valid_BxN.astype(jnp.float32))
    if axis_name is not None:
        total = jax.lax.psum(total, axis_name)
        count = jax.lax.psum(count, axis_name)
    return total / jnp.maximum(count, 1.0)


def supervised_contrastive(student_BxD: jax.Array, labels_B: jax.Array, temperature: float = 0.1,
                           mask_B: jax.Array | None = None, axis_name=None) -> jax.Array:
    """Supervised contrastive loss of each student row, shape `B`.

    With `z_i` the L2-normalised rows, `A(i)` the valid rows other than `i` and `P(i)` those of
    `A(i)` with the label of `i`,
    `loss_i = -1/|P(i)| sum_{p in P(i)} log( exp(z_i . z_p / tau) / sum_{a in A(i)} exp(z_i . z_a
    / tau) )` (the `L_out` form of Khosla et al., "Supervised Contrastive Learning", 2020). Labels
    are class ids such as 1 for harmful and 0 for benign. Rows with no positive, and rows where
    `mask_B` is False, get loss 0.

    With `axis_name`, the rows, labels and mask are gathered across that mesh axis so `A(i)` and
    `P(i)` range over the global batch.
    """
    _check_temperature(temperature)
    if student_BxD.ndim != 2 or labels_B.shape != student_BxD.shape[:1]:
        raise ValueError(f"student shape {student_BxD.shape} and labels shape {labels_B.shape} "
                         "are invalid: pass B x D representations and B labels")
    batch = student_BxD.shape[0]
    valid_B = _row_mask(mask_B, batch)
    student_BxD = _l2_normalize(student_BxD)
    valid_N = _gather(valid_B, axis_name)
    labels_N = _gather(labels_B, axis_name)
    offset = _row_offset(batch, axis_name)

    logits_BxN = student_BxD @ _gather(student_BxD, axis_name).T / temperature
    is_self_BxN = jnp.arange(valid_N.shape[0])[None, :] == (offset + jnp.arange(batch))[:, None]
    in_denominator_BxN = valid_N[None, :] & ~is_self_BxN
    has_denominator_B = jnp.any(in_denominator_BxN, axis=-1)
    # A row with an empty denominator would take logsumexp of only -inf, whose gradient is NaN.
    masked_BxN = jnp.where(in_denominator_BxN, logits_BxN, -jnp.inf)
    masked_BxN = jnp.where(has_denominator_B[:, None], masked_BxN, 0.0)
    log_prob_BxN = logits_BxN - jax.nn.logsumexp(masked_BxN, axis=-1, keepdims=True)

    is_positive_BxN = in_denominator_BxN & (labels_B[:, None] == labels_N[None, :])
    positives_B = jnp.sum(is_positive_BxN.astype(jnp.float32), axis=-1)
    loss_B = -jnp.sum(jnp.where(is_positive_BxN, log_prob_BxN, 0.0), axis=-1)
    loss_B = loss_B / jnp.maximum(positives_B, 1.0)
    return jnp.where(valid_B & (positives_B > 0), loss_B, 0.0)


class ProjectionHead(nn.Module):
    """Projection from pooled hidden states to the space the contrastive terms compare.

    `hidden_features=None` is a single linear layer `x W + b`. Otherwise it is
    `Dense(hidden_features) -> gelu -> Dense(features)`. Input `B x D` in any float dtype, output
    `B x features` in float32. Keep its parameters under the top-level key `CONTRASTIVE_HEAD` (see
    `init_projection_head`) so they train as adapter leaves.
    """

    features: int = 256
    hidden_features: int | None = None

    @nn.compact
    def __call__(self, x_BxD: jax.Array) -> jax.Array:
        x_BxD = jnp.asarray(x_BxD, jnp.float32)
        if self.hidden_features is not None:
            x_BxD = nn.gelu(nn.Dense(self.hidden_features, name="hidden")(x_BxD))
        return nn.Dense(self.features, name="output")(x_BxD)


def init_projection_head(head: ProjectionHead, key: jax.Array, input_dim: int) -> dict:
    """Initialise `head` for `input_dim` inputs; returns `{CONTRASTIVE_HEAD: params}`.

    Merge the result into the model's parameter dict next to the model's own top-level keys.
    """
    variables = head.init(key, jnp.zeros((1, input_dim), jnp.float32))
    return {CONTRASTIVE_HEAD: variables["params"]}


def apply_projection_head(head: ProjectionHead, params: dict, x_BxD: jax.Array) -> jax.Array:
    """Apply `head` with the parameters stored under `params[CONTRASTIVE_HEAD]`, `B x features`."""
    if CONTRASTIVE_HEAD not in params:
        raise KeyError(f"params has no {CONTRASTIVE_HEAD!r} entry (keys: {sorted(params)}); "
                       "add the output of init_projection_head to the parameter dict")
    return head.apply({"params": params[CONTRASTIVE_HEAD]}, x_BxD)
