"""Study teacher_cache. Distil from a live teacher against a cache of the teacher's top-k
log-probabilities: the student's step time, its loss curve and its scores.

    python -m ckt_jax.main --config configs/studies/teacher_cache.py --workdir runs/studies
    python -m ckt_jax.main --config configs/studies/teacher_cache.py:full --workdir runs/studies_full

The cache cell reads the kd term's teacher from `<workdir>/teacher_cache/`, built once before
its first step (that build counts in the cell's distill wall time, not in its step times), so
no teacher forward runs during training. The live cell is the main config's student. The
table adds the median step time and the loss curve's stability. CPU size: grid `live,top:32`,
24 prompts per evaluation split. It took 20 min 40 s on 2 CPU cores with the shared stages of
`runs/studies` reused. The median step was 11.55 s live and 10.59 s cached, and the cache took
95 s to build.
Full size: grid `live,top:32,top:128`, every evaluation prompt.
"""

from ckt_jax import config_files

_common = config_files.sibling(__file__, "_common.py")


def get_config(size="cpu"):
    return _common.study_config("teacher_cache", size, cpu_grid="live,top:32",
                                full_grid="live,top:32,top:128")
