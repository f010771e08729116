"""Generate the reference pages under ``docs/`` from the code: ``python -m ckt_jax.docs``.

``docs/configuration.md`` lists every field of ``configs/smollm2_cpu.py`` with its type, default,
unit and the comment written next to it in that file. ``docs/losses.md`` lists the public loss
terms of ``ckt_jax.losses`` with their signatures and docstrings. ``tests/test_docs.py`` fails
when either page differs from what this module renders, so the pages follow the code.
"""

from __future__ import annotations

import importlib
import inspect
import io
import pathlib
import sys
import tokenize

from ckt_jax import config_files

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_PATH = ROOT / "configs" / "smollm2_cpu.py"
CONFIG_PAGE = ROOT / "docs" / "configuration.md"
LOSSES_PAGE = ROOT / "docs" / "losses.md"
NO_UNIT = "-"

# Unit of every numeric field; NO_UNIT for pure numbers (weights, ratios, seeds). A new numeric
# field needs an entry here, or rendering the reference raises.
UNITS = {
    "seed": NO_UNIT,
    "log_every": "steps",
    "data.max_seq_len": "tokens",
    "data.max_target_tokens": "tokens",
    "data.train_template_max_chars": "characters",
    "data.wrapped_fraction": "fraction of batches",
    "data.harmful_fraction": "fraction of examples",
    "data.max_benign_prompts": "prompts",
    "data.heldout_fraction": "fraction of prompts",
    "targets.max_new_tokens": "tokens",
    "targets.batch_size": "prompts",
    "eval.limit": "prompts per split",
    "eval.max_new_tokens": "tokens",
    "eval.batch_size": "prompts",
    "eval.kd_limit": "prompts",
    "judge.folds": "folds",
    "judge.l2": NO_UNIT,
    "judge.max_prompt_tokens": "tokens",
    "judge.max_reply_tokens": "tokens",
    "judge.batch_size": "replies",
    "robustness.limit": "prompts per split",
    "robustness.kl_limit": "prompts per split",
    "chat.max_new_tokens": "tokens",
    "chat.temperature": NO_UNIT,
    "chat.top_p": "probability",
    "mesh.data": "devices",
    "mesh.fsdp": "devices",
    "mesh.tensor": "devices",
    "train.grad_accum_steps": "micro-batches",
    "train.length_bucket_batches": "batches",
    "train.pack_rows": "rows per batch",
    "train.vocab_chunk_size": "positions per row",
    "train.peak_flops_per_device": "FLOP/s",
    "checkpoint.every_steps": "steps",
    "checkpoint.keep_last": "checkpoints",
    "checkpoint.keep_best": "checkpoints",
    "distributed.num_processes": "processes",
    "distributed.process_id": NO_UNIT,
}
for _section in ("teacher_train", "distill"):
    UNITS.update({
        f"{_section}.lora_rank": "matrix rank",
        f"{_section}.lora_alpha": NO_UNIT,
        f"{_section}.steps": "steps",
        f"{_section}.batch_size": "examples",
        f"{_section}.learning_rate": "per step (peak)",
        f"{_section}.warmup_steps": "steps",
    })
UNITS.update({f"distill.{name}_weight": NO_UNIT for name in (
    "kd", "contrastive", "relation", "consistency", "adversarial", "base_kl", "ce", "l2")})
UNITS.update({
    "distill.temperature": NO_UNIT,
    "distill.contrastive_temperature": NO_UNIT,
    "distill.contrastive_projection_hidden": "features",
    "distill.noise_alpha": NO_UNIT,
    "distill.harmful_fraction": "fraction of examples",
    "distill.label_noise": "fraction of prompts",
    "distill.opening_tokens": "tokens",
    "distill.opening_weight": NO_UNIT,
    "distill.consistency_row_stride": "rows",
    "distill.adversarial_steps": "ascent steps",
    "distill.adversarial_epsilon": "embedding norm",
    "distill.adversarial_step_size": "embedding norm",
    "distill.teacher_cache.top_k": "tokens per position",
    "distill.teacher_cache.batch_size": "examples",
    "distill.text_noise.typo_rate": "fraction of letters",
    "distill.text_noise.case_rate": "fraction of letters",
    "distill.text_noise.whitespace_rate": "fraction of spaces",
})


def _load_config(path: pathlib.Path):
    return config_files.load_module(path).get_config()


