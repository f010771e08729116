"""Shared loader for the study configs: the main CPU config in study mode, at a chosen size.

Every study has two sizes, chosen with the config argument (`--config=FILE:cpu`, the default, or
`--config=FILE:full`):

- `cpu`: reduced grids and evaluation subsets, estimated at 60 minutes or less on 2 CPU cores;
  `results.md` states the subsets and the measured wall time.
- `full`: the whole evaluation sets, longer training and wider grids, for accelerators.

The kd_weight, budget, precision and data_noise studies can share one work directory, so the data,
targets, teacher and reference evaluations are built once. The shift study holds out training
prompts, which changes the teacher, so it needs a work directory of its own.
"""

import pathlib

from ckt_jax import config_files

SIZES = ("cpu", "full")


def main_config():
    """The main CPU config, `configs/smollm2_cpu.py`."""
    return config_files.load_module(
        pathlib.Path(__file__).resolve().parents[1] / "smollm2_cpu.py").get_config()


def study_config(name: str, size: str, cpu_grid: str, full_grid: str):
    """The main config in study mode with the grid and sizes of `size`."""
    if size not in SIZES:
        raise ValueError(f"study size {size!r} is unknown; use --config=FILE:cpu or "
                         f"--config=FILE:full")
    from ml_collections import config_dict

    c = main_config()
    c.mode = "study"
    c.study = config_dict.ConfigDict()
    c.study.name = name
    c.study.size = size
    c.study.grid = cpu_grid if size == "cpu" else full_grid
    c.judge.enabled = True  # The main job leaves the second judge off to stay within its budget.
    if size == "cpu":
        c.eval.limit = 24
        c.eval.batch_size = 24
        c.eval.kd_limit = 16
        c.robustness.models = ""
    else:
        c.data.max_benign_prompts = 0
        c.targets.batch_size = 64
        c.teacher_train.steps = 500
        c.teacher_train.batch_size = 32
        c.teacher_train.warmup_steps = 50
        c.distill.steps = 300
        c.distill.batch_size = 32
        c.distill.warmup_steps = 30
        c.eval.limit = 0
        c.eval.batch_size = 64
        c.eval.kd_limit = 128
        c.judge.batch_size = 32
        c.robustness.models = "teacher,student"
        c.robustness.limit = 100
        c.robustness.kl_limit = 32
    return c
