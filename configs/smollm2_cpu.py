"""Main job: align SmolLM2-135M-Instruct on the packaged safety data, on CPU.

    python -m ckt_jax.main --config configs/smollm2_cpu.py --workdir runs/smollm2_cpu

Stages: build the data splits, generate the base model's replies to benign prompts (the answering
targets), fine-tune a safety teacher (LoRA rank 32 on every linear layer, merged), distil it into
a LoRA student on a frozen backbone, evaluate base, teacher and student, and write the report.
Sized for a 2-core CPU with 24 GiB; the whole job measured 21 minutes there. The same file scales to
accelerators by raising the step counts, batch sizes and eval subsets (`--config.eval.limit=0`
evaluates every prompt).
"""

from ml_collections import config_dict


def get_config() -> config_dict.ConfigDict:
    c = config_dict.ConfigDict()
    c.model = "smollm2"            # "smollm2" (the packaged GGUF), a .gguf path or an HF directory.
    # "" trains the teacher. Else: a .gguf file, an HF directory, a PEFT LoRA adapter directory
    # for the base model, or the teacher directory of another ckt_jax work directory.
    c.teacher = ""
    c.student_name = "student"     # Name of the distilled student (its directory and report row).
    c.mode = "stages"              # stages (run config.stages), chat, export or study.
    c.stages = "data,targets,teacher,distill,eval,report"  # comma-separated subset, run in this order.
    c.seed = 0                     # Root PRNG seed; every stage derives its own key from it.
    c.log_every = 5                # Steps between training log lines.

    c.data = config_dict.ConfigDict()
    c.data.max_seq_len = 192                # Tokens; longer training examples are dropped (counted).
    c.data.max_target_tokens = 80           # Reply tokens scored per example (replies are <= 65).
    c.data.train_template_max_chars = 500   # Maximum characters of a training jailbreak template.
    c.data.instruction_frames = True        # Also train every prompt inside a format/style request.
    c.data.wrapped_fraction = 0.5           # Share of batches whose prompts are template-wrapped.
    c.data.harmful_fraction = 0.5           # Harmful share of a batch unless a section sets its own.
    c.data.max_benign_prompts = 300         # Cap on benign training prompts, 0 = all (each needs a reply).
    # Seeded share of train_harmful kept out of training and evaluated as eval_heldout_harmful.
    c.data.heldout_fraction = 0.0

    c.targets = config_dict.ConfigDict()
    c.targets.max_new_tokens = 64     # Length cap of the base model's replies to benign prompts.
    c.targets.batch_size = 64         # Prompts per generation batch (1.6x faster than 16 on short prompts).

    c.teacher_train = config_dict.ConfigDict()
    c.teacher_train.lora_rank = 32         # LoRA rank r of every adapted projection.
    c.teacher_train.lora_alpha = 32.0      # LoRA update scale is lora_alpha / lora_rank.
    c.teacher_train.lora_targets = "q,k,v,o,gate,up,down"  # Projections given adapters.
    c.teacher_train.steps = 70             # Optimizer steps.
    c.teacher_train.batch_size = 8         # Examples per step.
    c.teacher_train.learning_rate = 2e-3   # Peak of a warm-up + cosine schedule.
    c.teacher_train.warmup_steps = 7       # Steps of linear warm-up from 0.

    c.distill = config_dict.ConfigDict()
    c.distill.lora_rank = 8               # LoRA rank r of every adapted projection.
    c.distill.lora_alpha = 16.0           # LoRA update scale is lora_alpha / lora_rank.
    c.distill.lora_targets = "q,k,v,o,gate,up,down"  # Projections given adapters (q,k,v,o: 0.75).
    c.distill.steps = 40                  # Optimizer steps (30: 0.764 overall, 40: 0.825).
    c.distill.batch_size = 8              # Examples per step.
    c.distill.learning_rate = 3e-3        # Peak of a warm-up + cosine schedule.
    c.distill.warmup_steps = 3            # Steps of linear warm-up from 0.
    c.distill.harmful_fraction = 0.375    # Harmful share of rows (0.25 under-refused: 0.60).
    c.distill.label_noise = 0.0           # Share of the student's targets flipped (refuse <-> comply).
    # Objective weights; 0 switches a term off (and skips its computation).
    c.distill.kd_weight = 1.0             # Teacher-to-student divergence on reply tokens.
    c.distill.contrastive_weight = 0.0    # InfoNCE between student and teacher representations.
    c.distill.relation_weight = 0.0       # Label-aware term (relation matching or supcon).
    c.distill.consistency_weight = 0.5    # Clean vs. randomly perturbed student outputs.
    c.distill.adversarial_weight = 0.0    # Clean vs. adversarially perturbed student outputs.
    c.distill.base_kl_weight = 0.0        # KL from the frozen base model on benign rows.
    c.distill.ce_weight = 0.0             # Cross-entropy on the reply tokens (SFT).
    c.distill.l2_weight = 1e-4            # 0.5 * squared norm of each LoRA weight change.
    # Term settings.
    c.distill.divergence = "forward_kl"   # forward_kl, reverse_kl, jsd, skew_kl or tvd.
    c.distill.temperature = 1.0           # Softmax temperature of both distributions (loss * T^2).
    c.distill.reduction = "token"         # token (each reply token weighs 1) or sequence (each row).
    c.distill.opening_tokens = 4          # First reply tokens of a row, where it complies or refuses.
    c.distill.opening_weight = 5.0        # Weight of those tokens in kd/ce/consistency (others 1).
    c.distill.contrastive_temperature = 0.1   # Softmax temperature of the contrastive terms.
    c.distill.contrastive_pooling = "last_prompt"  # last_prompt or reply_mean.
    c.distill.contrastive_symmetric = True    # InfoNCE in both directions, averaged.
    c.distill.contrastive_projection = False  # Train a head mapping student to teacher features.
    c.distill.contrastive_projection_hidden = 0  # Hidden width of that head; 0 = one linear map.
    c.distill.relation_method = "relation"    # relation (teacher's similarities) or supcon.
    c.distill.noise_alpha = 5.0           # Embedding noise magnitude alpha / sqrt(length * hidden).
    c.distill.noise_distribution = "gaussian"  # gaussian or uniform.
    c.distill.consistency_row_stride = 4  # Noisy pass on every 4th row of a batch (a quarter).
    c.distill.consistency_target = "student"   # Match the clean student or the clean teacher.
    c.distill.adversarial_mode = "smart"  # smart (final perturbation) or freelb (averaged).
    c.distill.adversarial_steps = 1       # Ascent steps per training step.
    c.distill.adversarial_epsilon = 1.0   # Ball radius (L2 per sequence, or per element for linf).
    c.distill.adversarial_step_size = 0.5  # Ascent step length (same norm as the epsilon).
    c.distill.adversarial_norm = "l2"     # l2 or linf.
    # Teacher cache: the teacher's top-k log-probabilities on the scored reply tokens of the
    # examples the run draws, computed once into <workdir>/teacher_cache/ and read by the kd term
    # (sparse forward KL) instead of a teacher forward every step.
    c.distill.teacher_cache = config_dict.ConfigDict()
    c.distill.teacher_cache.enabled = False  # Distil kd from the cache (needs divergence forward_kl).
    c.distill.teacher_cache.top_k = 32       # Teacher tokens kept per scored position.
    c.distill.teacher_cache.batch_size = 8   # Examples per teacher forward while building the cache.
    # Text noise in the student's training prompts (the teacher trains on clean text).
    c.distill.text_noise = config_dict.ConfigDict()
    c.distill.text_noise.typo_rate = 0.0        # Share of letters given a typo.
    c.distill.text_noise.case_rate = 0.0        # Share of letters with flipped case.
    c.distill.text_noise.whitespace_rate = 0.0  # Share of spaces doubled, made newlines or dropped.

    c.metrics = config_dict.ConfigDict()
    c.metrics.tensorboard = True    # TensorBoard event files in <workdir>/logs/<run>/<start time>/.
    c.metrics.jsonl = True          # metrics.jsonl (one line per step) in the same directory.

    # Devices: the teacher and distill stages train on a data x fsdp x tensor mesh (one device
    # on this CPU). The product of the sizes must equal the device count of all processes.
    c.mesh = config_dict.ConfigDict()
    c.mesh.data = -1    # Devices that split batch rows, weights replicated; -1 = all the others.
    c.mesh.fsdp = 1     # Devices that split batch rows and weights along the hidden size.
    c.mesh.tensor = 1   # Devices that split heads, MLP columns and vocabulary (must divide 3).

    c.train = config_dict.ConfigDict()
    c.train.grad_accum_steps = 1         # Micro-batches per optimizer step (divides batch_size).
    # Batches whose examples are drawn together, sorted by length within each class and cut into
    # batches (then shuffled), so a batch pads little. Every batch keeps its harmful share. A
    # larger window pads a little less but repeats an example within a batch more often.
    c.train.length_bucket_batches = 16
    # Rows each batch is packed into, several examples per row. Each example attends only to
    # itself, and rows are padded to a multiple of 64 tokens. 0 = one example per row. One
    # process only, with grad_accum_steps=1 and no adversarial term.
    c.train.pack_rows = 0
    # Layer recomputation in the backward pass. none keeps every activation (most memory, least
    # compute). full keeps only each layer's input and recomputes the layer. dots keeps the
    # results of all matrix products. dots_no_batch keeps the projection products but recomputes
    # the attention scores and their weighted sums.
    c.train.remat = "none"
    # Run the decoder layers as a loop over stacked weights (True) or unrolled (False); the
    # parameters are the same. On a 2-core CPU a SmolLM2 LoRA step of 4 x 256 tokens took
    # 1.79 s unrolled against 3.32 s looped in bfloat16, and 3.35 s against 3.6 s in float32.
    # Unrolled compiles about twice as long. On accelerators, loop deep models.
    c.train.scan_layers = False
    # Scored positions per row whose vocabulary logits exist at once in the loss. The projection,
    # log-softmax and divergences run chunk by chunk, and the backward pass recomputes each
    # chunk, so the B x K x V float32 logits of a term are never all in memory. 0 = no chunks.
    c.train.vocab_chunk_size = 0
    c.train.param_dtype = "float32"      # Storage dtype of the frozen backbone and teacher.
    c.train.compute_dtype = "float32"    # Activations and matrix products (bfloat16 on TPU/GPU).
    c.train.output_dtype = "float32"     # Logits; every loss is computed in float32 anyway.
    c.train.peak_flops_per_device = 0.0  # FLOP/s of one device at compute_dtype; 0 = no MFU.
    # "A:B" traces steps A to B of each training stage with jax.profiler into
    # <workdir>/logs/<run>/profile/ (for TensorBoard) and logs where the CPU threads spent their
    # time, by kind of operation (also in profile/summary.json). "" = no trace.
    c.train.profile_steps = ""

    # Checkpoints of the training stages, in <stage dir>/checkpoints; a re-run resumes from them.
    c.checkpoint = config_dict.ConfigDict()
    c.checkpoint.every_steps = 20     # Steps between saves; the last step is always saved.
    c.checkpoint.keep_last = 2        # Newest checkpoints kept.
    c.checkpoint.keep_best = 1        # Checkpoints with the best best_metric kept as well.
    c.checkpoint.best_metric = "loss" # Training metric averaged over the steps since the last save.
    c.checkpoint.best_mode = "min"    # min or max: which end of best_metric is best.
    c.checkpoint.async_save = True    # Write checkpoints in the background while training runs.

    # Multi-process runs (one process per host); see launch/tpu_pod.sh and launch/slurm_gpu.sh.
    c.distributed = config_dict.ConfigDict()
    c.distributed.initialize = "auto"        # auto (from the environment), on or off.
    c.distributed.coordinator_address = ""   # host:port of process 0; "" = detected by JAX.
    c.distributed.num_processes = 0          # Process count with coordinator_address; else 0.
    c.distributed.process_id = -1            # This process's index with coordinator_address.

    c.eval = config_dict.ConfigDict()
    c.eval.limit = 40               # Prompts per evaluation split (seeded subset); 0 = all.
    c.eval.max_new_tokens = 64      # Generated tokens per reply (greedy).
    c.eval.batch_size = 40          # Prompts per generation batch: one batch per 40-prompt subset.
    c.eval.kd_limit = 32            # Prompts for teacher-forced token agreement.

    # Second refusal judge: logistic regression on the base model's mean-pooled hidden states of
    # each reply, fitted on pyrit's human-labelled replies (<workdir>/judge/).
    c.judge = config_dict.ConfigDict()
    # Off here to keep the main job within 30 minutes on 2 cores: fitting takes about 3 minutes
    # and scoring every reply of three models a few more. The studies switch it on.
    c.judge.enabled = False         # Fit the judge and score every evaluation reply with it too.
    c.judge.folds = 5               # Cross-validation folds for its reported scores.
    c.judge.l2 = 1.0                # L2 penalty on the weights of standardized features.
    c.judge.max_prompt_tokens = 128 # Last tokens of the rendered request kept as context.
    c.judge.max_reply_tokens = 128  # First tokens of the reply that are pooled.
    c.judge.batch_size = 8          # Replies per forward pass.

    # Robustness of the models named in `models`: replies regenerated under perturbed prompts.
    c.robustness = config_dict.ConfigDict()
    # "" in the main job: each perturbation regenerates replies (several minutes on 2 cores).
    c.robustness.models = ""              # comma-separated subset of base,teacher,student; "" = none.
    c.robustness.embedding_noise = "5,20" # comma-separated noise alphas on prompt embeddings.
    c.robustness.char_noise = "0.05,0.15" # comma-separated typo, case and whitespace rates.
    c.robustness.limit = 20               # Prompts per split regenerated for each perturbation.
    c.robustness.kl_limit = 8             # Prompts per split for the clean/perturbed symmetric KL.

    # --config.mode=chat: talk to a model of the work directory.
    c.chat = config_dict.ConfigDict()
    c.chat.model = "student"        # base, teacher or student (the one named config.student_name).
    c.chat.prompts_file = ""        # File of prompts, one per line, each a new chat; "" = stdin.
    c.chat.system = ""              # System message; "" keeps the chat template's default.
    c.chat.max_new_tokens = 256     # Tokens per reply at most.
    c.chat.temperature = 0.0        # Sampling temperature; 0 = greedy decoding.
    c.chat.top_p = 1.0              # Probability mass of the sampling nucleus (temperature > 0).

    # --config.mode=export: write a model for PyTorch/PEFT, transformers and llama.cpp.
    c.export = config_dict.ConfigDict()
    c.export.model = "student"        # base, teacher or student.
    c.export.formats = "peft,hf,gguf" # comma-separated subset: PEFT adapter, merged HF dir, GGUF.
    c.export.dir = ""                 # Output directory; "" = <workdir>/export/<model name>.
    c.export.hf_dtype = "float32"     # Weights of the HF export: float32 or float16.
    c.export.gguf_type = "f16"        # Weights of the GGUF export: f32, f16 or q8_0.
    return c
