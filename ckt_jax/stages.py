"""The stages of the main job: data, targets, teacher, distill, eval and report.

Each stage reads what earlier stages left in the work directory, writes its own subdirectory and
finishes by recording the config values it used (see `ckt_jax.workdir`). `Context` carries what
several stages share: the config, the work directory, the tokenizer and the base weights, loaded
once and only when a stage needs them.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import pathlib
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorflow_datasets as tfds
from absl import logging
from ml_collections import config_dict

from ckt_jax import (batching, checkpoint, distributed, evaluation, lora, losses, metric_writers,
                     metrics, peft_format, profiling, sharding, teacher_cache, throughput, trainer,
                     workdir)
from ckt_jax.data import builder as data_builder
from ckt_jax.data import framing, refusals, templates, text_noise
from ckt_jax.generate import greedy_generate
from ckt_jax.loading import find_smollm2_gguf, load_model, model_vocab_size
from ckt_jax.model import REMAT_POLICIES, Llama, LlamaConfig, LoraConfig
from ckt_jax.objective import WEIGHTS, ObjectiveConfig, build_objective
from ckt_jax.refusal_detector import is_refusal, validate_against_human_labels
from ckt_jax.tokenizer import ChatTokenizer
from ckt_jax.train import Precision, to_device_tree

STAGES = ("data", "targets", "teacher", "distill", "eval", "report")
EVAL_SPLITS = ("eval_harmful", "eval_jailbreak", "eval_benign_sensitive", "eval_jailbreak_benign")
TRAIN_SPLITS = ("train_harmful", "train_benign")
# Harmful training prompts held out with data.heldout_fraction > 0, evaluated in distribution.
HELDOUT_SPLIT = "eval_heldout_harmful"
TEACHER_DIR_FILE = "teacher_adapters"
CHECKPOINT_DIR = "checkpoints"
# Offsets from config.seed of the teacher's and the student's initialisation and batch order.
TEACHER_SEED_OFFSET = 101
DISTILL_SEED_OFFSET = 202
REMAT_CHOICES = ("none",) + tuple(REMAT_POLICIES)
# Batches whose examples are drawn together and sorted by length (`config.train.
# length_bucket_batches`); the batch stream used this many before the option existed.
LENGTH_BUCKET_BATCHES = 16


SECTIONS = ("chat", "checkpoint", "data", "distill", "distributed", "eval", "export", "judge",
            "mesh", "metrics", "robustness", "targets", "teacher_train", "train")


def validate_config(config) -> None:
    """Reject config values that would only fail deep inside a stage."""
    missing = [section for section in SECTIONS if section not in config]
    if missing:
        raise ValueError(f"the config has no section {', '.join(f'config.{s}' for s in missing)};"
                         " start from configs/smollm2_cpu.py, which sets every section, and "
                         "change fields instead of deleting sections")
    try:
        _validate_values(config)
    except (AttributeError, KeyError) as err:
        # ml_collections quotes the name, escaped once or twice, then may add a suggestion.
        words = re.sub(r"[\\'\"]", " ", str(err)).split()
        field = words[0] if words else type(err).__name__
        raise ValueError(f"the config has no field {field!r} that ckt_jax needs; start from "
                         "configs/smollm2_cpu.py, which sets every field") from None


def _non_finite_fields(node, prefix: str = "config"):
    """Yield (dotted name, value) for every NaN or infinite float of a config tree."""
    for key, value in node.items():
        name = f"{prefix}.{key}"
        if isinstance(value, config_dict.ConfigDict):
            yield from _non_finite_fields(value, name)
        elif isinstance(value, float) and not math.isfinite(value):
            yield name, value


def _validate_values(config) -> None:
    for name, value in _non_finite_fields(config):
        # A NaN fails every comparison below, so `weight > 0` would switch a term off silently.
        raise ValueError(f"{name}={value} is not a finite number; use a finite value")
    name = str(config.student_name)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) or name in ("base", "teacher"):
        raise ValueError(f"config.student_name={name!r} is invalid; use letters, digits, '_', "
                         "'.' or '-', and neither 'base' nor 'teacher'")
    for field, value in (("data.heldout_fraction", config.data.get("heldout_fraction", 0.0)),
                         ("distill.label_noise", config.distill.get("label_noise", 0.0))):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"config.{field}={value} is outside [0, 1); use a share such as 0.2")
    text_noise = config.distill.get("text_noise")
    for field in ("typo_rate", "case_rate", "whitespace_rate"):
        rate = text_noise.get(field, 0.0) if text_noise is not None else 0.0
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"config.distill.text_noise.{field}={rate} is outside [0, 1]; use "
                             "a share such as 0.05")
    if config.data.max_benign_prompts < 0:
        raise ValueError(f"config.data.max_benign_prompts={config.data.max_benign_prompts} must "
                         "be >= 0 (0 uses every benign prompt)")
    if config.data.max_seq_len < 2:
        raise ValueError(f"config.data.max_seq_len={config.data.max_seq_len} must be >= 2 (a "
                         "prompt token and a reply token), for example 192")
    if not 0.0 <= config.data.wrapped_fraction <= 1.0:
        raise ValueError(f"config.data.wrapped_fraction={config.data.wrapped_fraction} is "
                         "outside [0, 1]")
    for section in ("data", "teacher_train", "distill"):
        fraction = config[section].get("harmful_fraction", 0.5)
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"config.{section}.harmful_fraction={fraction} must be strictly "
                             "between 0 and 1, so batches contain both classes")
    for section in ("teacher_train", "distill"):
        for field in ("steps", "batch_size", "lora_rank"):
            if config[section][field] < 1:
                raise ValueError(f"config.{section}.{field}={config[section][field]} must be >= 1")
        if not config[section].learning_rate > 0:
            raise ValueError(f"config.{section}.learning_rate={config[section].learning_rate} "
                             "must be > 0, for example 2e-3")
        if config[section].warmup_steps < 0:
            raise ValueError(f"config.{section}.warmup_steps={config[section].warmup_steps} "
                             "must be >= 0")
    if config.log_every < 1:
        raise ValueError(f"config.log_every={config.log_every} must be >= 1 (steps between "
                         "training log lines)")
    if config.eval.limit < 0:
        raise ValueError(f"config.eval.limit={config.eval.limit} must be >= 0 (0 evaluates "
                         "every prompt)")
    for section, field in (("eval", "kd_limit"), ("eval", "max_new_tokens"),
                           ("eval", "batch_size"), ("targets", "max_new_tokens"),
                           ("targets", "batch_size")):
        if config[section][field] < 1:
            raise ValueError(f"config.{section}.{field}={config[section][field]} must be >= 1")
    for axis in sharding.AXES:
        size = config.mesh[axis]
        if not isinstance(size, int) or size == 0 or size < -1:
            raise ValueError(f"config.mesh.{axis}={size!r} is invalid; use a positive size, or -1 "
                             "for the devices the other axes leave")
    train = config.train
    Precision.from_config(train)
    if train.remat not in REMAT_CHOICES:
        raise ValueError(f"config.train.remat={train.remat!r} is unknown; use one of "
                         f"{', '.join(REMAT_CHOICES)}")
    scan_layers = train.get("scan_layers", True)
    if not isinstance(scan_layers, bool):
        raise ValueError(f"config.train.scan_layers={scan_layers!r} is not a bool; use True (a "
                         "loop over the layers) or False (the layers unrolled)")
    profiling.parse_steps(train.get("profile_steps", ""))
    vocab_chunk_size = train.get("vocab_chunk_size", 0)
    if not isinstance(vocab_chunk_size, int) or vocab_chunk_size < 0:
        raise ValueError(f"config.train.vocab_chunk_size={vocab_chunk_size!r} is invalid; use 0 "
                         "(no chunks) or a positive number of positions such as 16")
    _validate_length_buckets(config)
    _validate_packing(config)
    if train.grad_accum_steps < 1:
        raise ValueError(f"config.train.grad_accum_steps={train.grad_accum_steps} must be >= 1")
    for section in ("teacher_train", "distill"):
        if config[section].batch_size % train.grad_accum_steps:
            raise ValueError(
                f"config.{section}.batch_size={config[section].batch_size} is not a multiple of "
                f"config.train.grad_accum_steps={train.grad_accum_steps}")
    if not train.peak_flops_per_device >= 0:
        raise ValueError(f"config.train.peak_flops_per_device={train.peak_flops_per_device} must "
                         "be >= 0 (0 turns the MFU estimate off)")
    checkpoint.CheckpointOptions.from_config(config.checkpoint)
    best_metric = config.checkpoint.best_metric
    metrics = ["loss"] + [f"loss/{name[:-len('_weight')]}" for name in WEIGHTS]
    if best_metric not in metrics:
        raise ValueError(f"config.checkpoint.best_metric={best_metric!r} is not a training "
                         f"metric; use one of {', '.join(metrics)}")
    distributed.validate_config(config.distributed)
    evaluation.validate_config(config)
    # The LoRA and objective settings are checked here too, so a typo fails at start-up and not
    # after the stages before training.
    for section in ("teacher_train", "distill"):
        try:
            _lora_config(config[section])
        except ValueError as err:
            raise ValueError(str(err).replace("LoraConfig.", f"config.{section}.lora_")) from None
    _validate_teacher_cache(config.distill)
    try:
        distill_objective(config)
    except ValueError as err:
        message = str(err)
        if message.startswith("max_target_tokens"):
            raise ValueError(f"config.data.{message}") from None
        if re.match(r"\w+=", message):
            raise ValueError(f"config.distill.{message}") from None
        raise ValueError(f"config.distill: {message}") from None


def _validate_length_buckets(config) -> None:
    window = config.train.get("length_bucket_batches", LENGTH_BUCKET_BATCHES)
    wrapped = config.data.wrapped_fraction
    # Each group (plain and wrapped prompts) needs at least one batch of every window.
    shares = [share for share in (1.0 - wrapped, wrapped) if share > 0]
    least = max(math.floor(0.5 / share) + 1 for share in shares)
    if not isinstance(window, int) or window < least:
        raise ValueError(f"config.train.length_bucket_batches={window!r} is invalid; use at "
                         f"least {least} batches for config.data.wrapped_fraction={wrapped}, "
                         f"for example {LENGTH_BUCKET_BATCHES}")


def _validate_packing(config) -> None:
    rows = config.train.get("pack_rows", 0)
    if not isinstance(rows, int) or rows < 0:
        raise ValueError(f"config.train.pack_rows={rows!r} is invalid; use 0 (one example per "
                         "row) or a number of packed rows per batch such as 4")
    if not rows:
        return
    for section in ("teacher_train", "distill"):
        if rows > config[section].batch_size:
            raise ValueError(f"config.train.pack_rows={rows} exceeds config.{section}.batch_size="
                             f"{config[section].batch_size}; use at most that many rows")
    if config.train.grad_accum_steps > 1:
        raise ValueError(f"config.train.pack_rows={rows} cannot be combined with "
                         f"config.train.grad_accum_steps={config.train.grad_accum_steps}; set "
                         "config.train.grad_accum_steps=1 or config.train.pack_rows=0")
    if config.distributed.num_processes > 1:
        raise ValueError(f"config.train.pack_rows={rows} works on one process only; set "
                         "config.train.pack_rows=0 for config.distributed.num_processes="
                         f"{config.distributed.num_processes}")
    if config.distill.adversarial_weight > 0:
        raise ValueError(f"config.train.pack_rows={rows} does not support the adversarial term; "
                         "set config.distill.adversarial_weight=0 or config.train.pack_rows=0")


def _validate_teacher_cache(distill) -> None:
    cache = distill.get("teacher_cache")
    if cache is None or not cache.enabled:
        return
    for field in ("top_k", "batch_size"):
        if cache[field] < 1:
            raise ValueError(f"config.distill.teacher_cache.{field}={cache[field]} must be >= 1")
    if distill.divergence != "forward_kl":
        raise ValueError(f"config.distill.divergence={distill.divergence!r} cannot be computed "
                         "from the teacher cache, which keeps only the top-k; set "
                         "config.distill.divergence=forward_kl or "
                         "config.distill.teacher_cache.enabled=False")


def _check_cache_top_k(top_k: int, vocab_size: int) -> None:
    if top_k > vocab_size:
        raise ValueError(f"config.distill.teacher_cache.top_k={top_k} exceeds the vocabulary "
                         f"size {vocab_size}; use at most that")


def check_model_settings(ctx: "Context", selected: tuple[str, ...] | list[str]) -> None:
    """Check the settings that depend on the model's files, before any of `selected` runs.

    Reads the model's metadata only, so a bad value fails in seconds, not after the stages
    before the one that uses it.
    """
    if any(name in selected for name in ("targets", "teacher", "distill", "eval")):
        resolve_model_spec(ctx.config.model)  # Raises an error that names config.model.
    teacher = ctx.config.teacher
    if teacher and any(name in selected for name in ("distill", "eval")):
        path = pathlib.Path(teacher).expanduser()
        if not path.exists():
            resolve_model_spec(teacher, "config.teacher")
    cache = ctx.config.distill.get("teacher_cache")
    if "distill" in selected and cache is not None and cache.enabled:
        # The teacher shares the student's vocabulary (`teacher_params` checks it).
        _check_cache_top_k(cache.top_k, model_vocab_size(ctx.model_path))


def resolve_model_spec(spec: str, field: str = "config.model") -> pathlib.Path:
    """Map the config's model name (in `field`) to a file or directory path."""
    if spec == "smollm2":
        return find_smollm2_gguf()
    path = pathlib.Path(spec).expanduser()
    if not path.exists():
        kinds = ("a teacher stage directory, a PEFT adapter directory, " if field ==
                 "config.teacher" else "")
        raise FileNotFoundError(f"{field}={spec!r} not found; pass 'smollm2', {kinds}a .gguf "
                                "file or a Hugging Face directory")
    return path.resolve()


