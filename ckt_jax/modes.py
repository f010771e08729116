"""The entry point's modes besides running stages: ``chat`` and ``export``.

Both work on a model of the work directory, named ``base``, ``teacher`` or ``student`` (the
student called ``config.student_name``). A trained model is the base weights plus the LoRA
adapters its stage saved, merged with the rank, alpha and targets recorded in that stage's
``stage.json``, so a later change to the config cannot apply the wrong LoRA scale.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
from typing import Any

import jax
from absl import logging

from ckt_jax import lora, stages, workdir
from ckt_jax.chat import ChatSession
from ckt_jax.export import GGUF_TYPES, HF_DTYPES, export_gguf, export_hf_directory
from ckt_jax.loading import load_model
from ckt_jax.model import Llama, LlamaConfig, LoraConfig
from ckt_jax.peft_format import export_peft_adapter, is_peft_adapter_dir, load_peft_adapter
from ckt_jax.train import to_device_tree

MODES = ("stages", "chat", "export")
MODEL_NAMES = ("base", "teacher", "student")
EXPORT_FORMATS = ("peft", "hf", "gguf")


@dataclasses.dataclass
class TrainedModel:
    """A model ready to run: merged weights, plus its adapters when it has any."""

    name: str
    config: LlamaConfig
    params: Any                      # merged parameters (no LoRA leaves)
    adapters: dict | None = None     # LoRA adapter tree, None for base or an external teacher
    lora_config: LoraConfig | None = None
    source: str = ""                 # where it was read from, for logs


def _recorded_lora_config(stage_dir: pathlib.Path, section: str) -> LoraConfig:
    """Read the LoRA settings that the stage in ``stage_dir`` trained with."""
    path = stage_dir / "stage.json"
    if not path.is_file():
        stage = "teacher" if section == "teacher_train" else "distill"
        raise FileNotFoundError(f"{path} not found; run the {stage} stage into this work "
                                "directory first")
    record = workdir.read_stage_record(stage_dir)["config"].get(section)
    if not isinstance(record, dict) or not {"lora_rank", "lora_alpha", "lora_targets"} <= set(
            record):
        raise workdir.WorkdirError(f"{path} records no LoRA settings under config.{section}; "
                                   f"delete {stage_dir} to redo the stage")
    targets = tuple(t.strip() for t in str(record["lora_targets"]).split(",") if t.strip())
    return LoraConfig(rank=record["lora_rank"], alpha=record["lora_alpha"], targets=targets)


def _with_adapters(ctx: stages.Context, name: str, adapters: dict, lora_config: LoraConfig,
                   adapter_path: pathlib.Path) -> TrainedModel:
    model_config, base_params = ctx.base
    adapters = to_device_tree(adapters)
    merged = lora.merge_lora(lora.combine_params(adapters, base_params), lora_config.scale)
    return TrainedModel(name, model_config, merged, adapters, lora_config,
                        source=f"adapters {adapter_path} on {ctx.model_path}")


def load_trained_model(ctx: stages.Context, name: str) -> TrainedModel:
    """Load ``base``, ``teacher`` or ``student`` from the work directory of ``ctx``."""
    if name not in MODEL_NAMES:
        raise ValueError(f"model name {name!r} is invalid; use one of {', '.join(MODEL_NAMES)}")
    if name == "base":
        model_config, params = ctx.base
        return TrainedModel(name, model_config, params, source=str(ctx.model_path))

    if name == "student":
        student_dir = ctx.student_dir
        lora_config = _recorded_lora_config(student_dir, "distill")
        return _with_adapters(ctx, name, stages.load_adapters(student_dir / "adapters"),
                              lora_config, student_dir / "adapters")

    spec = ctx.config.teacher
    teacher_dir = pathlib.Path(spec).expanduser() if spec else ctx.stage_dir("teacher")
    if (teacher_dir / stages.TEACHER_DIR_FILE).exists():
        lora_config = _recorded_lora_config(teacher_dir, "teacher_train")
        adapters = stages.load_adapters(teacher_dir / stages.TEACHER_DIR_FILE)
        return _with_adapters(ctx, name, adapters, lora_config,
                              teacher_dir / stages.TEACHER_DIR_FILE)
    if not spec:
        raise FileNotFoundError(f"no teacher in {teacher_dir}; run the 'teacher' stage first")
    if is_peft_adapter_dir(teacher_dir):
        lora_config, adapters = load_peft_adapter(teacher_dir, ctx.base[0])
        return _with_adapters(ctx, name, adapters, lora_config, teacher_dir)
    model_config, params = load_model(stages.resolve_model_spec(spec, "config.teacher"))
    return TrainedModel(name, model_config, to_device_tree(params), source=str(teacher_dir))


# --------------------------------------------------------------------------------------------
# chat
# --------------------------------------------------------------------------------------------

def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def read_prompts(path) -> list[str]:
    """Read one prompt per non-empty line of a UTF-8 text file."""
    path = pathlib.Path(path).expanduser()
    if path.is_dir():
        raise IsADirectoryError(f"config.chat.prompts_file={str(path)!r} is a directory; pass a "
                                "text file with one prompt per line, or '' to type prompts")
    if not path.is_file():
        raise FileNotFoundError(f"config.chat.prompts_file={str(path)!r} not found; pass a text "
                                "file with one prompt per line, or '' to type prompts")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [prompt for prompt in prompts if prompt]
    if not prompts:
        raise ValueError(f"config.chat.prompts_file={str(path)!r} contains no prompts")
    return prompts


def _check_chat_config(cfg) -> None:
    if cfg.model not in MODEL_NAMES:
        raise ValueError(f"config.chat.model={cfg.model!r} is invalid; use one of "
                         f"{', '.join(MODEL_NAMES)}")
    if cfg.max_new_tokens < 1:
        raise ValueError(f"config.chat.max_new_tokens={cfg.max_new_tokens} must be >= 1")
    if cfg.temperature < 0:
        raise ValueError(f"config.chat.temperature={cfg.temperature} must be >= 0 (0 is greedy)")
    if not 0.0 < cfg.top_p <= 1.0:
        raise ValueError(f"config.chat.top_p={cfg.top_p} must be in (0, 1]")


def run_chat(ctx: stages.Context) -> None:
    """Reply to the prompts of ``chat.prompts_file``, or to prompts typed on standard input.

    Each prompt of a file starts a new conversation. Typed prompts continue one conversation;
    ``/reset`` starts a new one and ``/exit`` or end of input stops.
    """
    cfg = ctx.config.chat
    _check_chat_config(cfg)
    prompts = read_prompts(cfg.prompts_file) if cfg.prompts_file else None
    trained = load_trained_model(ctx, cfg.model)
    session = ChatSession(Llama(trained.config), trained.params, ctx.tokenizer,
                          system=cfg.system, max_new_tokens=cfg.max_new_tokens,
                          temperature=cfg.temperature, top_p=cfg.top_p,
                          rng=jax.random.fold_in(jax.random.PRNGKey(ctx.config.seed), 303))
    logging.info("chat with %s (%s)", cfg.model, trained.source)

    if prompts is not None:
        for prompt in prompts:
            session.reset()
            _write(f"user: {prompt}\nassistant: ")
            session.reply(prompt, on_text=_write)
            _write("\n\n")
        return

    print(f"Chatting with the {cfg.model} model. Type /reset to start over, /exit or Ctrl-D to "
          "quit.", file=sys.stderr)
    while True:
        try:
            prompt = input("user: ").strip()
        except EOFError:
            _write("\n")
            return
        if prompt == "/exit":
            return
        if prompt == "/reset":
            session.reset()
            print("(new conversation)", file=sys.stderr)
            continue
        if prompt.startswith("/") and " " not in prompt:
            print(f"unknown command {prompt}; type /reset to start over, /exit or Ctrl-D to "
                  "quit", file=sys.stderr)
            continue
        if not prompt:
            continue
        _write("assistant: ")
        session.reply(prompt, on_text=_write)
        _write("\n")


# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------

def _export_formats(cfg) -> list[str]:
    formats = [f.strip() for f in str(cfg.formats).split(",") if f.strip()]
    unknown = [f for f in formats if f not in EXPORT_FORMATS]
    if not formats:
        raise ValueError(f"config.export.formats={cfg.formats!r} is empty; use a "
                         f"comma-separated subset of {','.join(EXPORT_FORMATS)}")
    if unknown:
        raise ValueError(f"config.export.formats={cfg.formats!r} names unknown formats "
                         f"{unknown}; use a comma-separated subset of {','.join(EXPORT_FORMATS)}")
    if cfg.hf_dtype not in HF_DTYPES:
        raise ValueError(f"config.export.hf_dtype={cfg.hf_dtype!r} is invalid; use one of "
                         f"{', '.join(sorted(HF_DTYPES))}")
    if cfg.gguf_type not in GGUF_TYPES:
        raise ValueError(f"config.export.gguf_type={cfg.gguf_type!r} is invalid; use one of "
                         f"{', '.join(GGUF_TYPES)}")
    if cfg.model not in MODEL_NAMES:
        raise ValueError(f"config.export.model={cfg.model!r} is invalid; use one of "
                         f"{', '.join(MODEL_NAMES)}")
    return formats


def run_export(ctx: stages.Context) -> dict[str, pathlib.Path]:
    """Write ``export.model`` in each of ``export.formats``; return the written paths."""
    cfg = ctx.config.export
    formats = _export_formats(cfg)
    label = ctx.student_name if cfg.model == "student" else cfg.model
    out_dir = pathlib.Path(cfg.dir).expanduser() if cfg.dir else ctx.root / "export" / label
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"export directory {out_dir} is not empty; delete it or set "
                              "config.export.dir to a new directory")
    if "gguf" in formats and ctx.model_path.suffix != ".gguf":
        raise ValueError(f"GGUF export copies the tokenizer from the base GGUF file, but "
                         f"config.model={ctx.config.model!r} is not one; drop 'gguf' from "
                         "config.export.formats and convert the 'hf' export with llama.cpp")

    trained = load_trained_model(ctx, cfg.model)
    if "peft" in formats and trained.adapters is None:
        raise ValueError(f"the {cfg.model} model has no LoRA adapters to export; drop 'peft' "
                         "from config.export.formats")
    written = {}
    if "peft" in formats:
        written["peft"] = export_peft_adapter(out_dir / "peft", trained.adapters,
                                              trained.lora_config,
                                              base_model_name_or_path=str(ctx.model_path))
    if "hf" in formats:
        written["hf"] = export_hf_directory(out_dir / "hf", trained.config, trained.params,
                                            ctx.tokenizer, dtype=cfg.hf_dtype)
    if "gguf" in formats:
        written["gguf"] = export_gguf(out_dir / f"{label}.gguf", trained.config, trained.params,
                                      tokenizer_gguf=ctx.model_path,
                                      name=f"{ctx.model_path.stem} {label}",
                                      gguf_type=cfg.gguf_type)
    for kind, path in written.items():
        logging.info("export %s: %s", kind, path)
    return written
