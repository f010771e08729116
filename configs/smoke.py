"""Smoke run: every stage of the main job on the real model and data, with tiny sizes.

    python -m ckt_jax.main --config configs/smoke.py --workdir /tmp/ckt_smoke

A few minutes on a 2-core CPU. The numbers it reports are not meaningful; it checks that the stages
connect end to end.
"""

from ckt_jax import config_files

smollm2_cpu = config_files.sibling(__file__, "smollm2_cpu.py")


def get_config():
    c = smollm2_cpu.get_config()
    c.data.max_seq_len = 192
    c.data.train_template_max_chars = 400
    c.data.max_benign_prompts = 8
    c.targets.max_new_tokens = 8
    c.targets.batch_size = 8
    c.teacher_train.lora_rank = 4
    c.teacher_train.steps = 2
    c.teacher_train.batch_size = 2
    c.teacher_train.warmup_steps = 1
    c.distill.steps = 2
    c.distill.batch_size = 2
    c.distill.warmup_steps = 1
    c.checkpoint.every_steps = 1
    c.eval.limit = 4
    c.eval.max_new_tokens = 8
    c.eval.batch_size = 4
    c.eval.kd_limit = 4
    c.judge.folds = 2
    c.judge.max_prompt_tokens = 32
    c.judge.max_reply_tokens = 32
    # The robustness grid compiles the 30-layer model for several more shapes, which would add
    # minutes here; tests/test_studies.py runs it on a tiny model.
    c.robustness.models = ""
    c.log_every = 1
    return c
