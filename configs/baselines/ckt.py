"""Baseline ckt: the full contrastive-transfer and robust-optimization objective.

Distillation, InfoNCE between student and teacher representations, relation matching of the
teacher's input similarities, a SMART-style adversarial consistency term, text noise in the
training prompts and L2 on the LoRA weight change. The random-noise consistency term is off here
because the adversarial term plays the same role, and both together would add one more forward
and backward pass to every step on CPU.

  python -m ckt_jax.main --config configs/baselines/ckt.py --workdir runs/baselines
"""

from ckt_jax import config_files

_common = config_files.sibling(__file__, "_common.py")


def get_config():
    c = _common.objective_off(_common.main_config())
    c.student_name = "ckt"
    c.distill.kd_weight = 1.0
    c.distill.contrastive_weight = 0.1
    c.distill.relation_weight = 1.0
    c.distill.adversarial_weight = 0.5
    c.distill.l2_weight = 1e-4
    c.distill.text_noise.typo_rate = 0.02
    c.distill.text_noise.case_rate = 0.02
    c.distill.text_noise.whitespace_rate = 0.02
    return c
