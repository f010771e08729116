"""Baseline kd_lora: LoRA student trained with distillation only (forward KL from the teacher).

  python -m ckt_jax.main --config configs/baselines/kd_lora.py --workdir runs/baselines
"""

from ckt_jax import config_files

_common = config_files.sibling(__file__, "_common.py")


def get_config():
    c = _common.objective_off(_common.main_config())
    c.student_name = "kd_lora"
    c.distill.kd_weight = 1.0
    c.distill.l2_weight = 1e-4
    return c
