"""The training objective: a weighted sum of pure loss terms, built from the config.

`build_objective` returns `loss_fn(adapter_params, frozen_params, batch, rng) -> (loss, aux)`:

  adapter_params  the trained leaves: LoRA pairs, plus `contrastive_head` when the contrastive
                  projection head is on;
  frozen_params   {"backbone": student backbone, "teacher": teacher params (only if a term needs
                  it)}; wrapped in `stop_gradient`, so no gradient reaches them;
  batch           {"input_ids", "attention_mask", "loss_mask"} int32 `B x L`, where `loss_mask`
                  marks the reply tokens (the targets), and "is_harmful" int32 `B`; with
                  `cached_teacher_top_k > 0` also the teacher cache fields of
                  `ckt_jax.teacher_cache.BATCH_FIELDS`, `B x K x k` and `B x K`, aligned with
                  the scored positions;
                  packed batches (`batching.pack_batch`) add "segment_ids" `R x L` and
                  "example_row" `E`: the model inputs have one row per packed row, and
                  "is_harmful" and the cache fields one row per example;
  rng             a `jax.random` key, split here for every stochastic term.

`aux` contains every term's value (`loss/<term>`) and weight (`weight/<term>`). A term with weight 0
is not computed at all, so switching one off also removes its cost.

Only reply positions are projected onto the vocabulary: the first `max_target_tokens` positions
of each row that predict a reply token are gathered from the final hidden states before the
output projection. The full `B x L x V` logits are never used, so XLA drops them, which cuts the
vocabulary-side work (projection, softmax, divergence) by `L / max_target_tokens`. With
`vocab_chunk_size > 0` the projection and every per-token term run on that many scored positions
of each row at a time (`losses.chunked_vocab_map`), so the `B x K x V` logits of the scored
positions are not held at once either.

On packed rows every term is computed per example as on the unpacked batch of the same
examples: attention and positions stay within each segment, the scored positions, pooled
representations and sequence means are taken per example, and the consistency noise is scaled
per segment. The adversarial term still works per row, so it raises on packed batches.

Terms (per-token terms are averaged over the scored reply positions):
  ce            next-token cross-entropy on reply tokens (teacher fine-tuning, SFT baseline);
  kd            divergence between teacher and student next-token distributions;
  contrastive   InfoNCE between pooled student and teacher representations of the same input,
                with the other inputs of the batch as negatives;
  relation      label-aware term: the student's pairwise similarities between inputs match the
                teacher's (relation matching), or supervised contrastive over harmful/benign;
  consistency   divergence between the student's clean outputs and its outputs on embeddings
                perturbed with length-scaled random noise (or the teacher's clean outputs);
  adversarial   the same consistency on embeddings perturbed adversarially (SMART or FreeLB);
  base_kl       KL from the frozen base model to the student on benign rows (keeps helpfulness);
  l2            0.5 * squared Frobenius norm of the weight change `scale * A @ B` of every LoRA pair.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from ckt_jax import losses
from ckt_jax.lora import combine_params
from ckt_jax.model import Llama

LossFn = Callable[[Any, Any, dict, jax.Array], tuple[jax.Array, dict]]
# Batch keys of the cached teacher top-k (`ckt_jax.teacher_cache`): `B x K x k` token ids,
# `B x K x k` log-probabilities and `B x K` log-mass outside them.
TEACHER_CACHE_FIELDS = ("teacher_top_k_indices", "teacher_top_k_log_probs",
                        "teacher_tail_log_mass")
HEAD_KEY = "contrastive_head"
POOLINGS = ("last_prompt", "reply_mean")
RELATION_METHODS = ("relation", "supcon")
CONSISTENCY_TARGETS = ("student", "teacher")
ADVERSARIAL_MODES = ("smart", "freelb")
REDUCTIONS = ("token", "sequence")
WEIGHTS = ("ce_weight", "kd_weight", "contrastive_weight", "relation_weight",
           "consistency_weight", "adversarial_weight", "base_kl_weight", "l2_weight")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    ce_weight: float = 0.0
    kd_weight: float = 0.0
    contrastive_weight: float = 0.0
    relation_weight: float = 0.0
    consistency_weight: float = 0.0
    adversarial_weight: float = 0.0
    base_kl_weight: float = 0.0
    l2_weight: float = 0.0

    divergence: str = "forward_kl"   # Key of losses.DIVERGENCES, for the kd term.
    temperature: float = 1.0         # Softmax temperature of the kd term.
    max_target_tokens: int = 96      # Reply positions scored per row; later ones are ignored.
    # How per-token terms average: "token" weighs every reply token the same, so rows with long
    # replies dominate; "sequence" averages within each row first, so a 12-token refusal counts
    # as much as a 64-token benign reply.
    reduction: str = "token"
    # The opening reply tokens carry the answer-or-refuse decision ("I can't" vs "The process"),
    # yet they are a few of the ~64 tokens of a reply. Each of the first `opening_tokens` reply
    # tokens of a row weighs `opening_weight` in the per-token terms; later tokens weigh 1.
    opening_tokens: int = 0
    opening_weight: float = 1.0

    contrastive_temperature: float = 0.1
    contrastive_pooling: str = "last_prompt"   # The position that predicts the first reply token.
    contrastive_symmetric: bool = True
    contrastive_projection: bool = False       # Train a projection head on student features.
    relation_method: str = "relation"          # "relation" (teacher geometry) or "supcon".

    noise_alpha: float = 5.0         # Random noise magnitude alpha / sqrt(length * hidden).
    # The noisy pass of the consistency term runs on rows 0, n, 2n, ... of the batch; 2 halves
    # its cost. The rows stay a fixed subset, so with n > 1 some inputs get no noisy pass.
    consistency_row_stride: int = 1
    noise_distribution: str = "gaussian"
    consistency_target: str = "student"        # Match the clean "student" or clean "teacher".

    adversarial_mode: str = "smart"
    adversarial_steps: int = 1
    adversarial_epsilon: float = 1.0           # Radius of the perturbation ball.
    adversarial_step_size: float = 0.5
    adversarial_norm: str = "l2"               # "l2" (per sequence) or "linf" (per element).

    # k > 0 takes the kd term from the teacher's cached top-k log-probabilities in the batch
    # (`sparse_forward_kl`, bucket tail with the exact remainder) instead of its full logits.
    # The teacher forward still runs when another term needs its hidden states or full logits.
    cached_teacher_top_k: int = 0
    # Scored positions per row whose logits are computed at once; 0 projects all of them. Only
    # memory and speed change: the values agree with 0 up to float rounding.
    vocab_chunk_size: int = 0

    def __post_init__(self):
        choices = {"divergence": tuple(losses.DIVERGENCES), "contrastive_pooling": POOLINGS,
                   "relation_method": RELATION_METHODS, "reduction": REDUCTIONS,
                   "consistency_target": CONSISTENCY_TARGETS,
                   "adversarial_mode": ADVERSARIAL_MODES, "adversarial_norm": ("l2", "linf"),
                   "noise_distribution": ("gaussian", "uniform")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is unknown; use one of "
                                 f"{', '.join(sorted(allowed))}")
        for name in WEIGHTS + ("noise_alpha",):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        for name in ("temperature", "contrastive_temperature", "adversarial_epsilon",
                     "adversarial_step_size"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if self.max_target_tokens < 1:
            raise ValueError(f"max_target_tokens={self.max_target_tokens} must be >= 1")
        if self.opening_tokens < 0:
            raise ValueError(f"opening_tokens={self.opening_tokens} must be >= 0")
        if not self.opening_weight > 0:
            raise ValueError(f"opening_weight={self.opening_weight} must be > 0")
        if self.consistency_row_stride < 1:
            raise ValueError(f"consistency_row_stride={self.consistency_row_stride} must be >= 1")
        if self.adversarial_steps < 1:
            raise ValueError(f"adversarial_steps={self.adversarial_steps} must be >= 1")
        if self.vocab_chunk_size < 0:
            raise ValueError(f"vocab_chunk_size={self.vocab_chunk_size} must be >= 0")
        if self.cached_teacher_top_k < 0:
            raise ValueError(f"cached_teacher_top_k={self.cached_teacher_top_k} must be >= 0")
        if self.cached_teacher_top_k and self.divergence != "forward_kl":
            raise ValueError(f"divergence={self.divergence!r} cannot use the teacher cache, "
                             "which stores only the top-k; use divergence='forward_kl' or turn "
                             "the teacher cache off")
        if sum(getattr(self, name) for name in WEIGHTS if name != "l2_weight") == 0:
            raise ValueError("every data term has weight 0; set ce_weight or kd_weight > 0")

    @property
    def needs_teacher(self) -> bool:
        """Whether the loss runs the teacher forward (a cached kd term does not need it)."""
        return ((self.kd_weight > 0 and not self.cached_teacher_top_k)
                or self.contrastive_weight > 0 or self.relation_weight > 0
                or (self.consistency_weight > 0 and self.consistency_target == "teacher")
                or (self.adversarial_weight > 0 and self.consistency_target == "teacher"))

    @property
    def uses_teacher_cache(self) -> bool:
        return self.kd_weight > 0 and self.cached_teacher_top_k > 0


def gather_target_positions(target_mask_BxL: jax.Array, max_targets: int,
                            ) -> tuple[jax.Array, jax.Array]:
    """Return (positions_BxK, valid_BxK): the first K masked positions of each row, in order.

    `K = min(max_targets, L)`. Rows with fewer masked positions are filled with unmasked ones,
    flagged invalid.
    """
    k = min(max_targets, target_mask_BxL.shape[1])
    order_BxL = jnp.argsort(-target_mask_BxL.astype(jnp.int32), axis=1, stable=True)
    positions_BxK = order_BxL[:, :k]
    valid_BxK = jnp.take_along_axis(target_mask_BxL, positions_BxK, axis=1)
    return positions_BxK, valid_BxK.astype(jnp.float32)


def packed_target_positions(target_mask_RxL: jax.Array, segment_ids_RxL: jax.Array,
                            example_row_E: jax.Array, max_targets: int,
                            ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Return (positions_ExK, valid_ExK, mask_ExL): scored positions of each packed example.

    Example `e` is segment `e + 1` of row `example_row_E[e]` (the layout of
    `batching.pack_batch`). Its scored positions are the first K positions of its row that
    predict one of its own reply tokens, in order, as `gather_target_positions` finds them for
    the example alone. `mask_ExL` marks all of them.
    """
    # A position that predicts the first token of the next segment scores nothing.
    same_next_RxL = jnp.concatenate(
        [segment_ids_RxL[:, 1:] == segment_ids_RxL[:, :-1],
         jnp.zeros_like(segment_ids_RxL[:, :1], jnp.bool_)], axis=1)
    target_mask_RxL = target_mask_RxL * same_next_RxL.astype(target_mask_RxL.dtype)
    example_ids_E = jnp.arange(example_row_E.shape[0]) + 1
    own_ExL = segment_ids_RxL[example_row_E] == example_ids_E[:, None]
    mask_ExL = target_mask_RxL[example_row_E] * own_ExL.astype(target_mask_RxL.dtype)
    positions_ExK, valid_ExK = gather_target_positions(mask_ExL, max_targets)
    return positions_ExK, valid_ExK, mask_ExL


