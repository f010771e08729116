"""Baseline kd_noise: distillation plus a clean/noisy consistency term on random embedding noise.

This is the main job's student objective.

  python -m ckt_jax.main --config configs/baselines/kd_noise.py --workdir runs/baselines
"""

from ckt_jax import baselines, config_files

_common = config_files.sibling(__file__, "_common.py")


def get_config():
    return baselines.apply(_common.main_config(), "kd_noise")
