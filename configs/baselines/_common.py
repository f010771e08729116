"""Shared loader for the baseline configs: the main CPU config, with one student name each.

All baselines use the same data, teacher, student adapters, step budget and evaluation; only the
student's objective differs. Run them into one work directory and the report shows them side by
side (the data, targets and teacher are built once and reused):

  for b in sft_lora kd_lora kd_noise ckt; do
    python -m ckt_jax.main --config configs/baselines/$b.py --workdir runs/baselines
  done
"""

import pathlib

from ckt_jax import config_files


def main_config():
    """The main CPU config, `configs/smollm2_cpu.py`."""
    return config_files.load_module(
        pathlib.Path(__file__).resolve().parents[1] / "smollm2_cpu.py").get_config()


def objective_off(config):
    """Set every objective weight of the student to 0, so a baseline names only its own terms."""
    for name in ("kd_weight", "contrastive_weight", "relation_weight", "consistency_weight",
                 "adversarial_weight", "base_kl_weight", "ce_weight", "l2_weight"):
        config.distill[name] = 0.0
    return config