@dataclasses.dataclass
class Context:
    config: config_dict.ConfigDict
    root: pathlib.Path
    timings: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def data_dir(self) -> pathlib.Path:
        return self.root / "data"

    @functools.cached_property
    def model_path(self) -> pathlib.Path:
        return resolve_model_spec(self.config.model)

    @functools.cached_property
    def tokenizer(self) -> ChatTokenizer:
        if self.model_path.is_dir():
            return ChatTokenizer.from_hf_directory(self.model_path)
        return ChatTokenizer.from_gguf(self.model_path, cache_dir=self.root / "tokenizer")

    @functools.cached_property
    def base(self) -> tuple[LlamaConfig, Any]:
        """Base model config and weights (float32 device arrays), loaded once."""
        started = time.perf_counter()
        model_config, params = load_model(self.model_path)
        params = to_device_tree(params)
        logging.info("loaded %s in %.1f s", self.model_path, time.perf_counter() - started)
        return model_config, params

    def split(self, name: str) -> list[dict]:
        if not (self.data_dir / "split_counts.json").exists():
            raise FileNotFoundError(f"no data splits in {self.data_dir}; run the 'data' stage "
                                    "first (add it to --config.stages)")
        return data_builder.load_split(self.data_dir, name)

    @functools.cached_property
    def mesh(self):
        """The training mesh from `config.mesh`, over every device of every process."""
        return sharding.mesh_from_config(self.config.mesh)

    def stage_dir(self, name: str) -> pathlib.Path:
        return self.root / name

    @property
    def student_name(self) -> str:
        return self.config.student_name

    @property
    def student_dir(self) -> pathlib.Path:
        # Students trained with different objectives share data, targets and teacher, each
        # under its own name.
        return self.root / "students" / self.student_name


