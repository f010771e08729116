"""Throughput: tokens per second per device and estimated model-FLOPs utilisation (MFU).

MFU = model FLOP/s per device / peak FLOP/s of one device (`config.train.peak_flops_per_device`).
Model FLOPs are estimated from the model shapes: every matrix product (2 FLOPs per
multiply-add), including the attention scores and the weighted sum over values, counted over the
full `L x L` score matrix that the model computes. Rematerialized recomputation is not counted,
as is usual for MFU. With a frozen backbone the backward pass computes activation gradients but
no weight gradients, so it costs about one forward pass: a pass with gradients counts as two
forward passes. The LoRA products are counted; norms, softmax and the losses are not.
"""

from __future__ import annotations

import time
from typing import Callable

import jax

from ckt_jax.model import LlamaConfig, LoraConfig
from ckt_jax.objective import ObjectiveConfig


def forward_flops(config: LlamaConfig, batch_size: int, length: int, scored_positions: int,
                  lora: LoraConfig | None = None) -> float:
    """Estimate the FLOPs of one forward pass over `batch_size x length` tokens.

    Only `scored_positions` positions per row are projected onto the vocabulary, as in the
    objective (`max_target_tokens`).
    """
    D, I, N = config.hidden_size, config.intermediate_size, config.num_layers
    q_width = config.num_heads * config.head_dim
    kv_width = config.num_kv_heads * config.head_dim
    shapes = {"q": (D, q_width), "k": (D, kv_width), "v": (D, kv_width), "o": (q_width, D),
              "gate": (D, I), "up": (D, I), "down": (I, D)}
    per_token = sum(2 * fan_in * fan_out for fan_in, fan_out in shapes.values())
    if lora is not None:
        per_token += sum(2 * lora.rank * (shapes[t][0] + shapes[t][1]) for t in lora.targets)
    # Scores q.k and the weighted sum of values, over all `length` keys.
    per_token += 2 * 2 * length * q_width
    layers = batch_size * length * N * per_token
    vocabulary = 2 * batch_size * min(scored_positions, length) * D * config.vocab_size
    return float(layers + vocabulary)


def objective_flops(objective: ObjectiveConfig, student: LlamaConfig, lora: LoraConfig,
                    teacher: LlamaConfig | None, batch_size: int, length: int) -> float:
    """Estimate the model FLOPs of one train step of `objective` on `batch_size x length` tokens."""
    scored = objective.max_target_tokens
    student_pass = forward_flops(student, batch_size, length, scored, lora)
    passes_with_gradient = 1.0
    if objective.consistency_weight > 0:
        # The noisy pass runs on every `consistency_row_stride`-th row only.
        noisy_rows = -(-batch_size // objective.consistency_row_stride)
        passes_with_gradient += noisy_rows / batch_size
    if objective.adversarial_weight > 0:
        steps = objective.adversarial_steps
        # SMART: `steps` ascent passes and one outer pass; FreeLB: an outer pass per ascent pass.
        passes_with_gradient += steps + 1 if objective.adversarial_mode == "smart" else 2 * steps
    total = 2 * student_pass * passes_with_gradient
    if objective.needs_teacher and teacher is not None:
        total += forward_flops(teacher, batch_size, length, scored)
    if objective.base_kl_weight > 0:
        total += forward_flops(student, batch_size, length, scored)
    return total


class Throughput:
    """Measure step time, tokens per second per device and MFU from the steps of one run.

    `flops_per_step(batch_shape)` returns the estimated model FLOPs of one step on a global
    batch of that shape; with it and `peak_flops_per_device` > 0 the summary includes MFU.
    """

    def __init__(self, flops_per_step: Callable[[tuple], float] | None = None,
                 peak_flops_per_device: float = 0.0, num_devices: int | None = None):
        self.flops_per_step = flops_per_step
        self.peak = float(peak_flops_per_device)
        self.num_devices = num_devices or jax.device_count()
        self._last = time.perf_counter()
        self._first_seconds = 0.0
        self.steady_seconds = 0.0
        self.steady_steps = 0
        self.tokens = 0.0
        self.flops = 0.0

    def update(self, *, first: bool, tokens: float, batch_shape: tuple) -> None:
        """Record one finished step; `first` marks the compile step, kept out of the rates."""
        now = time.perf_counter()
        elapsed, self._last = now - self._last, now
        if first:
            self._first_seconds = elapsed
            return
        self.steady_seconds += elapsed
        self.steady_steps += 1
        self.tokens += tokens
        if self.flops_per_step is not None:
            self.flops += self.flops_per_step(tuple(batch_shape))

    @property
    def seconds_per_step(self) -> float:
        if self.steady_steps:
            return self.steady_seconds / self.steady_steps
        return self._first_seconds

    @property
    def tokens_per_second_per_device(self) -> float:
        return self.tokens / max(self.steady_seconds, 1e-9) / self.num_devices

    @property
    def mfu(self) -> float | None:
        """Estimated model-FLOPs utilisation in [0, 1], or None without a peak or steady steps."""
        if not (self.peak > 0 and self.flops_per_step is not None and self.steady_steps):
            return None
        return self.flops / self.steady_seconds / self.num_devices / self.peak

    def summary(self) -> str:
        if not self.steady_steps:
            # Only the first step so far, whose time is mostly compilation.
            return f"first step (with compilation) {self._first_seconds:.1f} s"
        per_device = self.tokens_per_second_per_device
        text = (f"{per_device * self.num_devices:.0f} tokens/s ({per_device:.0f} per device), "
                f"{self.seconds_per_step:.2f} s/step")
        mfu = self.mfu
        if mfu is not None:
            text += f", MFU {100 * mfu:.1f}% (estimate)"
        return text
