"""Baseline kd_noise: distillation plus a clean/noisy consistency term on random embedding noise.

This is the main job's student objective.

  python -m ckt_jax.main --config configs/baselines/kd_noise.py --workdir runs/baselines
"""

from ckt_jax import config_files

_common = config_files.sibling(__file__, "_common.py")


def get_config():
    c = _common.objective_off(_common.main_config())
    c.student_name = "kd_noise"
    c.distill.kd_weight = 1.0
    c.distill.consistency_weight = 0.5
    c.distill.l2_weight = 1e-4
    return c
