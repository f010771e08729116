"""The PyTorch side of `bench/train_step.py`: transformers + PEFT running ckt_jax's objectives.

The parent starts it as `python bench/torch_worker.py` and sends it JSON-line requests
(`common.serve`). It loads the same weights as the ckt_jax side: the GGUF file through
transformers' GGUF loader, or the tiny model from the Hugging Face directory that the ckt_jax
worker wrote. The teacher is that model with the teacher's PEFT adapter merged, and the student
is that model with the student's PEFT adapter, trainable. `TorchObjective` computes the terms of
`ckt_jax.objective.build_objective` one by one, from the same `ObjectiveConfig` fields.

Variants: `float32`, `bf16_autocast` (`torch.autocast` on the CPU with bfloat16) and
`bf16_compile` (the same under `torch.compile` with its default inductor back-end). All variants
train one set of adapter weights, reset to the initial adapters before each variant's first
step, and each variant has its own AdamW state.
"""

from __future__ import annotations

import copy
import gc
import math
import pathlib
import time

import numpy as np
import torch
import torch.nn.functional as F

import common

VARIANTS = ("float32", "bf16_autocast", "bf16_compile")
# Fields of ObjectiveConfig that this implementation supports, with the values it supports.
# Weights that must stay 0 name terms it does not implement.
UNSUPPORTED_WEIGHTS = ("relation_weight", "adversarial_weight", "base_kl_weight")
REQUIRED_VALUES = {"divergence": "forward_kl", "consistency_target": "student",
                   "contrastive_projection": False}


def symmetric_kl(logits_a, logits_b):
    """`(KL(a || b) + KL(b || a)) / 2` over the last axis, per position."""
    log_a = F.log_softmax(logits_a, dim=-1)
    log_b = F.log_softmax(logits_b, dim=-1)
    return 0.5 * (F.kl_div(log_b, log_a, reduction="none", log_target=True).sum(-1)
                  + F.kl_div(log_a, log_b, reduction="none", log_target=True).sum(-1))


def info_nce(student_BxD, teacher_BxD, temperature, symmetric):
    """Per-row InfoNCE between L2-normalised rows, the positive of row i being teacher row i."""
    student_BxD = F.normalize(student_BxD.float(), dim=-1, eps=1e-12)
    teacher_BxD = F.normalize(teacher_BxD.float(), dim=-1, eps=1e-12)
    labels_B = torch.arange(student_BxD.shape[0])
    loss_B = F.cross_entropy(student_BxD @ teacher_BxD.T / temperature, labels_B,
                             reduction="none")
    if symmetric:
        reverse_B = F.cross_entropy(teacher_BxD @ student_BxD.T / temperature, labels_B,
                                    reduction="none")
        loss_B = 0.5 * (loss_B + reverse_B)
    return loss_B


