"""Study data_noise. Data noise: label noise (a share of the student's refusal/compliance targets
flipped) and character noise in its training prompts.

    python -m ckt_jax.main --config configs/studies/data_noise.py --workdir runs/studies
    python -m ckt_jax.main --config configs/studies/data_noise.py:full --workdir runs/studies_full

CPU size (grid `label:0,label:0.2,text:0.1`, 24 prompts per evaluation split, no robustness
regeneration) on 2 CPU cores: 3 cells x 40 steps: about 50 minutes (estimated from the main job's
stage times; the shared data, targets, teacher and reference evaluations take about 20 minutes of
that and are reused by the other studies in the same work directory). Full size: grid
`label:0,label:0.05,label:0.1,label:0.2,label:0.4,text:0.02,text:0.05,text:0.1,text:0.2`, every
evaluation prompt.
"""

from ckt_jax import config_files

_common = config_files.sibling(__file__, "_common.py")


def get_config(size="cpu"):
    return _common.study_config("data_noise", size, cpu_grid="label:0,label:0.2,text:0.1",
                                full_grid="label:0,label:0.05,label:0.1,label:0.2,label:0.4,text:0.02,text:0.05,text:0.1,text:0.2")
