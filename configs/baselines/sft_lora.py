"""Baseline sft_lora: LoRA student trained with cross-entropy on the teacher's targets.

The replies the teacher was fine-tuned to produce (refusals for harmful prompts, the base model's
answers for benign ones) stand in for the teacher's own generated replies, which would take a
generation pass over every training prompt.

  python -m ckt_jax.main --config configs/baselines/sft_lora.py --workdir runs/baselines
"""

import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location(
    "baselines_common", pathlib.Path(__file__).with_name("_common.py"))
_common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_common)


def get_config():
    c = _common.objective_off(_common.main_config())
    c.student_name = "sft_lora"
    c.distill.ce_weight = 1.0
    c.distill.l2_weight = 1e-4
    return c