class TorchObjective:
    """The weighted objective of `ckt_jax.objective.build_objective` for transformers models.

    `student` is a PEFT model, `teacher` a plain causal LM. Only the reply positions that
    ckt_jax scores (the first `max_target_tokens` positions of each row that predict a reply
    token) are projected onto the vocabulary, as on the ckt_jax side.
    """

    def __init__(self, settings: dict, student, teacher):
        for name in UNSUPPORTED_WEIGHTS:
            if settings.get(name, 0.0):
                raise ValueError(f"{name}={settings[name]} is not implemented on the PyTorch "
                                 "side of the benchmark; set it to 0")
        for name, value in REQUIRED_VALUES.items():
            if settings.get(name, value) != value:
                raise ValueError(f"{name}={settings[name]!r} is not implemented on the PyTorch "
                                 f"side of the benchmark; use {value!r}")
        defaults = {"ce_weight": 0.0, "kd_weight": 0.0, "contrastive_weight": 0.0,
                    "consistency_weight": 0.0, "l2_weight": 0.0, "temperature": 1.0,
                    "max_target_tokens": 96, "reduction": "token", "opening_tokens": 0,
                    "opening_weight": 1.0, "contrastive_temperature": 0.1,
                    "contrastive_pooling": "last_prompt", "contrastive_symmetric": True,
                    "noise_alpha": 5.0, "consistency_row_stride": 1,
                    "noise_distribution": "gaussian"}
        self.cfg = {**defaults, **settings}
        if self.needs_teacher() and teacher is None:
            raise ValueError("this objective needs a teacher, but the worker loaded none")
        self.student = student.get_base_model()   # LlamaForCausalLM with LoRA layers inside
        self.teacher = teacher
        self.lora_scale = common.LORA_ALPHA / common.LORA_RANK
        self.lora_modules = [m for m in student.modules()
                             if hasattr(m, "lora_A") and "default" in m.lora_A]

    def needs_teacher(self) -> bool:
        return self.cfg["kd_weight"] > 0 or self.cfg["contrastive_weight"] > 0

    def reduce(self, values_BxK, weights_BxK):
        if self.cfg["reduction"] == "token":
            return (values_BxK * weights_BxK).sum() / weights_BxK.sum().clamp(min=1.0)
        row_weight_B = weights_BxK.sum(-1)
        row_mean_B = (values_BxK * weights_BxK).sum(-1) / row_weight_B.clamp(min=1.0)
        has_tokens_B = (row_weight_B > 0).float()
        return (row_mean_B * has_tokens_B).sum() / has_tokens_B.sum().clamp(min=1.0)

    def noise(self, embeds_BxLxD, mask_BxL):
        """Length-scaled embedding noise: alpha / sqrt(real tokens * hidden) per row."""
        mask = mask_BxL.float()
        scale_B = self.cfg["noise_alpha"] / torch.sqrt(
            mask.sum(-1).clamp(min=1.0) * embeds_BxLxD.shape[-1])
        if self.cfg["noise_distribution"] == "gaussian":
            unit = torch.randn(embeds_BxLxD.shape)
        else:
            unit = torch.rand(embeds_BxLxD.shape) * 2.0 - 1.0
        return unit * scale_B[:, None, None] * mask[..., None]

    def l2_penalty(self):
        """0.5 * sum over LoRA pairs of ||scale * B A||_F^2, from rank x rank Gram matrices."""
        total = torch.zeros(())
        for module in self.lora_modules:
            a_RxI = module.lora_A["default"].weight
            b_OxR = module.lora_B["default"].weight
            total = total + ((a_RxI @ a_RxI.T) * (b_OxR.T @ b_OxR)).sum()
        return 0.5 * self.lora_scale**2 * total

    def __call__(self, batch: dict, noise_BxLxD=None):
        """Return (total loss, {term name: value}) for `batch`, every term in float32.

        `noise_BxLxD` replaces the random noise of the noisy pass (for the loss check).
        """
        cfg = self.cfg
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        L = input_ids.shape[1]
        target_mask = torch.cat([batch["loss_mask"][:, 1:],
                                 torch.zeros_like(batch["loss_mask"][:, :1])], dim=1)
        k = min(cfg["max_target_tokens"], L)
        positions_BxK = torch.argsort(-target_mask, dim=1, stable=True)[:, :k]
        valid_BxK = torch.gather(target_mask, 1, positions_BxK).float()
        weights_BxK = valid_BxK
        if cfg["opening_tokens"] > 0:
            opening_K = torch.arange(k) < cfg["opening_tokens"]
            weights_BxK = valid_BxK * torch.where(opening_K, cfg["opening_weight"], 1.0)[None]
        index_BxKxD = positions_BxK[..., None].expand(-1, -1, self.student.config.hidden_size)

        def scored_hidden(model, rows=slice(None), **inputs):
            hidden = model.model(attention_mask=attention_mask[rows], use_cache=False,
                                 **inputs).last_hidden_state
            return torch.gather(hidden, 1, index_BxKxD[rows])

        def project(model, hidden_BxKxD):
            return model.lm_head(hidden_BxKxD).float()

        terms = {}
        student_hidden = scored_hidden(self.student, input_ids=input_ids)
        student_logits = project(self.student, student_hidden)
        if self.needs_teacher():
            with torch.no_grad():
                teacher_hidden = scored_hidden(self.teacher, input_ids=input_ids)
                teacher_logits = project(self.teacher, teacher_hidden)

        if cfg["ce_weight"] > 0:
            next_ids_BxK = torch.gather(input_ids, 1, (positions_BxK + 1).clamp(max=L - 1))
            nll_BxK = F.cross_entropy(student_logits.transpose(1, 2), next_ids_BxK,
                                      reduction="none")
            terms["ce"] = self.reduce(nll_BxK, weights_BxK)

        if cfg["kd_weight"] > 0:
            t = cfg["temperature"]
            log_q = F.log_softmax(student_logits / t, dim=-1)
            log_p = F.log_softmax(teacher_logits / t, dim=-1)
            kl_BxK = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
            terms["kd"] = self.reduce(t**2 * kl_BxK, weights_BxK)

        if cfg["contrastive_weight"] > 0:
            if cfg["contrastive_pooling"] == "last_prompt":
                student_repr, teacher_repr = student_hidden[:, 0], teacher_hidden[:, 0]
            else:
                pool_BxK = valid_BxK / valid_BxK.sum(1, keepdim=True).clamp(min=1.0)
                student_repr = torch.einsum("bk,bkd->bd", pool_BxK, student_hidden.float())
                teacher_repr = torch.einsum("bk,bkd->bd", pool_BxK, teacher_hidden.float())
            terms["contrastive"] = info_nce(student_repr, teacher_repr,
                                            cfg["contrastive_temperature"],
                                            cfg["contrastive_symmetric"]).mean()

        if cfg["consistency_weight"] > 0:
            rows = slice(None, None, cfg["consistency_row_stride"])
            embeds = self.student.model.embed_tokens(input_ids[rows])
            if noise_BxLxD is None:
                noise_BxLxD = self.noise(embeds, attention_mask[rows])
            noisy_logits = project(self.student, scored_hidden(
                self.student, rows, inputs_embeds=embeds + noise_BxLxD.to(embeds.dtype)))
            per_token = symmetric_kl(student_logits[rows], noisy_logits)
            terms["consistency"] = self.reduce(per_token, weights_BxK[rows])

        if cfg["l2_weight"] > 0:
            terms["l2"] = self.l2_penalty()

        total = sum(cfg[f"{name}_weight"] * value for name, value in terms.items())
        return total, terms


