"""Baseline sft_lora: LoRA student trained with cross-entropy on the teacher's targets.

The replies the teacher was fine-tuned to produce (refusals for harmful prompts, the base model's
answers for benign ones) stand in for the teacher's own generated replies, which would take a
generation pass over every training prompt.

  python -m ckt_jax.main --config configs/baselines/sft_lora.py --workdir runs/baselines
"""

from ckt_jax import config_files

_common = config_files.sibling(__file__, "_common.py")


def get_config():
    c = _common.objective_off(_common.main_config())
    c.student_name = "sft_lora"
    c.distill.ce_weight = 1.0
    c.distill.l2_weight = 1e-4
    return c
