"""Studies: one grid of student settings, run cell by cell in one work directory.

`--config.mode=study` runs `config.study.name` over `config.study.grid`. The data, targets,
teacher, and the base and teacher evaluations are built once and shared by every cell; each cell
trains and evaluates one student named ``<study>-<cell>``. A cell writes
``<workdir>/studies/<study>/<cell>/cell.json`` when it finishes, so a re-run skips finished cells
and an interrupted cell resumes from its distill checkpoint. A cell directory whose recorded
settings differ from this config stops the run instead of being overwritten. At the end the study
writes ``results.json``, ``results.md`` and PNG plots into ``<workdir>/studies/<study>/``.

Cells of different studies often train the same student: the budget cell at the config's step
count, the float32 precision cell, the noise-free data_noise cell, the kd_weight cell at the
config's weight and the kd_noise baseline are all the main config's student. ``cell.json`` records
a digest of the cell's whole config (without its name), and a cell whose digest matches a finished
cell of any study in the work directory takes that cell's results instead of training again; its
entry names the source in ``same_as``.

| study | grid values | what a cell changes |
|---|---|---|
| kd_weight | numbers >= 0 | `distill.kd_weight` |
| budget | integers >= 1 | `distill.steps`, with the warm-up scaled in proportion (at least 1 step) |
| precision | float32, bfloat16 | `train.compute_dtype` |
| data_noise | `label:<share>` or `text:<rate>` | `distill.label_noise`, or all three `distill.text_noise` rates |
| shift | `default` | nothing: one student, each evaluation shift reported on its own |
| baselines | sft_lora, kd_lora, kd_noise, ckt | every `distill` objective weight and text-noise rate (`ckt_jax/baselines.py`) |
| teacher_cache | `live` or `top:<k>` | `distill.teacher_cache.enabled`, and `top_k` for `top:<k>` |
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import pathlib
import re
import time
from typing import Callable

from absl import logging

from ckt_jax import baselines, stages, study_report, workdir

DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Cell:
    name: str            # Directory and student-name suffix.
    value: object        # Grid value as the table and plots show it.
    overrides: dict      # Dotted config field -> value.


def _number(text: str, study: str, minimum: float, integer: bool = False) -> float:
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise ValueError(f"config.study.grid value {text!r} of study {study!r} is not {kind}; "
                         f"use comma-separated values such as {EXAMPLES[study]}") from None
    if value < minimum:
        raise ValueError(f"config.study.grid value {text!r} of study {study!r} is below "
                         f"{minimum}; use values such as {EXAMPLES[study]}")
    return value


def _cell_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)


def _kd_weight_cells(values: list[str], config) -> list[Cell]:
    cells = []
    for v in values:
        weight = _number(v, "kd_weight", 0.0)
        cells.append(Cell(_cell_name(f"{weight:g}"), weight, {"distill.kd_weight": weight}))
    return cells


def _budget_cells(values: list[str], config) -> list[Cell]:
    # The warm-up keeps the config's share of the steps, so the cell at the config's own step
    # count is the config's student.
    share = config.distill.warmup_steps / config.distill.steps
    cells = []
    for v in values:
        steps = int(_number(v, "budget", 1, integer=True))
        warmup = max(1, round(steps * share))
        cells.append(Cell(str(steps), steps, {"distill.steps": steps,
                                              "distill.warmup_steps": warmup}))
    return cells


def _precision_cells(values: list[str], config) -> list[Cell]:
    for v in values:
        if v not in DTYPES:
            raise ValueError(f"config.study.grid value {v!r} of study 'precision' is not a "
                             f"compute dtype; use a subset of {','.join(DTYPES)}")
    return [Cell(v, v, {"train.compute_dtype": v}) for v in values]


def _data_noise_cells(values: list[str], config) -> list[Cell]:
    cells = []
    for v in values:
        kind, _, number = v.partition(":")
        if kind not in ("label", "text") or not number:
            raise ValueError(f"config.study.grid value {v!r} of study 'data_noise' is invalid; "
                             f"use label:<share> or text:<rate>, such as {EXAMPLES['data_noise']}")
        rate = _number(number, "data_noise", 0.0)
        if rate >= 1.0:
            raise ValueError(f"config.study.grid value {v!r} of study 'data_noise' has a share "
                             f">= 1; use values below 1, such as {EXAMPLES['data_noise']}")
        if kind == "label":
            overrides = {"distill.label_noise": rate}
        else:
            overrides = {f"distill.text_noise.{field}": rate
                         for field in ("typo_rate", "case_rate", "whitespace_rate")}
        cells.append(Cell(_cell_name(f"{kind}-{rate:g}"), f"{kind}:{rate:g}", overrides))
    return cells


def _teacher_cache_cells(values: list[str], config) -> list[Cell]:
    cells = []
    for v in values:
        if v == "live":
            cells.append(Cell("live", "live", {"distill.teacher_cache.enabled": False}))
            continue
        kind, _, number = v.partition(":")
        if kind != "top" or not number.isdigit():
            raise ValueError(f"config.study.grid value {v!r} of study 'teacher_cache' is invalid; "
                             f"use live or top:<k> with an integer k >= 1, such as "
                             f"{EXAMPLES['teacher_cache']}")
        top_k = int(_number(number, "teacher_cache", 1, integer=True))
        cells.append(Cell(f"top-{top_k}", f"top:{top_k}",
                          {"distill.teacher_cache.enabled": True,
                           "distill.teacher_cache.top_k": top_k}))
    return cells


def _shift_cells(values: list[str], config) -> list[Cell]:
    if values != ["default"]:
        raise ValueError(f"config.study.grid={','.join(values)!r} of study 'shift' is invalid; "
                         "use 'default' (one student; the shifts are the evaluation splits)")
    return [Cell("default", "default", {})]


def _baseline_cells(values: list[str], config) -> list[Cell]:
    for v in values:
        if v not in baselines.NAMES:
            raise ValueError(f"config.study.grid value {v!r} of study 'baselines' is not a "
                             f"baseline; use a subset of {','.join(baselines.NAMES)}")
    return [Cell(v, v, baselines.overrides(v)) for v in values]


STUDIES: dict[str, Callable[[list[str]], list[Cell]]] = {
    "kd_weight": _kd_weight_cells,
    "budget": _budget_cells,
    "precision": _precision_cells,
    "data_noise": _data_noise_cells,
    "shift": _shift_cells,
    "baselines": _baseline_cells,
    "teacher_cache": _teacher_cache_cells,
}
EXAMPLES = {"kd_weight": "0.25,1,4", "budget": "10,20,40", "precision": "float32,bfloat16",
            "data_noise": "label:0,label:0.2,text:0.1", "shift": "default",
            "baselines": ",".join(baselines.NAMES), "teacher_cache": "live,top:32"}


def study_cells(config) -> list[Cell]:
    """Parse and check ``config.study``; return its cells in grid order."""
    name = config.study.name
    if name not in STUDIES:
        raise ValueError(f"config.study.name={name!r} is unknown; use one of "
                         f"{', '.join(STUDIES)}")
    values = [v.strip() for v in str(config.study.grid).split(",") if v.strip()]
    if not values:
        raise ValueError(f"config.study.grid={config.study.grid!r} is empty; use comma-separated "
                         f"values such as {EXAMPLES[name]}")
    cells = STUDIES[name](values, config)
    names = [cell.name for cell in cells]
    if len(set(names)) != len(names):
        raise ValueError(f"config.study.grid={config.study.grid!r} repeats a value; list each "
                         "value once")
    for cell in cells:
        # Each cell's config must pass the checks of a plain run, before any cell trains.
        with _naming_cell(config, cell):
            stages.validate_config(cell_config(config, cell))
    return cells


@contextlib.contextmanager
def _naming_cell(config, cell: Cell):
    """Prefix a ValueError raised inside with the grid value of `cell`."""
    try:
        yield
    except ValueError as err:
        raise ValueError(f"config.study.grid={config.study.grid!r}, value {cell.name!r}: "
                         f"{err}") from None


def _set_field(config, dotted: str, value) -> None:
    node = config
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = value


def cell_config(config, cell: Cell):
    """Build the config of one cell: the study config with the cell's overrides and student name."""
    cell_cfg = copy.deepcopy(config)
    for field, value in cell.overrides.items():
        _set_field(cell_cfg, field, value)
    cell_cfg.student_name = f"{config.study.name}-{cell.name}"
    return cell_cfg


