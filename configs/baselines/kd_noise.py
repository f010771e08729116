"""Baseline kd_noise: distillation plus a clean/noisy consistency term on random embedding noise.

This is the main job's student objective.

  python -m ckt_jax.main --config configs/baselines/kd_noise.py --workdir runs/baselines
"""

import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location(
    "baselines_common", pathlib.Path(__file__).with_name("_common.py"))
_common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_common)


def get_config():
    c = _common.objective_off(_common.main_config())
    c.student_name = "kd_noise"
    c.distill.kd_weight = 1.0
    c.distill.consistency_weight = 0.5
    c.distill.l2_weight = 1e-4
    return c
