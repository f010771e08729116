"""Shared loader for the baseline configs: the main CPU config, with one student name each.

All baselines use the same data, teacher, student adapters, step budget and evaluation; only the
student's objective differs. Run them into one work directory and the report shows them side by
side (the data, targets and teacher are built once and reused):

  for b in sft_lora kd_lora kd_noise ckt; do
    python -m ckt_jax.main --config configs/baselines/$b.py --workdir runs/baselines
  done

The objectives are defined in `ckt_jax/baselines.py`. The `baselines` study
(`configs/studies/baselines.py`) trains the same four students as cells of a study, which shares
its data, teacher and reference evaluations with the other studies.
"""

import pathlib

from ckt_jax import config_files


def main_config():
    """The main CPU config, `configs/smollm2_cpu.py`."""
    return config_files.load_module(
        pathlib.Path(__file__).resolve().parents[1] / "smollm2_cpu.py").get_config()

