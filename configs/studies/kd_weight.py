"""Study kd_weight. Distillation-weight sensitivity: one student per distill.kd_weight, other terms as
in the main job.

    python -m ckt_jax.main --config configs/studies/kd_weight.py --workdir runs/studies
    python -m ckt_jax.main --config configs/studies/kd_weight.py:full --workdir runs/studies_full

CPU size (grid `0.25,1,4`, 24 prompts per evaluation split, no robustness regeneration) on 2 CPU
cores: 3 cells x 40 steps. It measured 58 min 53 s with the data, targets and teacher reused,
while another job shared the cores for 40 of those minutes. An idle machine needs about 40
minutes with them reused, or 53 from an empty work directory (estimates from the stage times). The shared
stages and reference evaluations are reused by the other studies in the same work directory.
Full size: grid `0,0.25,0.5,1,2,4`, every evaluation prompt.
"""

from ckt_jax import config_files

_common = config_files.sibling(__file__, "_common.py")


def get_config(size="cpu"):
    return _common.study_config("kd_weight", size, cpu_grid="0.25,1,4",
                                full_grid="0,0.25,0.5,1,2,4")