def config_comments(source: str) -> dict[str, str]:
    """Map each ``c.<field> = ...`` line of a config file to its comment.

    The comment is the one at the end of the line or, when there is none, the block of comment
    lines right above it.
    """
    comments: dict[str, str] = {}
    pending: list[str] = []
    line_comments: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            line_comments[token.start[0]] = token.string.lstrip("#").strip()
    for number, line in enumerate(source.splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(line_comments.get(number, ""))
            continue
        if stripped.startswith("c.") and "=" in stripped:
            field = stripped[2:].split("=", 1)[0].strip()
            if "#" in line and number in line_comments:
                comments[field] = line_comments[number]
            elif pending:
                comments[field] = " ".join(pending)
        pending = []
    return comments


def _flatten(config, prefix: str = "") -> list[tuple[str, object]]:
    rows = []
    for key in config.keys():
        value = config[key]
        if hasattr(value, "keys"):
            rows.extend(_flatten(value, f"{prefix}{key}."))
        else:
            rows.append((f"{prefix}{key}", value))
    return rows


def _unit(field: str, value) -> str:
    if isinstance(value, (bool, str)):
        return NO_UNIT
    if field in UNITS:
        return UNITS[field]
    raise KeyError(f"numeric config field {field!r} has no unit; add it to UNITS in "
                   f"{pathlib.Path(__file__).name}")


def render_config_reference(config_path: pathlib.Path = CONFIG_PATH) -> str:
    """Render the configuration reference page in Markdown."""
    config = _load_config(config_path)
    comments = config_comments(config_path.read_text())
    lines = [
        "# Configuration reference",
        "",
        f"Every field of `{config_path.relative_to(ROOT)}`, the config that the other configs "
        "start from. Override a field on the command line with `--config.<field>=<value>`.",
        "",
        "This page is generated by `python -m ckt_jax.docs` from the config file and its "
        "comments; edit those, not this page.",
        "",
    ]
    # Fields in the order the file sets them, which groups related fields.
    order = {field: index for index, field in enumerate(comments)}
    fields = sorted(_flatten(config), key=lambda item: order.get(item[0], len(order)))
    section = None
    for field, value in fields:
        top = field.split(".")[0] if "." in field else ""
        if top != section:
            section = top
            lines += ["", f"## `{section}`" if section else "## Top level", ""]
            if comments.get(section):
                lines += [comments[section], ""]
            lines += ["| field | type | default | unit | description |", "|---|---|---|---|---|"]
        description = comments.get(field)
        if description is None:
            raise KeyError(f"config field {field!r} has no comment in {config_path.name}; "
                           "describe it there")
        default = repr(value).replace("|", "\\|")
        lines.append(f"| `{field}` | {type(value).__name__} | `{default}` | "
                     f"{_unit(field, value)} | {description.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def _signature(name: str, value) -> str:
    """Format a signature as Python source, one parameter per line when it is long."""
    if inspect.isclass(value):
        fields = [f for f in getattr(value, "__annotations__", {}) if f not in ("parent", "name")]
        return f"class {name}({', '.join(fields)})"
    signature = inspect.signature(value)
    parts = []
    keyword_only_started = False
    for parameter in signature.parameters.values():
        if parameter.kind == parameter.KEYWORD_ONLY and not keyword_only_started:
            parts.append("*")
            keyword_only_started = True
        text = parameter.name
        if parameter.annotation is not parameter.empty:
            text += f": {parameter.annotation}"
        if parameter.default is not parameter.empty:
            text += f" = {parameter.default!r}" if ": " in text else f"={parameter.default!r}"
        parts.append(text)
    returns = ""
    if signature.return_annotation is not signature.empty:
        returns = f" -> {signature.return_annotation}"
    one_line = f"{name}({', '.join(parts)}){returns}"
    if len(one_line) <= 96:
        return one_line
    body = "".join(f"    {part},\n" for part in parts)
    return f"{name}(\n{body}){returns}"


def render_loss_reference() -> str:
    """Render the loss API reference page in Markdown, grouped by module."""
    losses = importlib.import_module("ckt_jax.losses")
    by_module: dict[str, list[str]] = {}
    for name in losses.__all__:
        value = getattr(losses, name)
        module = getattr(value, "__module__", None) if callable(value) else None
        by_module.setdefault(module or "constants", []).append(name)

    lines = [
        "# Loss API reference",
        "",
        "The terms of `ckt_jax.losses`, each a pure function of arrays that works outside the "
        "trainer (`from ckt_jax.losses import forward_kl`). Shape suffixes name the axes: "
        "`B` batch, `L` length, `V` vocabulary, `D` hidden size, `K` top-k entries.",
        "",
        "This page is generated by `python -m ckt_jax.docs` from the docstrings; edit those, "
        "not this page.",
    ]
    for module in sorted(by_module, key=lambda m: (m == "constants", m)):
        lines += ["", f"## `{module}`" if module != "constants" else "## Constants"]
        for name in by_module[module]:
            value = getattr(losses, name)
            if module == "constants":
                value_text = ", ".join(map(repr, value)) if isinstance(value, dict) else repr(value)
                lines += ["", f"`{name}`: {value_text}"]
                continue
            doc = inspect.getdoc(value) or ""
            summary, _, details = doc.partition("\n\n")
            lines += ["", f"### `{name}`", "", "```python", _signature(name, value), "```", "",
                      " ".join(summary.split())]
            if details.strip():
                lines += ["", "```text", details.strip(), "```"]
    return "\n".join(lines) + "\n"


def main() -> None:
    CONFIG_PAGE.parent.mkdir(exist_ok=True)
    CONFIG_PAGE.write_text(render_config_reference())
    LOSSES_PAGE.write_text(render_loss_reference())
    print(f"wrote {CONFIG_PAGE.relative_to(ROOT)} and {LOSSES_PAGE.relative_to(ROOT)}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
