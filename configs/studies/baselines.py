"""Study baselines. The four student objectives of `ckt_jax/baselines.py` (sft_lora, kd_lora,
kd_noise, ckt) under the same data, teacher, adapters, step budget and evaluation, in one table
with the base model and the teacher: six rows with confidence intervals.

    python -m ckt_jax.main --config configs/studies/baselines.py --workdir runs/studies
    python -m ckt_jax.main --config configs/studies/baselines.py:full --workdir runs/studies_full

kd_noise is the main config's student, so in a work directory where another study already trained
it (the budget cell at 40 steps, for one) that cell is reused. CPU size (24 prompts per evaluation
split, no robustness regeneration) on 2 CPU cores: measured 50 min 29 s for the other three
cells, with a low-priority job on the second core. Training took 346 s for sft_lora, 715 s for
kd_lora and 1482 s for ckt, whose adversarial term adds two passes per step, and evaluation
about 100-180 s each. Full size: every evaluation prompt.
"""

from ckt_jax import baselines, config_files

_common = config_files.sibling(__file__, "_common.py")


def get_config(size="cpu"):
    grid = ",".join(baselines.NAMES)
    return _common.study_config("baselines", size, cpu_grid=grid, full_grid=grid)
