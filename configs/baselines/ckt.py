"""Baseline ckt: the full contrastive-transfer and robust-optimization objective.

Distillation, InfoNCE between student and teacher representations, relation matching of the
teacher's input similarities, a SMART-style adversarial consistency term, text noise in the
training prompts and L2 on the LoRA weight change. The random-noise consistency term is off here
because the adversarial term plays the same role.

  python -m ckt_jax.main --config configs/baselines/ckt.py --workdir runs/baselines
"""

from ckt_jax import baselines, config_files

_common = config_files.sibling(__file__, "_common.py")


def get_config():
    return baselines.apply(_common.main_config(), "ckt")
