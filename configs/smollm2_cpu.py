"""Main job: align SmolLM2-135M-Instruct on the packaged safety data, on CPU.

    python -m ckt_jax.main --config configs/smollm2_cpu.py --workdir runs/smollm2_cpu

Stages: build the data splits, generate the base model's replies to benign prompts (the answering
targets), fine-tune a safety teacher (LoRA rank 32 on every linear layer, merged), distil it into
a LoRA student on a frozen backbone, evaluate base, teacher and student, and write the report.
Sized for a 2-core CPU with 24 GiB; expect roughly 25-30 minutes in all. The same file scales to
accelerators by raising the step counts, batch sizes and eval subsets (`--config.eval.limit=0`
evaluates every prompt).
"""

from ml_collections import config_dict


def get_config() -> config_dict.ConfigDict:
    c = config_dict.ConfigDict()
    c.model = "smollm2"            # "smollm2" (the packaged GGUF), a .gguf path or an HF directory.
    c.teacher = ""                 # "" trains the teacher; else a .gguf, HF directory or ckt_jax teacher dir.
    c.stages = "data,targets,teacher,distill,eval,report"  # comma-separated subset, run in this order.
    c.seed = 0                     # Root PRNG seed; every stage derives its own key from it.
    c.log_every = 5                # Steps between training log lines.

    c.data = config_dict.ConfigDict()
    c.data.max_seq_len = 192                # Tokens; longer training examples are dropped (counted).
    c.data.max_target_tokens = 80           # Reply tokens scored per example (replies are <= 65).
    c.data.train_template_max_chars = 500   # Longest in-the-wild jailbreak template used in training.
    c.data.wrapped_fraction = 0.5           # Share of batches whose prompts are template-wrapped.
    c.data.harmful_fraction = 0.5           # Share of harmful examples in every training batch.
    c.data.max_benign_prompts = 300         # Cap on benign training prompts (each needs a generated reply).

    c.targets = config_dict.ConfigDict()
    c.targets.max_new_tokens = 64     # Length cap of the base model's replies to benign prompts.
    c.targets.batch_size = 16         # Prompts per generation batch.

    c.teacher_train = config_dict.ConfigDict()
    c.teacher_train.lora_rank = 32
    c.teacher_train.lora_alpha = 32.0
    c.teacher_train.lora_targets = "q,k,v,o,gate,up,down"
    c.teacher_train.steps = 50
    c.teacher_train.batch_size = 8
    c.teacher_train.learning_rate = 1e-3   # Peak of a warm-up + cosine schedule.
    c.teacher_train.warmup_steps = 5

    c.distill = config_dict.ConfigDict()
    c.distill.lora_rank = 8
    c.distill.lora_alpha = 16.0
    c.distill.lora_targets = "q,k,v,o"
    c.distill.steps = 36
    c.distill.batch_size = 8
    c.distill.learning_rate = 1.5e-3
    c.distill.warmup_steps = 4
    c.distill.divergence = "forward_kl"   # forward_kl, reverse_kl, jsd, skew_kl or tvd.
    c.distill.temperature = 2.0           # Softmax temperature of both distributions (loss scaled T^2).
    c.distill.kd_weight = 1.0
    c.distill.noise_alpha = 5.0           # Embedding noise magnitude alpha / sqrt(length * hidden).
    c.distill.noise_distribution = "gaussian"  # gaussian or uniform.
    c.distill.consistency_weight = 0.5    # Symmetric KL between clean and noisy student outputs.
    c.distill.l2_weight = 1e-4            # 0.5 * squared norm of each LoRA weight change (scale * A @ B).

    c.eval = config_dict.ConfigDict()
    c.eval.limit = 40               # Prompts per evaluation split (seeded subset); 0 = all.
    c.eval.max_new_tokens = 64      # Generated tokens per reply (greedy).
    c.eval.batch_size = 16
    c.eval.kd_limit = 32            # Prompts for teacher-forced token agreement.
    return c