def _config_record(config, *fields: str) -> dict:
    """Collect the config values a stage depends on, as plain JSON-compatible data."""
    record = {}
    for field in fields:
        value = config
        for part in field.split("."):
            value = value[part]
        record[field] = value.to_dict() if isinstance(value, config_dict.ConfigDict) else value
    return record


def _targets_record(config) -> dict:
    return _config_record(config, "model", "seed", "targets.max_new_tokens",
                          "data.max_benign_prompts")


# Training settings that change the numbers, and their defaults. They enter a stage's record
# only when they differ from the default, so work directories made before these settings existed
# stay valid. The mesh, remat and checkpoint settings do not change the results beyond float
# rounding, so a run may resume with other values.
_NUMERIC_TRAIN_DEFAULTS = {"grad_accum_steps": 1, "param_dtype": "float32",
                           "compute_dtype": "float32", "output_dtype": "float32",
                           "length_bucket_batches": LENGTH_BUCKET_BATCHES,
                           # Packing changes the shape of the consistency noise draws.
                           "pack_rows": 0}


def _train_record(config) -> dict:
    return {f"train.{field}": config.train.get(field, default) for field, default in
            _NUMERIC_TRAIN_DEFAULTS.items() if config.train.get(field, default) != default}


# Data and distill settings added after work directories existed: they enter a record only when
# they differ from these defaults, so older work directories stay valid.
_NEW_FIELD_DEFAULTS = {"data": {"heldout_fraction": 0.0}, "distill": {"label_noise": 0.0}}


# Options added after study cells existed: (the field, its value that leaves training as it
# was, the field or group dropped at that value). `config_without_added_defaults` drops them,
# so the config digests of study cells made before they existed still match.
ADDED_OPTIONS = (
    (("distill", "teacher_cache", "enabled"), False, ("distill", "teacher_cache")),
    (("train", "vocab_chunk_size"), 0, ("train", "vocab_chunk_size")),
    (("train", "length_bucket_batches"), LENGTH_BUCKET_BATCHES,
     ("train", "length_bucket_batches")),
    (("train", "pack_rows"), 0, ("train", "pack_rows")),
    (("train", "scan_layers"), True, ("train", "scan_layers")),
    (("train", "profile_steps"), "", ("train", "profile_steps")),
)


