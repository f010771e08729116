"""Study budget. Compute budget: one student per distill.steps (warm-up scaled in proportion); score
against training wall time.

    python -m ckt_jax.main --config configs/studies/budget.py --workdir runs/studies
    python -m ckt_jax.main --config configs/studies/budget.py:full --workdir runs/studies_full

CPU size (grid `10,20,40`, 24 prompts per evaluation split, no robustness regeneration) on 2 CPU
cores: measured 49 min 52 s from an empty work directory. The three cells took 20 minutes and
the shared data, targets, teacher, judge and reference evaluations the rest. The other studies
in the same work directory reuse those stages, and the 40-step cell, which is the main config's
student. Full size: grid `30,100,300,1000`, every evaluation
prompt.
"""

from ckt_jax import config_files

_common = config_files.sibling(__file__, "_common.py")


def get_config(size="cpu"):
    return _common.study_config("budget", size, cpu_grid="10,20,40",
                                full_grid="30,100,300,1000")