def pool_representation(hidden_BxKxD: jax.Array, valid_BxK: jax.Array, pooling: str) -> jax.Array:
    """Pool gathered reply-position hidden states into one vector per input, `B x D`.

    `last_prompt` takes the first scored position, which is the last prompt token: the state
    from which the model decides whether to answer or refuse. `reply_mean` averages over the
    valid reply positions.
    """
    if pooling == "last_prompt":
        return hidden_BxKxD[:, 0, :]
    weights = valid_BxK / jnp.maximum(jnp.sum(valid_BxK, axis=1, keepdims=True), 1.0)
    return jnp.einsum("bk,bkd->bd", weights, hidden_BxKxD)


class _Scored:
    """Final hidden states `B x K x D` at the scored positions, projected to logits when needed.

    `logits` is computed once and reused by every term, as the unchunked objective needs. The
    chunked objective passes `hidden` and `project` to `losses.chunked_vocab_map` instead.
    """

    def __init__(self, project: Callable[[jax.Array], jax.Array], hidden_BxKxD: jax.Array,
                 logits_BxKxV: jax.Array | None = None):
        self.project = project
        self.hidden = hidden_BxKxD
        self._logits = logits_BxKxV

    @property
    def logits(self) -> jax.Array:
        if self._logits is None:
            self._logits = self.project(self.hidden)
        return self._logits

    def rows(self, rows: slice) -> "_Scored":
        logits = None if self._logits is None else self._logits[rows]
        return _Scored(self.project, self.hidden[rows], logits)

    def stop_gradient(self) -> "_Scored":
        logits = None if self._logits is None else jax.lax.stop_gradient(self._logits)
        return _Scored(self.project, jax.lax.stop_gradient(self.hidden), logits)


