"""Baseline kd_lora: LoRA student trained with distillation only (forward KL from the teacher).

  python -m ckt_jax.main --config configs/baselines/kd_lora.py --workdir runs/baselines
"""

from ckt_jax import baselines, config_files

_common = config_files.sibling(__file__, "_common.py")


def get_config():
    return baselines.apply(_common.main_config(), "kd_lora")