def _cell_record(config, cell: Cell) -> dict:
    return {"study": config.study.name, "student_name": f"{config.study.name}-{cell.name}",
            "overrides": cell.overrides}


def config_digest(cell_cfg) -> str:
    """Hash a cell's config without its names; cells that train the same student get one digest."""
    fields = stages.config_without_added_defaults(cell_cfg.to_dict())
    for name in ("student_name", "study"):
        fields.pop(name, None)
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _same_cell(root: pathlib.Path, digest: str) -> tuple[pathlib.Path, dict] | None:
    """Find a finished cell of any study under ``root`` whose config digest is ``digest``."""
    for path in sorted((root / "studies").glob("*/*/cell.json")):
        stored = json.loads(path.read_text())
        if stored.get("config_digest") == digest and "same_as" not in stored:
            return path.parent, stored
    return None


def _check_cell_dir(cell_dir: pathlib.Path, record: dict) -> dict | None:
    """Return the finished cell's stored result, None when unfinished; raise on a mismatch."""
    path = cell_dir / "cell.json"
    if not path.exists():
        return None
    stored = json.loads(path.read_text())
    if stored.get("record") != record:
        raise workdir.WorkdirError(
            f"{cell_dir} was made with other settings ({json.dumps(stored.get('record'))}, this "
            f"config has {json.dumps(record)}); use a new --workdir or delete {cell_dir}")
    return stored