class TorchWorker:
    def __init__(self):
        self.variants: dict[str, dict] = {}

    # ---- requests ------------------------------------------------------------------------

    def load(self, request: dict) -> dict:
        """Load the base model, merge the teacher's adapter into a copy, attach the student's."""
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        start = time.perf_counter()
        files = request["files"]
        if "hf_dir" in files:
            base = AutoModelForCausalLM.from_pretrained(files["hf_dir"], dtype=torch.float32)
        else:
            gguf = pathlib.Path(files["gguf"])
            base = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                        dtype=torch.float32)
        self.teacher = None
        if "teacher_lora" in files:
            teacher = PeftModel.from_pretrained(copy.deepcopy(base), files["teacher_lora"])
            self.teacher = teacher.merge_and_unload().eval().requires_grad_(False)
        self.student = PeftModel.from_pretrained(base, files["student_lora"], is_trainable=True)
        self.student.train()
        self.trainable = [p for p in self.student.parameters() if p.requires_grad]
        self.initial = [p.detach().clone() for p in self.trainable]
        batch = np.load(files["batch"])
        self.batch = {name: torch.from_numpy(batch[name]).long() for name in batch.files}
        return {"load_seconds": time.perf_counter() - start, "versions": versions(),
                "attention": self.student.config._attn_implementation}

    def peaks(self, request: dict) -> dict:
        """Measure the best GFLOP/s of square matrix products in torch."""
        size, repeats = request["size"], request["repeats"]
        generator = torch.Generator().manual_seed(0)
        a = torch.randn(size, size, generator=generator)
        b = torch.randn(size, size, generator=generator)
        result = {}
        for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
            x, y = a.to(dtype), b.to(dtype)
            result[f"torch_{name}"] = common.matmul_gflops(
                size, common.best_seconds(lambda: x @ y, repeats))
        return result

    def setup(self, request: dict) -> dict:
        """Build and warm up each variant. A variant that fails is reported in the reply.

        The variant named in `request["check_variant"]` adds the ckt_jax side's noise (from
        `request["noise_path"]`) in its first step, so that its first loss can be compared.
        """
        self.release({})
        objective = TorchObjective(request["settings"], self.student, self.teacher)
        check_noise = None
        if pathlib.Path(request.get("noise_path") or "").is_file():
            check_noise = torch.from_numpy(np.load(request["noise_path"]))
        answers = {}
        for name in request["variants"]:
            if name not in VARIANTS:
                raise ValueError(f"PyTorch variant {name!r} is unknown; use one of "
                                 f"{', '.join(VARIANTS)}")
            try:
                self.variants[name] = self.build_variant(objective, name)
                noise = check_noise if name == request.get("check_variant") else None
                warmup = [self.run_step(name, noise if i == 0 else None)
                          for i in range(request["warmup"])]
            except Exception as error:  # Reported in the results; the other variants go on.
                self.variants.pop(name, None)
                first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
                answers[name] = {"error": f"{type(error).__name__}: {first_line}"}
                continue
            answers[name] = {"warmup": warmup, "first_loss": warmup[0]["loss"],
                             "first_terms": warmup[0]["terms"]}
        return answers

    def step(self, request: dict) -> dict:
        return self.run_step(request["variant"])

    def release(self, request: dict) -> dict:
        self.variants.clear()
        torch._dynamo.reset()
        gc.collect()
        return {"ok": True}

    # ---- internals -----------------------------------------------------------------------

    def build_variant(self, objective: TorchObjective, name: str) -> dict:
        with torch.no_grad():
            for parameter, initial in zip(self.trainable, self.initial):
                parameter.copy_(initial)
        autocast = name != "float32"

        def loss_fn(noise):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                return objective(self.batch, noise)

        optimizer = torch.optim.AdamW(self.trainable, lr=common.LEARNING_RATE,
                                      betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        return {"loss_fn": torch.compile(loss_fn) if name == "bf16_compile" else loss_fn,
                "optimizer": optimizer}

    def run_step(self, name: str, noise=None) -> dict:
        variant = self.variants[name]

        def run():
            variant["optimizer"].zero_grad(set_to_none=True)
            loss, terms = variant["loss_fn"](noise)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.trainable, common.MAX_GRAD_NORM)
            variant["optimizer"].step()
            return {"loss": loss.item(), "terms": {k: v.item() for k, v in terms.items()}}

        result = common.measure_step(run)
        if not math.isfinite(result["loss"]):
            raise FloatingPointError(f"PyTorch variant {name}: non-finite loss {result['loss']}")
        return result


def versions() -> dict:
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "torch_threads": torch.get_num_threads()}


def main() -> None:
    worker = TorchWorker()
    common.serve({"load": worker.load, "peaks": worker.peaks, "setup": worker.setup,
                  "step": worker.step, "release": worker.release})


if __name__ == "__main__":
    main()