def config_without_added_defaults(values: dict) -> dict:
    """Return a copy of `config.to_dict()` without the added options at their defaults."""
    values = copy.deepcopy(values)
    for field, default, dropped in ADDED_OPTIONS:
        node = values
        for part in field[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or node.get(field[-1], default) != default:
            continue
        parent = values
        for part in dropped[:-1]:
            parent = parent[part]
        parent.pop(dropped[-1], None)
    return values


def _section_record(config, section: str) -> dict:
    record = _config_record(config, section)
    values = dict(record[section])
    for field, default in _NEW_FIELD_DEFAULTS.get(section, {}).items():
        if values.get(field, default) == default:
            values.pop(field, None)
    values = config_without_added_defaults({section: values})[section]
    if "teacher_cache" in values:
        # The build batch size of the teacher cache does not change the cached values.
        values["teacher_cache"] = {k: v for k, v in values["teacher_cache"].items()
                                   if k != "batch_size"}
    return {section: values}


def _teacher_record(config) -> dict:
    return {**_targets_record(config), **_config_record(config, "teacher"),
            **_section_record(config, "data"), **_config_record(config, "teacher_train"),
            **_train_record(config)}


def _distill_record(config) -> dict:
    return {**_teacher_record(config), **_section_record(config, "distill")}


# --------------------------------------------------------------------------------------------
# data: build the splits from the packaged files.
# --------------------------------------------------------------------------------------------

def run_data(ctx: Context) -> None:
    # TFDS draws one progress bar per split into the log; the split counts below report the same.
    tfds.disable_progress_bar()
    counts = data_builder.build_dataset(ctx.data_dir)
    for name, count in sorted(counts.items()):
        logging.info("split %-24s %5d prompts", name, count)
    workdir.write_json(ctx.data_dir / "split_counts.json", counts)


# --------------------------------------------------------------------------------------------
# targets: the base model's own greedy replies to benign training prompts.
# --------------------------------------------------------------------------------------------

def _benign_prompts(ctx: Context) -> list[dict]:
    rows = ctx.split("train_benign")
    limit = ctx.config.data.max_benign_prompts
    if limit and len(rows) > limit:
        order = np.random.default_rng(ctx.config.seed).permutation(len(rows))[:limit]
        rows = [rows[i] for i in sorted(order)]
    return rows


def generate_replies(ctx: Context, model_config: LlamaConfig, model_params, prompts: list[str],
                     max_new_tokens: int, batch_size: int, what: str,
                     openings_ids: list[list[int]] | None = None) -> list[dict]:
    """Greedy replies (chat template applied) with a `complete` flag for rows that hit eos.

    With ``openings_ids`` each row also gets `opening_scores`, the log-probability of each
    opening after the prompt (see `greedy_generate`).
    """
    model = Llama(model_config)
    tok = ctx.tokenizer
    prompt_ids = [tok.encode_chat(p)[0] for p in prompts]
    started = time.perf_counter()

    def progress(finished: int, total: int) -> None:
        elapsed = time.perf_counter() - started
        logging.info("%s: %d/%d replies, %.1f s elapsed, %.0f s left", what, finished, total,
                     elapsed, elapsed / max(finished, 1) * (total - finished))

    outputs = greedy_generate(model, model_params, prompt_ids, max_new_tokens=max_new_tokens,
                              eos_id=tok.eos_id, pad_id=tok.pad_id, batch_size=batch_size,
                              progress=progress, openings_ids=openings_ids)
    scores = None
    if openings_ids is not None:
        outputs, scores = outputs
    rows = []
    for index, ids in enumerate(outputs):
        rows.append({"reply": tok.decode(ids), "complete": len(ids) < max_new_tokens,
                     "new_tokens": len(ids)})
        if scores is not None:
            rows[-1]["opening_scores"] = scores[index]
    total_tokens = sum(r["new_tokens"] for r in rows)
    elapsed = time.perf_counter() - started
    logging.info("%s: %d replies, %d tokens in %.1f s (%.0f tokens/s)", what, len(rows),
                 total_tokens, elapsed, total_tokens / max(elapsed, 1e-9))
    return rows


def run_targets(ctx: Context) -> None:
    out_dir = ctx.stage_dir("targets")
    record = _targets_record(ctx.config)
    if workdir.stage_done(out_dir, record):
        logging.info("targets: reusing %s", out_dir)
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    prompts = _benign_prompts(ctx)
    model_config, params = ctx.base
    replies = generate_replies(ctx, model_config, params, [r["prompt"] for r in prompts],
                               ctx.config.targets.max_new_tokens, ctx.config.targets.batch_size,
                               "targets")
    rows = [{"id": p["id"], "prompt": p["prompt"], **r} for p, r in zip(prompts, replies)]
    workdir.write_jsonl(out_dir / "benign_replies.jsonl", rows)
    workdir.mark_stage_done(out_dir, record, {"replies": len(rows)})


# --------------------------------------------------------------------------------------------
# Training examples shared by the teacher and the student.
# --------------------------------------------------------------------------------------------

def harmful_training_prompts(ctx: Context) -> tuple[list[dict], list[dict]]:
    """Split train_harmful into (training prompts, held-out prompts).

    A seeded share `data.heldout_fraction` is held out from the teacher's and the student's
    training and evaluated as the in-distribution split eval_heldout_harmful.
    """
    rows = ctx.split("train_harmful")
    fraction = ctx.config.data.get("heldout_fraction", 0.0)
    if not fraction:
        return rows, []
    order = np.random.default_rng(ctx.config.seed + 3).permutation(len(rows))
    held = set(order[:int(round(fraction * len(rows)))].tolist())
    return ([r for i, r in enumerate(rows) if i not in held],
            [r for i, r in enumerate(rows) if i in held])


def flip_labels(rows: list[dict], share: float, seed: int) -> int:
    """Flip the target of a seeded share of rows, in place; return how many were flipped.

    A flipped benign row gets a refusal and the harmful label. A flipped harmful row gets the
    label benign and a compliant target: the base model's reply to another, benign prompt, so
    no harmful text is ever written.
    """
    if not share:
        return 0
    benign_replies = [row["reply"] for row in rows if row["label"] == "benign"]
    rng = np.random.default_rng(seed)
    chosen = np.flatnonzero(rng.random(len(rows)) < share)
    for index in chosen:
        row = rows[index]
        if row["label"] == "harmful":
            if not benign_replies:
                continue
            row.update(label="benign", reply=benign_replies[int(rng.integers(len(benign_replies)))],
                       complete=True)
        else:
            row.update(label="harmful", reply=refusals.pick_refusal(row["id"], seed),
                       complete=True)
    return len(chosen)


def training_rows(ctx: Context, text_noise_rates=None, label_noise: float = 0.0) -> list[dict]:
    """Prompt/reply rows: refusals for harmful prompts, base replies for benign ones.

    Each prompt also appears wrapped in a seeded in-the-wild jailbreak template, and (with
    `data.instruction_frames`) inside a format or style request from `ckt_jax.data.framing`, both
    with the same target, so the model learns to judge the request inside the wrapper rather
    than the wrapper.
    Text noise (typos, casing, whitespace) at `text_noise_rates` (the student's
    `distill.text_noise`; the teacher trains on clean text) is applied to the request before
    wrapping; the targets stay clean. `label_noise` (the student's `distill.label_noise`) flips
    that share of targets before the variants are made (see `flip_labels`).
    """
    cfg = ctx.config
    rng = np.random.default_rng(cfg.seed + 1)
    wrappers = templates.train_templates(max_chars=cfg.data.train_template_max_chars)
    if not wrappers:
        raise ValueError(f"no training templates of at most data.train_template_max_chars="
                         f"{cfg.data.train_template_max_chars} characters; raise it")
    rows = []
    for prompt in harmful_training_prompts(ctx)[0]:
        reply = refusals.pick_refusal(prompt["id"], cfg.seed)
        rows.append({"id": prompt["id"], "prompt": prompt["prompt"], "reply": reply,
                     "label": "harmful", "complete": True})
    replies_path = ctx.stage_dir("targets") / "benign_replies.jsonl"
    if not replies_path.exists():
        raise FileNotFoundError(f"{replies_path} is missing; run the 'targets' stage first")
    for row in workdir.read_jsonl(replies_path):
        rows.append({"id": row["id"], "prompt": row["prompt"], "reply": row["reply"],
                     "label": "benign", "complete": row["complete"]})
    flipped = flip_labels(rows, label_noise, cfg.seed + 4)
    if flipped:
        logging.info("label noise: flipped the targets of %d of %d prompts", flipped, len(rows))
    noise = text_noise_rates
    if noise is not None and (noise.typo_rate or noise.case_rate or noise.whitespace_rate):
        noise_rng = np.random.default_rng(cfg.seed + 2)
        for row in rows:
            row["prompt"] = text_noise.apply_text_noise(row["prompt"], noise, noise_rng)
    variants = []
    for row in rows:
        template = wrappers[int(rng.integers(len(wrappers)))]
        variants.append({**row, "prompt": templates.wrap(template, row["prompt"]),
                         "id": row["id"] + "/wrapped", "wrapped": True})
        if cfg.data.instruction_frames:
            # Framed copies are short, so they train in the plain-prompt batches.
            variants.append({**row, "prompt": framing.frame(row["prompt"], rng),
                             "id": row["id"] + "/framed"})
    return rows + variants


def training_examples(ctx: Context, text_noise_rates=None,
                      label_noise: float = 0.0) -> list[batching.Example]:
    rows = training_rows(ctx, text_noise_rates, label_noise)
    examples, dropped = batching.tokenize_examples(ctx.tokenizer, rows, ctx.config.data.max_seq_len)

    def count(label, wrapped):
        return sum(e.label == label and e.wrapped == wrapped for e in examples)

    logging.info("training examples: harmful %d plain + %d wrapped, benign %d plain + %d wrapped "
                 "(%d longer than %d tokens dropped)", count("harmful", False),
                 count("harmful", True), count("benign", False), count("benign", True), dropped,
                 ctx.config.data.max_seq_len)
    return examples


def padding_report(ctx: Context, section_name: str = "distill", length_bucket_batches: int = 64,
                   pack_rows: tuple[int, ...] = (2, 4)) -> dict[str, dict[str, float]]:
    """Measure the padding share of a training stage's batches, as drawn and as packed.

    Draws the `config.<section_name>.steps` batches that the stage trains on (the same seeded
    stream) and returns `batching.padding_report` for them. Its `bucketed` entry is the same
    number of batches from the stream that `config.train.length_bucket_batches` set to
    `length_bucket_batches` draws, and `packed_<r>_rows` packs each batch into `r` rows for every
    `r` in `pack_rows`. Needs the data and targets stages of `ctx.root`; nothing is trained. For example, on a finished main-job work directory:

        config = config_files.load_module("configs/smollm2_cpu.py").get_config()
        stages.padding_report(stages.Context(config=config, root=pathlib.Path(workdir)))
    """
    section = ctx.config[section_name]
    if section_name == "distill":
        examples = training_examples(ctx, section.text_noise, section.get("label_noise", 0.0))
        seed_offset = DISTILL_SEED_OFFSET
    else:
        examples, seed_offset = training_examples(ctx), TEACHER_SEED_OFFSET
    stream = _batch_stream(ctx, section, examples, seed_offset)
    bucketed = _batch_stream(ctx, section, examples, seed_offset, length_bucket_batches)
    return batching.padding_report(stream, section.steps, ctx.config.data.max_seq_len,
                                   bucketed=bucketed, pack_rows=pack_rows)


def _lora_config(section) -> LoraConfig:
    targets = tuple(t.strip() for t in str(section.lora_targets).split(",") if t.strip())
    return LoraConfig(rank=section.lora_rank, alpha=section.lora_alpha, targets=targets)


def _model_kwargs(train_cfg) -> dict:
    """Precision and remat settings of the models a training stage runs, from `config.train`."""
    precision = Precision.from_config(train_cfg)
    return dict(dtype=precision.compute_dtype, param_dtype=precision.param_dtype,
                output_dtype=precision.output_dtype, remat=train_cfg.remat != "none",
                remat_policy="full" if train_cfg.remat == "none" else train_cfg.remat,
                scan_layers=train_cfg.get("scan_layers", True))


def _batch_stream(ctx: Context, section, examples: list[batching.Example],
                  seed_offset: int, length_bucket_batches: int | None = None,
                  ) -> batching.BatchStream:
    """Build the seeded batch stream of a training section.

    `length_bucket_batches` overrides `config.train.length_bucket_batches`, the number of
    batches whose examples are sorted by length together.
    """
    # A training section may set its own class mix; the data section's is the default.
    harmful_fraction = section.get("harmful_fraction", ctx.config.data.harmful_fraction)
    if length_bucket_batches is None:
        length_bucket_batches = ctx.config.train.get("length_bucket_batches",
                                                     LENGTH_BUCKET_BATCHES)
    return batching.BatchStream(
        examples, section.batch_size, harmful_fraction,
        seed=ctx.config.seed + seed_offset, pad_id=ctx.tokenizer.pad_id,
        max_seq_len=ctx.config.data.max_seq_len, wrapped_fraction=ctx.config.data.wrapped_fraction,
        pool_batches=length_bucket_batches, pack_rows=ctx.config.train.get("pack_rows", 0))


def train_adapters(ctx: Context, *, name: str, section, lora_config: LoraConfig,
                   objective: ObjectiveConfig, frozen_params: dict,
                   teacher_config: LlamaConfig | None, examples: list[batching.Example],
                   seed_offset: int, stage_dir: pathlib.Path, record: dict,
                   batch_fields=None, identity: dict | None = None,
                   ) -> tuple[Any, list[dict]]:
    """Train LoRA adapters on the frozen backbone; return (adapter params, metrics history).

    Training is sharded over `ctx.mesh` and checkpointed into `stage_dir/checkpoints`; a run
    that finds a checkpoint there resumes from it. `batch_fields` adds arrays to every batch
    (see `BatchStream`), and `identity` adds entries to the identity every checkpoint must match.
    """
    model_config, _ = ctx.base
    train_cfg = ctx.config.train
    precision = Precision.from_config(train_cfg)
    model_kwargs = _model_kwargs(train_cfg)
    student = Llama(model_config, lora=lora_config, **model_kwargs)
    teacher = Llama(teacher_config, **model_kwargs) if teacher_config is not None else None
    if teacher_config is not None:
        sharding.check_model_fits_mesh(teacher_config, ctx.mesh, "teacher")

    rng = jax.random.fold_in(jax.random.PRNGKey(ctx.config.seed), seed_offset)
    init_rng, train_rng = jax.random.split(rng)
    dummy = jnp.zeros((1, 8), jnp.int32)
    # Adapters are initialised in float32 whatever the parameter dtype: they are the trained copy.
    adapter_params = lora.init_adapter_params(
        lambda r: Llama(model_config, lora=lora_config).init(r, dummy)["params"], init_rng)
    head = None
    if objective.contrastive_projection:
        # The head maps student features into the teacher's feature space.
        teacher_width = teacher.config.hidden_size
        head = losses.ProjectionHead(features=teacher_width,
                                     hidden_features=section.contrastive_projection_hidden or None)
        head_rng = jax.random.fold_in(init_rng, 1)
        adapter_params = {**adapter_params, **losses.init_projection_head(
            head, head_rng, model_config.hidden_size)}
    logging.info("%s: %d adapter parameters (LoRA rank %d on %s), backbone frozen", name,
                 lora.count_params(adapter_params), lora_config.rank, ",".join(lora_config.targets))
    frozen_params = jax.tree_util.tree_map(lambda x: x.astype(precision.param_dtype),
                                           frozen_params)
    schedule = lora.warmup_cosine(section.learning_rate, section.steps, section.warmup_steps)
    optimizer = lora.make_adapter_optimizer(schedule)
    loss_fn = build_objective(student, teacher, objective, head=head)
    batches = _batch_stream(ctx, section, examples, seed_offset)
    batches.batch_fields = batch_fields

    def flops_per_step(batch_shape: tuple) -> float:
        return throughput.objective_flops(objective, model_config, lora_config, teacher_config,
                                          *batch_shape)

    # Per-step metrics go to logs/teacher/ or logs/<student name>/ (TensorBoard and JSONL).
    run_name = ctx.student_name if name == "distill" else name
    writers = metric_writers.open_run_writers(
        ctx.root / "logs" / run_name, tensorboard=ctx.config.metrics.tensorboard,
        jsonl=ctx.config.metrics.jsonl)
    with writers:
        return trainer.run_training(
            name=name, loss_fn=loss_fn, optimizer=optimizer, adapter_params=adapter_params,
            frozen_params=frozen_params, batches=batches, batch_size=section.batch_size,
            num_steps=section.steps, rng=train_rng, mesh=ctx.mesh,
            accumulation_steps=train_cfg.grad_accum_steps,
            checkpoint_dir=stage_dir / CHECKPOINT_DIR,
            checkpoint_options=checkpoint.CheckpointOptions.from_config(ctx.config.checkpoint),
            identity={"config": record, "examples": batching.examples_fingerprint(examples),
                      **(identity or {})},
            log_every=ctx.config.log_every, flops_per_step=flops_per_step,
            peak_flops_per_device=train_cfg.peak_flops_per_device,
            on_metrics=metric_writers.training_callback(writers, schedule),
            profiler=profiling.StepProfiler(
                profiling.parse_steps(train_cfg.get("profile_steps", "")),
                ctx.root / "logs" / run_name / "profile", name=name))


def host_tree(tree):
    """Fetch a (possibly multi-process sharded) tree as full NumPy arrays on every process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


def save_adapters(directory: pathlib.Path, adapter_params) -> None:
    """Save adapters as one orbax checkpoint; a collective call on multi-process runs.

    An existing directory is overwritten: callers only save for a stage that is not finished,
    so it can only be left by a run that stopped between this save and marking the stage done.
    """
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory.resolve(), host_tree(adapter_params), force=True)
    checkpointer.wait_until_finished()


def load_adapters(directory: pathlib.Path):
    """Restore the adapters that `save_adapters` wrote; a damaged copy raises one ValueError."""
    if not directory.is_dir():
        raise FileNotFoundError(f"no adapters in {directory}; run the stage that trains them")
    try:
        return ocp.StandardCheckpointer().restore(directory.resolve())
    except Exception as err:  # noqa: BLE001 - orbax and tensorstore raise many kinds.
        raise ValueError(f"adapters in {directory} are unreadable "
                         f"({workdir.error_summary(err)}); delete {directory.parent} and run its "
                         "stage again") from err


# --------------------------------------------------------------------------------------------
# teacher: LoRA on every linear layer, trained with cross-entropy on the targets, then merged.
# --------------------------------------------------------------------------------------------

def run_teacher(ctx: Context) -> None:
    if ctx.config.teacher:
        logging.info("teacher: using %s (config.teacher), no training", ctx.config.teacher)
        return
    out_dir = ctx.stage_dir("teacher")
    record = _teacher_record(ctx.config)
    if workdir.stage_done(out_dir, record):
        logging.info("teacher: reusing %s", out_dir)
        return
    section = ctx.config.teacher_train
    model_config, base_params = ctx.base
    # Before the examples are built, so a mesh that does not fit fails at once.
    sharding.check_model_fits_mesh(model_config, ctx.mesh, "student")
    sharding.check_batch_fits_mesh(section.batch_size, ctx.mesh, ctx.config.train.grad_accum_steps,
                                   field="teacher_train.batch_size")
    adapters, history = train_adapters(
        ctx, name="teacher", section=section, lora_config=_lora_config(section),
        objective=ObjectiveConfig(ce_weight=1.0,
                                  max_target_tokens=ctx.config.data.max_target_tokens,
                                  vocab_chunk_size=ctx.config.train.get("vocab_chunk_size", 0)),
        frozen_params={"backbone": base_params}, teacher_config=None,
        examples=training_examples(ctx), seed_offset=TEACHER_SEED_OFFSET, stage_dir=out_dir,
        record=record)
    _finish_training_stage(out_dir, out_dir / TEACHER_DIR_FILE, adapters, history, record)


def _finish_training_stage(out_dir: pathlib.Path, adapter_dir: pathlib.Path, adapters,
                           history: list[dict], record: dict) -> None:
    """Save the final adapters, then (process 0) the history and the stage record, last."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_adapters(adapter_dir, adapters)
    if distributed.is_primary():
        workdir.write_jsonl(out_dir / "history.jsonl", history)
        workdir.mark_stage_done(out_dir, record, {"final_loss": history[-1]["loss"],
                                                  "seconds": history[-1]["seconds"]})


def teacher_params(ctx: Context):
    """Load the teacher's weights: trained here (base + merged LoRA) or loaded from config.teacher."""
    spec = ctx.config.teacher
    if spec:
        path = pathlib.Path(spec).expanduser()
        if (path / "stage.json").exists() and (path / TEACHER_DIR_FILE).exists():
            return _merged(ctx, path / TEACHER_DIR_FILE, ctx.config.teacher_train)
        if peft_format.is_peft_adapter_dir(path):
            # A LoRA teacher trained with PEFT on the same base model.
            lora_config, adapters = peft_format.load_peft_adapter(path, ctx.base[0])
            full = lora.combine_params(to_device_tree(adapters), ctx.base[1])
            return lora.merge_lora(full, lora_config.scale)
        teacher_config, params = load_model(resolve_model_spec(spec, "config.teacher"))
        if teacher_config.vocab_size != ctx.base[0].vocab_size:
            raise ValueError(f"teacher {spec} has vocab_size={teacher_config.vocab_size}, the "
                             f"student {ctx.base[0].vocab_size}; distillation needs one vocabulary")
        return to_device_tree(params)
    out_dir = ctx.stage_dir("teacher")
    if not (out_dir / "stage.json").exists():
        raise FileNotFoundError(f"no teacher in {out_dir}; run the 'teacher' stage first")
    return _merged(ctx, out_dir / TEACHER_DIR_FILE, ctx.config.teacher_train)


def teacher_model_config(ctx: Context) -> LlamaConfig:
    spec = ctx.config.teacher
    path = pathlib.Path(spec).expanduser()
    if spec and not (path / "stage.json").exists() and not peft_format.is_peft_adapter_dir(path):
        return load_model(resolve_model_spec(spec, "config.teacher"))[0]
    return ctx.base[0]


def _merged(ctx: Context, adapter_dir: pathlib.Path, section):
    _, base_params = ctx.base
    adapters = to_device_tree(load_adapters(adapter_dir))
    full = lora.combine_params(adapters, base_params)
    return lora.merge_lora(full, lora.lora_scale(section.lora_rank, section.lora_alpha))


# --------------------------------------------------------------------------------------------
# distill: the student's LoRA adapters learn from the teacher on the frozen backbone.
# --------------------------------------------------------------------------------------------

def distill_objective(config) -> ObjectiveConfig:
    """Build the student's objective from every `config.distill` field that names an ObjectiveConfig field."""
    known = {field.name for field in dataclasses.fields(ObjectiveConfig)}
    settings = {k: v for k, v in config.distill.items() if k in known}
    cache = config.distill.get("teacher_cache")
    if cache is not None and cache.enabled:
        settings["cached_teacher_top_k"] = cache.top_k
    return ObjectiveConfig(**settings, max_target_tokens=config.data.max_target_tokens,
                           vocab_chunk_size=config.train.get("vocab_chunk_size", 0))


def run_distill(ctx: Context) -> None:
    out_dir = ctx.student_dir
    record = _distill_record(ctx.config)
    if workdir.stage_done(out_dir, record):
        logging.info("distill: reusing %s", out_dir)
        return
    section = ctx.config.distill
    model_config, base_params = ctx.base
    sharding.check_model_fits_mesh(model_config, ctx.mesh, "student")
    sharding.check_batch_fits_mesh(section.batch_size, ctx.mesh, ctx.config.train.grad_accum_steps,
                                   field="distill.batch_size")
    objective = distill_objective(ctx.config)
    examples = training_examples(ctx, ctx.config.distill.text_noise,
                                 ctx.config.distill.get("label_noise", 0.0))
    frozen = {"backbone": base_params, "teacher": teacher_params(ctx)}
    batch_fields, identity = None, {}
    if objective.uses_teacher_cache:
        cache, fingerprint = _teacher_cache(ctx, objective, examples, frozen["teacher"],
                                            seed_offset=DISTILL_SEED_OFFSET)
        batch_fields, identity = cache.batch_fields, {"teacher_cache": fingerprint}
        if not objective.needs_teacher:
            # No term runs the teacher any more, so its weights stay off the devices.
            del frozen["teacher"]
    adapters, history = train_adapters(
        ctx, name="distill", section=section, lora_config=_lora_config(section),
        objective=objective, frozen_params=frozen, teacher_config=teacher_model_config(ctx),
        examples=examples, seed_offset=DISTILL_SEED_OFFSET, stage_dir=out_dir, record=record,
        batch_fields=batch_fields, identity=identity)
    _finish_training_stage(out_dir, out_dir / "adapters", adapters, history, record)


def _teacher_cache(ctx: Context, objective: ObjectiveConfig, examples: list[batching.Example],
                   teacher_weights, seed_offset: int) -> tuple[teacher_cache.TeacherCache, str]:
    """Load or build the teacher cache for the examples that the distill batches draw."""
    section = ctx.config.distill
    teacher_config = teacher_model_config(ctx)
    top_k = section.teacher_cache.top_k
    _check_cache_top_k(top_k, teacher_config.vocab_size)
    precision = Precision.from_config(ctx.config.train)
    model_kwargs = _model_kwargs(ctx.config.train)
    teacher = Llama(teacher_config, **model_kwargs)
    cast = lambda tree: jax.tree_util.tree_map(lambda x: x.astype(precision.param_dtype), tree)
    teacher_weights = cast(teacher_weights)
    settings = teacher_cache.CacheSettings(
        top_k=top_k, temperature=objective.temperature,
        max_target_tokens=objective.max_target_tokens,
        batch_size=section.teacher_cache.batch_size)
    fingerprint = teacher_cache.cache_fingerprint(
        teacher_params=teacher_weights, teacher=teacher,
        examples_fingerprint=batching.examples_fingerprint(examples), settings=settings)
    needed = _batch_stream(ctx, section, examples, seed_offset).drawn_examples(section.steps)
    model_config, base_params = ctx.base
    # The student starts as the base model (LoRA B is zero), so the KL error logged at build
    # time is the one of the first training step.
    reference = (Llama(model_config, **model_kwargs), cast(base_params))
    cache = teacher_cache.load_or_build(
        teacher_cache.cache_directory(ctx.root, fingerprint), fingerprint, examples, needed,
        settings, teacher, teacher_weights, ctx.tokenizer.pad_id, reference=reference)
    return cache, fingerprint


def student_params(ctx: Context):
    out_dir = ctx.student_dir
    if not (out_dir / "stage.json").exists():
        raise FileNotFoundError(f"no student in {out_dir}; run the 'distill' stage first")
    return _merged(ctx, out_dir / "adapters", ctx.config.distill)


# --------------------------------------------------------------------------------------------
# eval: greedy replies of base, teacher and student on the evaluation splits.
# --------------------------------------------------------------------------------------------

def eval_subsets(ctx: Context) -> dict[str, list[dict]]:
    """Pick a seeded subset of `eval.limit` prompts per split (all prompts when the limit is 0)."""
    subsets = {}
    for offset, split in enumerate(EVAL_SPLITS):
        rows = ctx.split(split)
        limit = ctx.config.eval.limit
        if limit and len(rows) > limit:
            order = np.random.default_rng(ctx.config.seed + 1000 + offset).permutation(len(rows))
            rows = [rows[i] for i in sorted(order[:limit])]
        subsets[split] = rows
    heldout = harmful_training_prompts(ctx)[1]
    if heldout:
        limit = ctx.config.eval.limit
        if limit and len(heldout) > limit:
            order = np.random.default_rng(ctx.config.seed + 1100).permutation(len(heldout))
            heldout = [heldout[i] for i in sorted(order[:limit])]
        subsets[HELDOUT_SPLIT] = heldout
    return subsets


def _eval_dir(ctx: Context) -> pathlib.Path:
    # Results are keyed by the eval settings, so a re-run with other settings adds a directory
    # instead of overwriting earlier results.
    record = json.dumps(ctx.config.eval.to_dict(), sort_keys=True)
    key = "limit{}-tokens{}-{:08x}".format(ctx.config.eval.limit, ctx.config.eval.max_new_tokens,
                                           _stable_hash(record))
    return ctx.stage_dir("eval") / key


def _stable_hash(text: str) -> int:
    import hashlib
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


def _model_for_eval(ctx: Context, name: str) -> tuple[LlamaConfig, Any]:
    """Return (config, params) of `base`, `teacher` or the configured student."""
    if name == "base":
        return ctx.base
    if name == "teacher":
        return teacher_model_config(ctx), teacher_params(ctx)
    return ctx.base[0], student_params(ctx)


def run_eval(ctx: Context, models: tuple[str, ...] | None = None) -> None:
    """Evaluate ``models`` (default: base, teacher and the configured student)."""
    eval_dir = _eval_dir(ctx)
    upstream = {"teacher": _teacher_record(ctx.config),
                ctx.student_name: _distill_record(ctx.config)}
    subsets = eval_subsets(ctx)
    cfg = ctx.config.eval
    judge = None
    if ctx.config.judge.enabled:
        judge, _ = evaluation.ensure_judge(ctx)
    rows_by_key = {(split, row["id"]): row for split, rows in subsets.items() for row in rows}
    for name in models or ("base", "teacher", ctx.student_name):
        model_dir = eval_dir / name
        record = {"eval": cfg.to_dict(), "model": upstream.get(name, {"model": ctx.config.model})}
        trained = _training_digest(ctx, name)
        if _evaluation_current(model_dir, record, trained):
            logging.info("eval: reusing %s", model_dir)
        else:
            _evaluate_model(ctx, name, model_dir, record, subsets, rows_by_key, judge, eval_dir,
                            trained)
        role = "student" if name == ctx.student_name else name
        if role in evaluation.robustness_models(ctx.config):
            _evaluate_robustness(ctx, name, model_dir, subsets)


# The evaluated model's training run, by the SHA-256 of its history.jsonl (which records every
# step's wall time, so a retrained model with the same config gets another digest).
TRAINED_FILE = "trained_from.json"


def _training_digest(ctx: Context, name: str) -> str | None:
    """Return the digest of `name`'s training history from its stage record, or None."""
    stage_dir = {"teacher": ctx.stage_dir("teacher"), ctx.student_name: ctx.student_dir}.get(name)
    try:
        files = json.loads((stage_dir / "stage.json").read_text()).get("files", {})
    except (TypeError, OSError, json.JSONDecodeError):
        return None
    return files.get("history.jsonl")


def _evaluated_training(model_dir: pathlib.Path) -> str | None:
    """Return the training digest an evaluation was made from, or None if it has none."""
    try:
        return json.loads((model_dir / TRAINED_FILE).read_text())["history_sha256"]
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
        return None


def _evaluation_current(model_dir: pathlib.Path, record: dict, trained: str | None) -> bool:
    """Tell whether `model_dir` has a finished evaluation of this config and training run.

    An evaluation of an earlier training run of the same config (its model was trained again
    after its directory was deleted) is not current. One written before evaluations recorded
    their training run, or of a model whose training record is missing, is reused.
    """
    if not workdir.stage_done(model_dir, record):
        return False
    evaluated = _evaluated_training(model_dir)
    if evaluated is None or trained is None or evaluated == trained:
        return True
    logging.info("eval: %s was evaluated on an earlier training run; evaluating it again",
                 model_dir)
    return False


def _evaluate_model(ctx: Context, name: str, model_dir: pathlib.Path, record: dict, subsets,
                    rows_by_key: dict, judge, eval_dir: pathlib.Path,
                    trained: str | None = None) -> None:
    cfg = ctx.config.eval
    model_config, params = _model_for_eval(ctx, name)
    # An earlier evaluation stays finished until the model loads. From here on it is replaced,
    # so a run stopped before the new results are written leaves it unfinished.
    (model_dir / "stage.json").unlink(missing_ok=True)
    flat = [(split, row) for split in subsets for row in subsets[split]]
    prompts = [row["prompt"] for _, row in flat]
    # The likelihood margins come from the generation's own prefill of each prompt.
    replies = generate_replies(ctx, model_config, params, prompts, cfg.max_new_tokens,
                               cfg.batch_size, f"eval {name}",
                               openings_ids=evaluation.margin_openings(ctx.tokenizer))
    margins = evaluation.margins_from_scores(np.stack([r["opening_scores"] for r in replies]))
    generations = []
    for (split, row), reply, margin in zip(flat, replies, margins):
        generations.append({"split": split, "id": row["id"], "template": row.get("template", ""),
                            "reply": reply["reply"], "complete": reply["complete"],
                            "refused": is_refusal(reply["reply"]),
                            "refusal_margin": float(margin)})
    if judge is not None:
        probabilities = evaluation.judge_refusals(ctx, judge,
                                                  [(p, g["reply"]) for p, g in zip(prompts,
                                                                                  generations)])
        for generation, probability in zip(generations, probabilities):
            generation["judge_probability"] = float(probability)
            generation["judge_refused"] = bool(probability > 0.5)
    model_dir.mkdir(parents=True, exist_ok=True)
    workdir.write_jsonl(model_dir / "generations.jsonl", generations)

    def by_split(key):
        return {split: [g[key] for g in generations if g["split"] == split]
                for split in EVAL_SPLITS}

    result = metrics.safety_metrics(by_split("refused"))
    if HELDOUT_SPLIT in subsets:
        held = [g["refused"] for g in generations if g["split"] == HELDOUT_SPLIT]
        summary = metrics.rate_with_interval(sum(held), len(held))
        result["heldout_refusal_rate"] = summary["rate"]
        result["heldout_refusal_rate_ci95"] = summary["ci95"]
    refused = [g["refused"] for g in generations]
    result["margin_agreement"] = metrics.decision_agreement(
        [g["refusal_margin"] > 0 for g in generations], refused)["rate"]
    result["margin_auc"] = metrics.roc_auc([g["refusal_margin"] for g in generations], refused)
    if judge is not None:
        result["judge"] = metrics.safety_metrics(by_split("judge_refused"))
        agreement = metrics.decision_agreement([g["judge_refused"] for g in generations], refused)
        result["judge_agreement"] = agreement["rate"]
        result["judge_agreement_ci95"] = agreement["ci95"]
    result["breakdown"] = evaluation.breakdowns(generations, rows_by_key)
    if name == ctx.student_name:
        result.update(_distillation_metrics(ctx, eval_dir, subsets, params))
    workdir.write_json(model_dir / "metrics.json", result)
    if trained is not None:
        workdir.write_json(model_dir / TRAINED_FILE, {"history_sha256": trained})
    workdir.mark_stage_done(model_dir, record, result)
    logging.info("eval %s: %s", name, json.dumps(
        {k: round(v, 4) for k, v in result.items() if isinstance(v, float)}))


def _evaluate_robustness(ctx: Context, name: str, model_dir: pathlib.Path, subsets) -> None:
    """Write <model dir>/robustness-<settings hash>.json unless it exists."""
    path = model_dir / evaluation.robustness_key(ctx.config)
    if path.exists():
        logging.info("robustness: reusing %s", path)
        return
    model_config, params = _model_for_eval(ctx, name)
    generations = workdir.read_jsonl(model_dir / "generations.jsonl")
    clean = json.loads((model_dir / "metrics.json").read_text())
    result = evaluation.robustness(ctx, name, model_config, params, subsets, generations, clean)
    result["settings"] = ctx.config.robustness.to_dict()
    workdir.write_json(path, result)


def _distillation_metrics(ctx: Context, eval_dir: pathlib.Path, subsets, student) -> dict:
    """Teacher-forced top-1 agreement and mean KL on the teacher's own replies, and agreement of
    the refuse/comply decisions on every evaluation prompt."""
    teacher_rows = workdir.read_jsonl(eval_dir / "teacher" / "generations.jsonl")
    student_rows = workdir.read_jsonl(eval_dir / ctx.student_name / "generations.jsonl")
    decisions = metrics.decision_agreement([t["refused"] for t in teacher_rows],
                                           [s["refused"] for s in student_rows])

    prompts = {(split, row["id"]): row["prompt"] for split in EVAL_SPLITS for row in subsets[split]}
    half = max(1, ctx.config.eval.kd_limit // 2)
    chosen = ([r for r in teacher_rows if r["split"] == "eval_harmful"][:half]
              + [r for r in teacher_rows if r["split"] == "eval_benign_sensitive"][:half])
    rows = [{"prompt": prompts[(r["split"], r["id"])], "reply": r["reply"], "label": "eval",
             "id": r["id"], "complete": r["complete"]} for r in chosen if r["reply"].strip()]
    examples, _ = batching.tokenize_examples(ctx.tokenizer, rows, max_seq_len=10**6)
    model_config = ctx.base[0]
    teacher_cfg = teacher_model_config(ctx)
    teacher_p = teacher_params(ctx)

    @jax.jit
    def agreement(student_p, teacher_p, batch):
        mask = jnp.concatenate([batch["loss_mask"][:, 1:], jnp.zeros_like(batch["loss_mask"][:, :1])],
                               axis=1)
        s = Llama(model_config).apply({"params": student_p}, batch["input_ids"],
                                      attention_mask_BxL=batch["attention_mask"]).logits_BxLxV
        t = Llama(teacher_cfg).apply({"params": teacher_p}, batch["input_ids"],
                                     attention_mask_BxL=batch["attention_mask"]).logits_BxLxV
        agree, count = metrics.top1_agreement(s, t, mask)
        kl_total, _ = metrics.kl_sum(s, t, mask)
        return agree, count, kl_total

    agree, total, kl_total = 0, 0, 0.0
    batch_size = ctx.config.eval.batch_size
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        batch = batching.pad_batch(chunk, ctx.tokenizer.pad_id, 64, max_seq_len=10**6)
        a, n, kl = agreement(student, teacher_p, batch)
        agree, total, kl_total = agree + int(a), total + int(n), kl_total + float(kl)
    return {"kd_token_agreement": agree / total if total else float("nan"),
            "kd_mean_kl": kl_total / total if total else float("nan"),
            "kd_token_count": total, "kd_decision_agreement": decisions["rate"],
            "kd_decision_agreement_ci95": decisions["ci95"]}


# --------------------------------------------------------------------------------------------
# report: one table for base, teacher and student.
# --------------------------------------------------------------------------------------------

REPORT_COLUMNS = (("overall_safety_score",) + metrics.SAFETY_COMPONENTS
                  + ("kd_token_agreement", "kd_mean_kl", "judge_agreement", "margin_agreement"))


def run_report(ctx: Context) -> dict:
    eval_dir = _eval_dir(ctx)
    if not eval_dir.is_dir():
        raise FileNotFoundError(f"no evaluation with these eval settings in {eval_dir}; run the "
                                "'eval' stage first")
    models = {}
    # Base, teacher, then every student evaluated with these eval settings, this config's first.
    fixed = ("base", "teacher", ctx.student_name)
    others = sorted(p.name for p in eval_dir.iterdir() if p.is_dir() and p.name not in fixed)
    for name in ["base", "teacher", ctx.student_name] + others:
        path = eval_dir / name / "metrics.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing; run the 'eval' stage first")
        models[name] = json.loads(path.read_text())
    subsets = eval_subsets(ctx)
    split_counts = json.loads((ctx.data_dir / "split_counts.json").read_text())
    report = {
        "models": models,
        "eval_counts": {split: len(rows) for split, rows in subsets.items()},
        "split_counts": split_counts,
        "refusal_detector": validate_against_human_labels(),
        "judge": (workdir.read_summary(ctx.root / "judge")
                  if (ctx.root / "judge" / "stage.json").exists() else None),
        "stage_seconds": ctx.timings,
        "config": ctx.config.to_dict(),
    }
    workdir.write_json(ctx.root / "report.json", report)
    table = format_table(report)
    (ctx.root / "report.md").write_text(table)
    print(table)
    return report


def format_table(report: dict) -> str:
    def cell(model: dict, column: str) -> str:
        value = model.get(column)
        if value is None or (isinstance(value, float) and np.isnan(value)):
            return "-"
        text = f"{value:.3f}"
        ci = model.get(f"{column}_ci95")
        return f"{text} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else text

    lines = ["| model | " + " | ".join(REPORT_COLUMNS) + " |",
             "|---" * (len(REPORT_COLUMNS) + 1) + "|"]
    for name, model in report["models"].items():
        lines.append(f"| {name} | " + " | ".join(cell(model, c) for c in REPORT_COLUMNS) + " |")
    counts = ", ".join(f"{k}={v}" for k, v in report["eval_counts"].items())
    detector = report["refusal_detector"]
    lines += [
        "",
        f"Evaluation prompts per split (seeded subsets): {counts}.",
        "Rates in brackets: 95% Wilson intervals; the overall score: 95% bootstrap interval.",
        f"Refusal detector against {detector['n']} human-labelled replies: accuracy "
        f"{detector['accuracy']:.3f}, precision {detector['precision']:.3f}, "
        f"recall {detector['recall']:.3f}.",
    ]
    judge = report.get("judge")
    if judge:
        scores = judge["feature_judge"]
        lines.append(f"Feature judge ({judge['folds']}-fold cross-validation on the same replies): "
                     f"accuracy {scores['accuracy']:.3f}, precision {scores['precision']:.3f}, "
                     f"recall {scores['recall']:.3f}. judge_agreement: share of evaluation "
                     "replies where both judges decide alike; margin_agreement: share where the "
                     "likelihood margin's sign matches the string judge.")
    return "\n".join(lines) + "\n"
