"""Study data_noise. Data noise: label noise (a share of the student's refusal/compliance targets
flipped) and character noise in its training prompts.

    python -m ckt_jax.main --config configs/studies/data_noise.py --workdir runs/studies
    python -m ckt_jax.main --config configs/studies/data_noise.py:full --workdir runs/studies_full

CPU size (grid `label:0,label:0.2,text:0.1`, 24 prompts per evaluation split, no robustness
regeneration) on 2 CPU cores: measured 18 min 56 s with the shared stages reused and the
`label:0` cell reused from the budget study's 40-step cell (the main config's student); each
noisy cell took about 7.5 minutes of training and 100 s of evaluation. From an empty work
directory add about 30 minutes for the shared stages and 10 for the noise-free cell. Full size: grid
`label:0,label:0.05,label:0.1,label:0.2,label:0.4,text:0.02,text:0.05,text:0.1,text:0.2`, every
evaluation prompt.
"""

from ckt_jax import config_files

_common = config_files.sibling(__file__, "_common.py")


def get_config(size="cpu"):
    return _common.study_config("data_noise", size, cpu_grid="label:0,label:0.2,text:0.1",
                                full_grid="label:0,label:0.05,label:0.1,label:0.2,label:0.4,text:0.02,text:0.05,text:0.1,text:0.2")