def _check_packable(cfg: ObjectiveConfig) -> None:
    """Raise for the terms that do not yet give per-example values on packed rows."""
    if cfg.adversarial_weight > 0:
        # TODO: the L2 ball, the random start and the ascent direction are taken per row, so
        # the examples of a packed row would share one perturbation budget.
        raise ValueError("adversarial_weight > 0 does not support packed rows; turn packing "
                         "off or set adversarial_weight=0")


def build_objective(student: Llama, teacher: Llama | None, cfg: ObjectiveConfig,
                    head: Any | None = None) -> LossFn:
    """Build the pure loss function of the student `student` (a LoRA model) for `cfg`.

    `head` is the flax module of the contrastive projection head (needed when
    `cfg.contrastive_projection` is on); its parameters are `adapter_params["contrastive_head"]`.
    """
    if cfg.needs_teacher and teacher is None:
        raise ValueError("this objective needs a teacher model (kd, contrastive, relation or a "
                         "teacher consistency target is on)")
    if cfg.contrastive_projection and head is None:
        raise ValueError("contrastive_projection is on but no projection head module was given")
    divergence = losses.DIVERGENCES[cfg.divergence]
    reduce = losses.per_token_mean if cfg.reduction == "token" else losses.per_batch_mean
    base_model = Llama(student.config, dtype=student.dtype, param_dtype=student.param_dtype,
                       remat=student.remat, remat_policy=student.remat_policy,
                       output_dtype=student.output_dtype, scan_layers=student.scan_layers)

    def project(model, params, hidden_BxKxD):
        # Every loss term is computed in float32, whatever the models' output dtype.
        logits = model.apply({"params": params}, hidden_BxKxD, method="project")
        return logits.astype(jnp.float32)

    def gather(hidden_BxLxD, positions_BxK, rows_B=None):
        if rows_B is None:
            return jnp.take_along_axis(hidden_BxLxD, positions_BxK[..., None], axis=1)
        # Packed rows: example e reads row rows_B[e].
        return hidden_BxLxD[rows_B[:, None], positions_BxK]

    def per_token(fn, sources: dict[str, _Scored], extras: dict | None = None) -> jax.Array:
        """`fn(logits by source name, extras)`, `B x K`, on all positions or in chunks."""
        extras = extras or {}
        if cfg.vocab_chunk_size == 0:
            return fn({name: source.logits for name, source in sources.items()}, extras)
        return losses.chunked_vocab_map(
            fn, {name: source.project for name, source in sources.items()},
            {name: source.hidden for name, source in sources.items()}, extras,
            cfg.vocab_chunk_size)

    def loss_fn(adapter_params, frozen_params, batch, rng):
        frozen_params = jax.lax.stop_gradient(frozen_params)
        adapter_params = dict(adapter_params)
        head_params = adapter_params.pop(HEAD_KEY, None)
        params = combine_params(adapter_params, frozen_params["backbone"])
        input_ids = batch["input_ids"]
        attention_mask = batch["attention_mask"]
        target_mask = losses.next_token_mask(batch["loss_mask"])
        # Packed rows (`batching.pack_batch`) hold several examples each. From here on every
        # per-example array (`positions`, `valid`, `is_harmful`, the teacher cache fields) has
        # one row per example, while the model inputs keep one row per packed row.
        segment_ids = batch.get("segment_ids")
        example_rows = None
        if segment_ids is None:
            positions, valid = gather_target_positions(target_mask, cfg.max_target_tokens)
        else:
            _check_packable(cfg)
            example_rows = batch["example_row"]
            positions, valid, target_mask = packed_target_positions(
                target_mask, segment_ids, example_rows, cfg.max_target_tokens)
        model_kwargs = {} if segment_ids is None else {"segment_ids_BxL": segment_ids}
        # `valid` marks scored positions; `token_weights` also up-weights each row's opening tokens.
        token_weights = valid
        if cfg.opening_tokens > 0:
            is_opening_K = jnp.arange(valid.shape[1]) < cfg.opening_tokens
            token_weights = valid * jnp.where(is_opening_K, cfg.opening_weight, 1.0)[None, :]
        terms: dict[str, jax.Array] = {}

        out = student.apply({"params": params}, input_ids, attention_mask_BxL=attention_mask,
                            **model_kwargs)
        student_hidden = gather(out.hidden_BxLxD, positions, example_rows)
        project_student = functools.partial(project, student, params)
        student_scores = _Scored(project_student, student_hidden)

        teacher_hidden = teacher_scores = None
        if cfg.needs_teacher:
            teacher_params = frozen_params["teacher"]
            teacher_out = teacher.apply({"params": teacher_params}, input_ids,
                                        attention_mask_BxL=attention_mask, **model_kwargs)
            teacher_hidden = gather(teacher_out.hidden_BxLxD, positions, example_rows)
            teacher_scores = _Scored(functools.partial(project, teacher, teacher_params),
                                     teacher_hidden)

        # ---- distillation ----------------------------------------------------------------
        if cfg.ce_weight > 0:
            # The target of position t is token t + 1.
            next_positions = jnp.minimum(positions + 1, input_ids.shape[1] - 1)
            if example_rows is None:
                next_ids = jnp.take_along_axis(input_ids, next_positions, axis=1)
            else:
                next_ids = input_ids[example_rows[:, None], next_positions]

            def nll(logits, extras):
                log_probs = jax.nn.log_softmax(logits["student"], axis=-1)
                return -jnp.take_along_axis(log_probs, extras["next_ids"][..., None],
                                            axis=-1)[..., 0]

            values = per_token(nll, {"student": student_scores}, {"next_ids": next_ids})
            terms["ce"] = reduce(values, token_weights)

        if cfg.kd_weight > 0 and cfg.cached_teacher_top_k:
            def cached_kd(logits, extras):
                indices, log_probs, tail_log_mass = (extras[k] for k in TEACHER_CACHE_FIELDS)
                return losses.sparse_forward_kl(logits["student"], indices, log_probs,
                                                temperature=cfg.temperature,
                                                teacher_tail_log_mass_BxL=tail_log_mass)

            cached = {name: batch[name] for name in TEACHER_CACHE_FIELDS}
            values = per_token(cached_kd, {"student": student_scores}, cached)
            terms["kd"] = reduce(values, token_weights)
        elif cfg.kd_weight > 0:
            def kd(logits, _):
                return divergence(logits["student"], logits["teacher"],
                                  temperature=cfg.temperature)

            values = per_token(kd, {"student": student_scores, "teacher": teacher_scores})
            terms["kd"] = reduce(values, token_weights)

        if cfg.contrastive_weight > 0 or cfg.relation_weight > 0:
            student_repr = pool_representation(student_hidden, valid, cfg.contrastive_pooling)
            teacher_repr = pool_representation(teacher_hidden, valid, cfg.contrastive_pooling)
            if cfg.contrastive_projection:
                student_repr = head.apply({"params": head_params}, student_repr)
            if cfg.contrastive_weight > 0:
                per_example = losses.info_nce(student_repr, teacher_repr,
                                              temperature=cfg.contrastive_temperature,
                                              symmetric=cfg.contrastive_symmetric)
                terms["contrastive"] = jnp.mean(per_example)
            if cfg.relation_weight > 0:
                if cfg.relation_method == "relation":
                    terms["relation"] = losses.relation_matching(student_repr, teacher_repr)
                else:
                    terms["relation"] = jnp.mean(losses.supervised_contrastive(
                        student_repr, batch["is_harmful"],
                        temperature=cfg.contrastive_temperature))

        # ---- robustness ------------------------------------------------------------------
        needs_embeds = cfg.consistency_weight > 0 or cfg.adversarial_weight > 0
        if needs_embeds:
            embeds = student.apply({"params": params}, input_ids, method="embed")
            reference = teacher_scores if cfg.consistency_target == "teacher" else student_scores

            def perturbed_logits(delta_BxLxD, rows=slice(None)):
                # `rows` selects examples. A packed batch runs all of its rows (`delta_BxLxD`
                # covers them all) and scores the selected examples.
                model_rows = rows if example_rows is None else slice(None)
                noisy = student.apply({"params": params},
                                      inputs_embeds_BxLxD=embeds[model_rows] + delta_BxLxD,
                                      attention_mask_BxL=attention_mask[model_rows],
                                      **model_kwargs)
                rows_E = None if example_rows is None else example_rows[rows]
                return _Scored(project_student,
                               gather(noisy.hidden_BxLxD, positions[rows], rows_E))

            def consistency_values(logits, _):
                if cfg.consistency_target == "teacher":
                    return losses.teacher_consistency_loss(logits["perturbed"], logits["target"])
                return losses.consistency_loss(logits["target"], logits["perturbed"])

            def consistency(perturbed, target, rows=slice(None)):
                values = per_token(consistency_values,
                                   {"perturbed": perturbed, "target": target.rows(rows)})
                return reduce(values, token_weights[rows])

        if cfg.consistency_weight > 0:
            noise_key, rng = jax.random.split(rng)
            rows = slice(None, None, cfg.consistency_row_stride)
            # NOTE: on packed rows the noisy pass runs every packed row, so a stride above 1
            # saves no compute there. It only selects the examples that are scored.
            model_rows = rows if segment_ids is None else slice(None)
            noise = losses.length_scaled_noise(
                noise_key, embeds[model_rows], attention_mask[model_rows], cfg.noise_alpha,
                cfg.noise_distribution, segment_ids_BxL=segment_ids)
            terms["consistency"] = consistency(perturbed_logits(noise, rows), reference, rows)

        if cfg.adversarial_weight > 0:
            adv_key, rng = jax.random.split(rng)
            fixed_reference = reference.stop_gradient()

            def inner(delta):
                return consistency(perturbed_logits(delta), fixed_reference)

            def outer(delta):
                return consistency(perturbed_logits(delta), reference)

            ball = dict(epsilon=cfg.adversarial_epsilon, step_size=cfg.adversarial_step_size,
                        steps=cfg.adversarial_steps, norm=cfg.adversarial_norm)
            if cfg.adversarial_mode == "smart":
                delta = losses.adversarial_perturbation(inner, embeds, attention_mask, adv_key,
                                                        **ball)
                terms["adversarial"] = outer(delta)
            else:
                terms["adversarial"] = losses.freelb_average_loss(
                    outer, inner, embeds, attention_mask, adv_key, **ball)

        # ---- regularization --------------------------------------------------------------
        if cfg.base_kl_weight > 0:
            base_out = base_model.apply({"params": frozen_params["backbone"]}, input_ids,
                                        attention_mask_BxL=attention_mask, **model_kwargs)
            project_base = functools.partial(project, base_model, frozen_params["backbone"])
            base_scores = _Scored(project_base,
                                  gather(base_out.hidden_BxLxD, positions, example_rows))
            benign_B = 1.0 - batch["is_harmful"].astype(jnp.float32)

            def base_kl(logits, _):
                return losses.kl_to_base(logits["student"], logits["base"])

            values = per_token(base_kl, {"student": student_scores, "base": base_scores})
            terms["base_kl"] = reduce(values, token_weights * benign_B[:, None])

        if cfg.l2_weight > 0:
            terms["l2"] = losses.lora_delta_penalty(adapter_params, student.lora.scale)

        weights = {name[:-len("_weight")]: getattr(cfg, name) for name in WEIGHTS}
        total = sum(weights[name] * value for name, value in terms.items())
        aux = {f"loss/{name}": value for name, value in terms.items()}
        aux.update({f"weight/{name}": jnp.float32(weights[name]) for name in terms})
        aux["target_tokens"] = jnp.sum(valid)
        aux["target_tokens_dropped"] = jnp.sum(target_mask) - jnp.sum(valid)
        return total, aux

    return loss_fn
