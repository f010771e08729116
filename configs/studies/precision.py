"""Study precision. Mixed precision: float32 against bfloat16 compute in the student's training
(losses stay float32); score, loss curves and stability.

    python -m ckt_jax.main --config configs/studies/precision.py --workdir runs/studies
    python -m ckt_jax.main --config configs/studies/precision.py:full --workdir runs/studies_full

CPU size (grid `float32,bfloat16`, 24 prompts per evaluation split, no robustness regeneration) on
2 CPU cores: measured 10 min 18 s with the shared stages reused and the float32 cell reused from
the budget study's 40-step cell (the main config's student); the bfloat16 cell alone trained in
497 s, as fast as float32 under XLA on that CPU. From an empty work directory add about 30
minutes for the shared stages and 10 for the float32 cell. Full size: grid `float32,bfloat16`, every evaluation prompt.
"""

from ckt_jax import config_files

_common = config_files.sibling(__file__, "_common.py")


def get_config(size="cpu"):
    return _common.study_config("precision", size, cpu_grid="float32,bfloat16",
                                full_grid="float32,bfloat16")