def _cell_context(ctx: stages.Context, config) -> stages.Context:
    """Make a context for one cell that shares the loaded tokenizer, weights and mesh of ``ctx``."""
    cell_ctx = stages.Context(config=config, root=ctx.root)
    for name in ("model_path", "tokenizer", "base", "mesh"):
        if name in ctx.__dict__:
            cell_ctx.__dict__[name] = ctx.__dict__[name]
    return cell_ctx


def run_study(ctx: stages.Context) -> dict:
    """Run every cell of ``ctx.config.study`` and write the study's results; return them."""
    config = ctx.config
    cells = study_cells(config)
    for cell in cells:
        # study_cells ran the config checks; these read the model's metadata too.
        cell_ctx = stages.Context(config=cell_config(config, cell), root=ctx.root)
        with _naming_cell(config, cell):
            stages.check_model_settings(cell_ctx, stages.STAGES)
    study_dir = ctx.root / "studies" / config.study.name
    logging.info("study %s (%s size): %d cells %s", config.study.name, config.study.size,
                 len(cells), ",".join(c.name for c in cells))
    started = time.perf_counter()

    # Shared by every cell: data, targets, teacher, and the reference evaluations.
    for name, runner in (("data", stages.run_data), ("targets", stages.run_targets),
                         ("teacher", stages.run_teacher)):
        stage_started = time.perf_counter()
        runner(ctx)
        ctx.timings[name] = round(time.perf_counter() - stage_started, 1)
    references = ("base", "teacher")
    stages.run_eval(ctx, models=references)

    results = []
    for index, cell in enumerate(cells):
        cell_dir = study_dir / cell.name
        record = _cell_record(config, cell)
        stored = _check_cell_dir(cell_dir, record)
        if stored is not None:
            logging.info("study %s: cell %s finished earlier, skipped", config.study.name,
                         cell.name)
            results.append(stored)
            continue
        cell_cfg = cell_config(config, cell)
        digest = config_digest(cell_cfg)
        same = _same_cell(ctx.root, digest)
        if same is not None:
            source_dir, source = same
            same_as = source_dir.relative_to(ctx.root / "studies").as_posix()
            logging.info("study %s: cell %s trains the same student as %s; its results are "
                         "reused", config.study.name, cell.name, same_as)
            entry = {**source, "record": record, "cell": cell.name, "value": cell.value,
                     "same_as": same_as}
            cell_dir.mkdir(parents=True, exist_ok=True)
            workdir.write_json(cell_dir / "cell.json", entry)
            results.append(entry)
            continue
        logging.info("study %s: cell %d/%d (%s)", config.study.name, index + 1, len(cells),
                     cell.name)
        cell_ctx = _cell_context(ctx, cell_cfg)
        distill_started = time.perf_counter()
        stages.run_distill(cell_ctx)
        eval_started = time.perf_counter()
        stages.run_eval(cell_ctx, models=(cell_ctx.student_name,))
        finished = time.perf_counter()
        entry = {"record": record, "config_digest": digest, "cell": cell.name, "value": cell.value,
                 "wall_seconds": {"distill": round(eval_started - distill_started, 1),
                                  "eval": round(finished - eval_started, 1)},
                 **study_report.cell_summary(cell_ctx)}
        cell_dir.mkdir(parents=True, exist_ok=True)
        workdir.write_json(cell_dir / "cell.json", entry)
        results.append(entry)

    summary = study_report.write_study_outputs(ctx, study_dir, cells, results, references,
                                               round(time.perf_counter() - started, 1))
    print((study_dir / "results.md").read_text())
    return summary
