"""Study precision. Mixed precision: float32 against bfloat16 compute in the student's training
(losses stay float32); score, loss curves and stability.

    python -m ckt_jax.main --config configs/studies/precision.py --workdir runs/studies
    python -m ckt_jax.main --config configs/studies/precision.py:full --workdir runs/studies_full

CPU size (grid `float32,bfloat16`, 24 prompts per evaluation split, no robustness regeneration) on
2 CPU cores: 2 cells x 40 steps, bfloat16 slower than float32 under XLA on CPU: about 45 minutes
(estimated from the main job's stage times; the shared data, targets, teacher and reference
evaluations take about 20 minutes of that and are reused by the other studies in the same work
directory). Full size: grid `float32,bfloat16`, every evaluation prompt.
"""

from ckt_jax import config_files

_common = config_files.sibling(__file__, "_common.py")


def get_config(size="cpu"):
    return _common.study_config("precision", size, cpu_grid="float32,bfloat16",
                                full_grid="float32,bfloat16")
