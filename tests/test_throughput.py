"""Throughput logging: FLOP estimates against hand counts, and the MFU arithmetic."""

import itertools

import pytest

from ckt_jax.model import LlamaConfig, LoraConfig
from ckt_jax.objective import ObjectiveConfig
from ckt_jax.throughput import Throughput, forward_flops, objective_flops

CONFIG = LlamaConfig(vocab_size=10, hidden_size=4, intermediate_size=8, num_layers=2,
                     num_heads=2, num_kv_heads=1, head_dim=2)


def test_forward_flops_hand_count():
    # Per token and layer: q 4x4, k 4x2, v 4x2, o 4x4, gate/up 4x8, down 8x4 multiply-adds.
    matmuls = 2 * (16 + 8 + 8 + 16 + 32 + 32 + 32)
    attention = 2 * 2 * 6 * 4        # length 6, query width 4
    vocabulary = 2 * 3 * 4 * 10      # 3 scored positions per row
    expected = 5 * 6 * 2 * (matmuls + attention) + 5 * vocabulary
    assert forward_flops(CONFIG, batch_size=5, length=6, scored_positions=3) == expected
    lora = LoraConfig(rank=1, targets=("q",))
    extra = 5 * 6 * 2 * 2 * (4 + 4)  # x @ A (4x1) and (x A) @ B (1x4)
    assert forward_flops(CONFIG, 5, 6, 3, lora) == expected + extra


def test_objective_flops_counts_passes():
    lora = LoraConfig(rank=1, targets=("q",))
    one_pass = forward_flops(CONFIG, 2, 6, 96, lora)
    teacher_pass = forward_flops(CONFIG, 2, 6, 96)
    ce = ObjectiveConfig(ce_weight=1.0)
    assert objective_flops(ce, CONFIG, lora, None, 2, 6) == 2 * one_pass
    kd_noise = ObjectiveConfig(kd_weight=1.0, consistency_weight=0.5)
    assert objective_flops(kd_noise, CONFIG, lora, CONFIG, 2, 6) == (4 * one_pass
                                                                    + teacher_pass)
    # A noisy pass on every 4th row of 8 (rows 0 and 4) costs a quarter of a full pass.
    strided = ObjectiveConfig(kd_weight=1.0, consistency_weight=0.5, consistency_row_stride=4)
    one_pass_8 = forward_flops(CONFIG, 8, 6, 96, lora)
    assert objective_flops(strided, CONFIG, lora, CONFIG, 8, 6) == pytest.approx(
        2 * 1.25 * one_pass_8 + forward_flops(CONFIG, 8, 6, 96))
    smart = ObjectiveConfig(ce_weight=1.0, adversarial_weight=1.0, adversarial_steps=2)
    assert objective_flops(smart, CONFIG, lora, None, 2, 6) == 2 * 4 * one_pass


def test_throughput_mfu(monkeypatch):
    # Start, the compile step, then two 2-second steps.
    clock = itertools.chain([0.0, 10.0, 12.0, 14.0], itertools.repeat(14.0))
    monkeypatch.setattr("ckt_jax.throughput.time.perf_counter", lambda: next(clock))
    meter = Throughput(lambda shape: 1e12 * shape[0], peak_flops_per_device=1e12, num_devices=4)
    meter.update(first=True, tokens=999, batch_shape=(2, 8))
    assert meter.mfu is None
    assert meter.summary() == "first step (with compilation) 10.0 s"
    meter.update(first=False, tokens=400, batch_shape=(2, 8))
    meter.update(first=False, tokens=400, batch_shape=(2, 8))
    assert meter.seconds_per_step == pytest.approx(2.0)
    assert meter.tokens_per_second_per_device == pytest.approx(800 / 4 / 4)
    # 4e12 FLOPs in 4 s on 4 devices with a 1e12 FLOP/s peak each.
    assert meter.mfu == pytest.approx(0.25)
    assert meter.summary() == "200 tokens/s (50 per device), 2.00 s/step, MFU 25.0% (estimate)"
    assert "MFU" not in Throughput(num_devices=1).summary()
