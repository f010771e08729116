"""The training objective: a weighted sum of pure loss terms, built from the config.

`build_objective` returns `loss_fn(adapter_params, frozen_params, batch, rng) -> (loss, aux)`:

  adapter_params  the LoRA leaves being trained;
  frozen_params   {"backbone": student backbone, "teacher": teacher params (only if a term needs
                  it)}; wrapped in `stop_gradient`, so no gradient reaches them;
  batch           {"input_ids", "attention_mask", "loss_mask"}, int32 `B x L`; `loss_mask` marks
                  the reply tokens (the targets);
  rng             a `jax.random` key, split here for every stochastic term.

`aux` holds every term's value (`loss/<term>`) and weight (`weight/<term>`). A term with weight 0
is not computed at all, so switching one off also removes its cost.

Only reply positions are projected onto the vocabulary: the first `max_target_tokens` positions
of each row that predict a reply token are gathered from the final hidden states before the
output projection. The full `B x L x V` logits are never used, so XLA drops them, which cuts the
vocabulary-side work (projection, softmax, divergence) by `L / max_target_tokens`.

Terms:
  ce           next-token cross-entropy on reply tokens (teacher fine-tuning, SFT baseline);
  kd           divergence between teacher and student next-token distributions on reply tokens;
  consistency  symmetric KL between the student's clean outputs and its outputs on embeddings
               perturbed with length-scaled noise, on reply tokens;
  l2           0.5 * squared Frobenius norm of the weight change `scale * A @ B` of every LoRA pair.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from ckt_jax import losses
from ckt_jax.lora import combine_params
from ckt_jax.model import Llama

LossFn = Callable[[Any, Any, dict, jax.Array], tuple[jax.Array, dict]]


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    ce_weight: float = 0.0
    kd_weight: float = 0.0
    consistency_weight: float = 0.0
    l2_weight: float = 0.0
    divergence: str = "forward_kl"
    temperature: float = 1.0
    noise_alpha: float = 5.0
    noise_distribution: str = "gaussian"
    max_target_tokens: int = 96   # Reply positions scored per row; later ones are ignored.

    def __post_init__(self):
        if self.divergence not in losses.DIVERGENCES:
            raise ValueError(
                f"divergence={self.divergence!r} is unknown; use one of "
                f"{', '.join(sorted(losses.DIVERGENCES))}")
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature} must be > 0")
        for name in ("ce_weight", "kd_weight", "consistency_weight", "l2_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.max_target_tokens < 1:
            raise ValueError(f"max_target_tokens={self.max_target_tokens} must be >= 1")
        if self.ce_weight + self.kd_weight + self.consistency_weight == 0:
            raise ValueError("every data term has weight 0; set ce_weight or kd_weight > 0")

    @property
    def needs_teacher(self) -> bool:
        return self.kd_weight > 0


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


def build_objective(student: Llama, teacher: Llama | None, cfg: ObjectiveConfig) -> LossFn:
    """Build the pure loss function of the student `student` (a LoRA model) for `cfg`."""
    if cfg.needs_teacher and teacher is None:
        raise ValueError("kd_weight > 0 needs a teacher model")
    divergence = losses.DIVERGENCES[cfg.divergence]

    def project(model, params, hidden_BxKxD):
        return model.apply({"params": params}, hidden_BxKxD, method="project")

    def gather(hidden_BxLxD, positions_BxK):
        return jnp.take_along_axis(hidden_BxLxD, positions_BxK[..., None], axis=1)

    def loss_fn(adapter_params, frozen_params, batch, rng):
        frozen_params = jax.lax.stop_gradient(frozen_params)
        params = combine_params(adapter_params, frozen_params["backbone"])
        input_ids = batch["input_ids"]
        attention_mask = batch["attention_mask"]
        target_mask = losses.next_token_mask(batch["loss_mask"])
        positions, valid = gather_target_positions(target_mask, cfg.max_target_tokens)

        out = student.apply({"params": params}, input_ids, attention_mask_BxL=attention_mask)
        student_logits = project(student, params, gather(out.hidden_BxLxD, positions))
        terms: dict[str, jax.Array] = {}
        weights = {"ce": cfg.ce_weight, "kd": cfg.kd_weight,
                   "consistency": cfg.consistency_weight, "l2": cfg.l2_weight}

        if cfg.ce_weight > 0:
            # The target of position t is token t + 1.
            next_ids = jnp.take_along_axis(
                input_ids, jnp.minimum(positions + 1, input_ids.shape[1] - 1), axis=1)
            log_probs = jax.nn.log_softmax(student_logits, axis=-1)
            nll = -jnp.take_along_axis(log_probs, next_ids[..., None], axis=-1)[..., 0]
            terms["ce"] = losses.per_token_mean(nll, valid)

        if cfg.kd_weight > 0:
            teacher_params = frozen_params["teacher"]
            teacher_out = teacher.apply({"params": teacher_params}, input_ids,
                                        attention_mask_BxL=attention_mask)
            teacher_logits = project(teacher, teacher_params,
                                              gather(teacher_out.hidden_BxLxD, positions))
            per_token = divergence(student_logits, teacher_logits, temperature=cfg.temperature)
            terms["kd"] = losses.per_token_mean(per_token, valid)

        if cfg.consistency_weight > 0:
            noise_key, rng = jax.random.split(rng)
            embeds = student.apply({"params": params}, input_ids, method="embed")
            noise = losses.length_scaled_noise(noise_key, embeds, attention_mask, cfg.noise_alpha,
                                               cfg.noise_distribution)
            noisy = student.apply({"params": params}, inputs_embeds_BxLxD=embeds + noise,
                                  attention_mask_BxL=attention_mask)
            noisy_logits = project(student, params, gather(noisy.hidden_BxLxD, positions))
            per_token = losses.consistency_loss(student_logits, noisy_logits)
            terms["consistency"] = losses.per_token_mean(per_token, valid)

        if cfg.l2_weight > 0:
            terms["l2"] = losses.lora_delta_penalty(adapter_params, student.lora.scale)

        total = sum(weights[name] * value for name, value in terms.items())
        aux = {f"loss/{name}": value for name, value in terms.items()}
        aux.update({f"weight/{name}": jnp.float32(weights[name]) for name in terms})
        aux["target_tokens"] = jnp.sum(valid)
        aux["target_tokens_dropped"] = jnp.sum(target_mask) - jnp.sum(valid)
        return total, aux

    return loss_fn
