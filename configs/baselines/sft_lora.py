"""Baseline sft_lora: LoRA student trained with cross-entropy on the teacher's targets.

The replies the teacher was fine-tuned to produce (refusals for harmful prompts, the base model's
answers for benign ones) stand in for the teacher's own generated replies, which would take a
generation pass over every training prompt.

  python -m ckt_jax.main --config configs/baselines/sft_lora.py --workdir runs/baselines
"""

from ckt_jax import baselines, config_files

_common = config_files.sibling(__file__, "_common.py")


def get_config():
    return baselines.apply(_common.main_config(), "sft_lora")
