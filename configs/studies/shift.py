"""Study shift. Distribution shift: train on AdvBench + Do-Not-Answer, with a seeded fifth of those
prompts held out, then evaluate in distribution (the held-out prompts) and on each shift on its
own: HarmBench, StrongREJECT, the jailbreak-wrapped set and the benign-but-sensitive set.

    python -m ckt_jax.main --config configs/studies/shift.py --workdir runs/study_shift
    python -m ckt_jax.main --config configs/studies/shift.py:full --workdir runs/study_shift_full

The held-out prompts change the teacher's training set, so this study needs its own work
directory. CPU size (24 prompts per evaluation split, the robustness grid on the student with 8
prompts per split) on 2 CPU cores: measured 29 min 55 s, with only the refusal judge reused
(copied from another work directory with the same model); the student trained in 500 s. Full size: every evaluation prompt and the full robustness grid on teacher and student.
"""

from ckt_jax import config_files

_common = config_files.sibling(__file__, "_common.py")


def get_config(size="cpu"):
    c = _common.study_config("shift", size, cpu_grid="default", full_grid="default")
    c.data.heldout_fraction = 0.2
    if size == "cpu":
        c.robustness.models = "student"
        c.robustness.limit = 8
        c.robustness.kl_limit = 4
    return c
