"""A study's outputs: per-cell summaries, results.json, the markdown tables and PNG plots."""

from __future__ import annotations

import json
import math
import os
import pathlib
import platform

import numpy as np

from ckt_jax import metrics, workdir

RATE_COLUMNS = ("harmful_refusal_rate", "jailbreak_refusal_rate", "benign_compliance_rate",
                "jailbreak_benign_compliance_rate")
SHORT_NAMES = {"overall_safety_score": "score", "harmful_refusal_rate": "harmful refused",
               "jailbreak_refusal_rate": "jailbreak refused",
               "benign_compliance_rate": "benign answered",
               "jailbreak_benign_compliance_rate": "wrapped benign answered",
               "judge_agreement": "judges agree", "margin_agreement": "margin agrees",
               "kd_token_agreement": "kd top-1", "kd_mean_kl": "kd KL (nats)"}
# Evaluation shifts of the shift study: (label, split, source or None, template or None).
SHIFT_ROWS = (("in distribution (held-out AdvBench + Do-Not-Answer)", "eval_heldout_harmful"),
              ("HarmBench", "eval_harmful", "harmbench"),
              ("StrongREJECT", "eval_harmful", "strongreject"),
              ("jailbreak-wrapped harmful", "eval_jailbreak"),
              ("benign but sensitive", "eval_benign_sensitive"),
              ("jailbreak-wrapped benign", "eval_jailbreak_benign"))


def hardware() -> dict:
    """Describe the machine a study ran on, for the results."""
    import jax

    device = jax.devices()[0]
    return {"platform": device.platform, "device_kind": device.device_kind,
            "device_count": jax.device_count(), "cpu_count": os.cpu_count(),
            "processor": cpu_model()}


def cpu_model() -> str:
    """Return the CPU's model name from /proc/cpuinfo, or `platform`'s processor name elsewhere."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# Studies whose table adds the loss curve's stability and the median step time.
STABILITY_STUDIES = ("precision", "teacher_cache")


def _loss_stability(losses: list[float]) -> dict:
    finite = [x for x in losses if math.isfinite(x)]
    tail = finite[-max(1, len(finite) // 4):] if finite else []
    return {"nonfinite_losses": len(losses) - len(finite),
            "final_loss": losses[-1] if losses else float("nan"),
            "max_loss": max(finite) if finite else float("nan"),
            "last_quarter_loss_std": float(np.std(tail)) if tail else float("nan")}


def cell_summary(ctx) -> dict:
    """Collect what one finished cell produced: metrics, robustness, loss curve and timings."""
    from ckt_jax import evaluation, stages

    eval_dir = stages._eval_dir(ctx)
    model_dir = eval_dir / ctx.student_name
    summary = {"metrics": json.loads((model_dir / "metrics.json").read_text())}
    robustness_path = model_dir / evaluation.robustness_key(ctx.config)
    if robustness_path.exists():
        summary["robustness"] = json.loads(robustness_path.read_text())
    history = workdir.read_jsonl(ctx.student_dir / "history.jsonl")
    losses = [float(row["loss"]) for row in history]
    summary["loss_curve"] = losses
    summary["stability"] = _loss_stability(losses)
    summary["train_seconds"] = workdir.read_summary(ctx.student_dir).get("seconds")
    # The first step compiles, and so does the first step of each new padded length, which
    # the median leaves out as long as most steps repeat a length.
    steps = [float(row["step_seconds"]) for row in history[1:] if "step_seconds" in row]
    summary["median_step_seconds"] = float(np.median(steps)) if steps else None
    return summary


def _format(value, ci=None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, str):
        return value
    text = f"{value:.3f}"
    return f"{text} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else text


def _metric_cells(model: dict, columns) -> list[str]:
    return [_format(model.get(c), model.get(f"{c}_ci95")) for c in columns]


def main_table(results: list[dict], references: dict[str, dict], study: str) -> list[str]:
    columns = ("overall_safety_score",) + RATE_COLUMNS + ("judge_agreement", "margin_agreement",
                                                           "kd_token_agreement", "kd_mean_kl")
    extra = ["train s", "distill wall s", "eval wall s"]
    if study in STABILITY_STUDIES:
        extra += ["final loss", "last-quarter loss std", "non-finite losses", "median step s"]
    header = ["cell"] + [SHORT_NAMES[c] for c in columns] + extra
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for name, model in references.items():
        lines.append("| " + " | ".join([name] + _metric_cells(model, columns)
                                       + ["-"] * len(extra)) + " |")
    for result in results:
        label = str(result["value"])
        if "same_as" in result:
            label += f" (trained as {result['same_as']})"
        row = [label] + _metric_cells(result["metrics"], columns)
        row += [_format(result.get("train_seconds")), _format(result["wall_seconds"]["distill"]),
                _format(result["wall_seconds"]["eval"])]
        if study in STABILITY_STUDIES:
            stability = result["stability"]
            row += [_format(stability["final_loss"]), _format(stability["last_quarter_loss_std"]),
                    str(stability["nonfinite_losses"]), _format(result.get("median_step_seconds"))]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def shift_rate(model: dict, split: str, source: str | None = None) -> dict | None:
    """Success rate of one evaluation shift, from the breakdown of a model's metrics."""
    breakdown = model.get("breakdown", {}).get(split)
    if breakdown is None:
        return None
    if source is None:
        groups = breakdown.get("source") or breakdown.get("template") or breakdown.get("category")
        if not groups:
            return None
        successes = sum(round(g["rate"] * g["n"]) for g in groups.values())
        total = sum(g["n"] for g in groups.values())
        return metrics.rate_with_interval(successes, total)
    return breakdown.get("source", {}).get(source)


def shift_table(results: list[dict], references: dict[str, dict]) -> list[str]:
    models = {**references, **{f"student ({r['cell']})": r["metrics"] for r in results}}
    header = ["evaluation set", "success"] + list(models)
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for label, split, *source in SHIFT_ROWS:
        success = "answered" if "benign" in split else "refused"
        cells = []
        for model in models.values():
            rate = shift_rate(model, split, source[0] if source else None)
            cells.append(f"{_format(rate['rate'], rate['ci95'])} (n={rate['n']})" if rate else "-")
        lines.append("| " + " | ".join([label, success] + cells) + " |")
    return lines


def robustness_table(results: list[dict]) -> list[str]:
    header = ["cell", "perturbation", "value", "harmful refused / clean",
              "benign answered / clean", "symmetric KL (nats/token)"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for result in results:
        for cell in result.get("robustness", {}).get("cells", []):
            lines.append("| " + " | ".join([
                str(result["value"]), cell["perturbation"], str(cell["value"]),
                _format(cell.get("harmful_refusal_rate_relative")),
                _format(cell.get("benign_compliance_rate_relative")),
                _format(cell.get("symmetric_kl"))]) + " |")
    return lines


def render_markdown(summary: dict) -> str:
    study = summary["study"]
    lines = [f"# Study `{study}` ({summary['size']} size)", "",
             f"Grid: `{summary['grid']}`. Evaluation prompts per split: "
             + ", ".join(f"{k}={v}" for k, v in summary["eval_counts"].items()) + ".",
             f"Hardware: {summary['hardware']['device_count']} x "
             f"{summary['hardware']['device_kind']} ({summary['hardware']['platform']}), "
             f"{summary['hardware']['cpu_count']} CPU cores "
             f"({summary['hardware'].get('processor', 'unknown CPU')}). Study wall time "
             f"{summary['wall_seconds']:.0f} s (cells finished in an earlier run count 0).",
             "Rates in brackets: 95% Wilson intervals; the score: 95% bootstrap interval.", ""]
    lines += main_table(summary["cells"], summary["references"], study)
    if study == "shift":
        lines += ["", "Each evaluation shift on its own (training: AdvBench + Do-Not-Answer):", ""]
        lines += shift_table(summary["cells"], summary["references"])
    if any(r.get("robustness") for r in summary["cells"]):
        lines += ["", "Robustness (rates under perturbation divided by the clean rates):", ""]
        lines += robustness_table(summary["cells"])
    judge = summary.get("judge")
    if judge:
        lines += ["", f"Refusal judges on pyrit's {judge['feature_judge']['n']} human-labelled "
                      f"replies ({judge['folds']}-fold cross-validation for the feature judge):"]
        for name in ("feature_judge", "string_judge"):
            scores = judge[name]
            lines.append(f"- {name.replace('_', ' ')}: accuracy {scores['accuracy']:.3f}, "
                         f"precision {scores['precision']:.3f}, recall {scores['recall']:.3f}")
    lines += ["", "Plots: " + ", ".join(f"`{p}`" for p in summary["plots"]) + "."]
    return "\n".join(lines) + "\n"


def _numeric(values) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def write_plots(study_dir: pathlib.Path, summary: dict) -> list[str]:
    """Write the study's PNG plots with matplotlib's Agg backend; return their file names."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    cells = summary["cells"]
    study = summary["study"]
    written = []

    def save(figure, name):
        figure.tight_layout()
        figure.savefig(study_dir / name, dpi=100)
        plt.close(figure)
        written.append(name)

    values = [c["value"] for c in cells]
    x = values if _numeric(values) else list(range(len(values)))
    figure, axes = plt.subplots(figsize=(6, 4))
    for column in ("overall_safety_score",) + RATE_COLUMNS:
        y = [c["metrics"].get(column, float("nan")) for c in cells]
        if column == "overall_safety_score":
            ci = [c["metrics"].get(f"{column}_ci95", [v, v]) for c, v in zip(cells, y)]
            errors = np.abs(np.array([[v - lo, hi - v] for v, (lo, hi) in zip(y, ci)]).T)
            axes.errorbar(x, y, yerr=errors, marker="o", capsize=3, label=SHORT_NAMES[column],
                          linewidth=2)
        else:
            axes.plot(x, y, marker=".", linestyle="--", label=SHORT_NAMES[column])
    if not _numeric(values):
        axes.set_xticks(x, [str(v) for v in values])
    axes.set_xlabel(summary["grid_label"])
    axes.set_ylabel("rate / score")
    axes.set_ylim(-0.05, 1.05)
    axes.legend(fontsize=7)
    axes.set_title(f"{study}: safety score per cell")
    save(figure, "score.png")

    if study == "budget":
        figure, axes = plt.subplots(figsize=(6, 4))
        seconds = [c.get("train_seconds") or c["wall_seconds"]["distill"] for c in cells]
        axes.plot(seconds, [c["metrics"]["overall_safety_score"] for c in cells], marker="o")
        for s, c in zip(seconds, cells):
            axes.annotate(f"{c['value']} steps", (s, c["metrics"]["overall_safety_score"]),
                          fontsize=7)
        axes.set_xlabel("training wall time (s)")
        axes.set_ylabel("overall safety score")
        save(figure, "score_vs_time.png")

    if study == "baselines":
        models = {**summary["references"], **{str(c["value"]): c["metrics"] for c in cells}}
        figure, axes = plt.subplots(figsize=(6, 4))
        y = [m["overall_safety_score"] for m in models.values()]
        ci = [m.get("overall_safety_score_ci95", [v, v]) for m, v in zip(models.values(), y)]
        errors = np.abs(np.array([[v - lo, hi - v] for v, (lo, hi) in zip(y, ci)]).T)
        axes.bar(range(len(models)), y, yerr=errors, capsize=3)
        axes.set_xticks(range(len(models)), list(models))
        axes.set_ylabel("overall safety score (95% interval)")
        axes.set_ylim(0, 1.05)
        axes.set_title("baselines under the same data and budget")
        save(figure, "baselines.png")

    if study in ("precision", "budget", "kd_weight", "data_noise", "baselines", "teacher_cache"):
        figure, axes = plt.subplots(figsize=(6, 4))
        for c in cells:
            axes.plot(range(1, len(c["loss_curve"]) + 1), c["loss_curve"], label=str(c["value"]))
        axes.set_xlabel("step")
        axes.set_ylabel("training loss")
        axes.legend(fontsize=7)
        save(figure, "loss_curves.png")

    if study == "shift":
        models = {**summary["references"], **{f"student ({c['cell']})": c["metrics"]
                                              for c in cells}}
        figure, axes = plt.subplots(figsize=(8, 4))
        width = 0.8 / max(1, len(models))
        for index, (name, model) in enumerate(models.items()):
            rates = [shift_rate(model, split, source[0] if source else None)
                     for _, split, *source in SHIFT_ROWS]
            y = [r["rate"] if r else float("nan") for r in rates]
            errors = np.abs(np.array([[r["rate"] - r["ci95"][0], r["ci95"][1] - r["rate"]]
                                      if r else [0, 0] for r in rates]).T)
            axes.bar(np.arange(len(SHIFT_ROWS)) + index * width, y, width, yerr=errors,
                     capsize=2, label=name)
        axes.set_xticks(np.arange(len(SHIFT_ROWS)) + 0.4 - width / 2,
                        [row[0].split(" (")[0] for row in SHIFT_ROWS], rotation=20, fontsize=7)
        axes.set_ylabel("success rate")
        axes.legend(fontsize=7)
        save(figure, "shifts.png")

    robust = [c for c in cells if c.get("robustness")]
    if robust:
        figure, axes = plt.subplots(figsize=(7, 4))
        for c in robust:
            labels = [f"{r['perturbation']}={r['value']}".replace("in_the_wild/", "")[:24]
                      for r in c["robustness"]["cells"]]
            y = [r.get("harmful_refusal_rate_relative", float("nan"))
                 for r in c["robustness"]["cells"]]
            axes.plot(range(len(labels)), y, marker="o", label=f"{c['value']}: harmful refused")
            y = [r.get("benign_compliance_rate_relative", float("nan"))
                 for r in c["robustness"]["cells"]]
            axes.plot(range(len(labels)), y, marker="s", linestyle="--",
                      label=f"{c['value']}: benign answered")
        axes.set_xticks(range(len(labels)), labels, rotation=30, fontsize=6)
        axes.set_ylabel("rate under perturbation / clean rate")
        axes.legend(fontsize=7)
        save(figure, "robustness.png")
    return written


GRID_LABELS = {"kd_weight": "distill.kd_weight", "budget": "distill.steps",
               "precision": "train.compute_dtype", "data_noise": "noise cell",
               "shift": "student", "baselines": "student objective",
               "teacher_cache": "teacher"}


def write_study_outputs(ctx, study_dir: pathlib.Path, cells, results: list[dict],
                        references: tuple[str, ...], wall_seconds: float) -> dict:
    """Write results.json, results.md and the plots of a study; return the summary."""
    from ckt_jax import stages

    eval_dir = stages._eval_dir(ctx)
    config = ctx.config
    summary = {
        "study": config.study.name, "size": config.study.size, "grid": config.study.grid,
        "grid_label": GRID_LABELS[config.study.name],
        "cells": results,
        "references": {name: json.loads((eval_dir / name / "metrics.json").read_text())
                       for name in references},
        "eval_counts": {split: len(rows) for split, rows in stages.eval_subsets(ctx).items()},
        "hardware": hardware(),
        "wall_seconds": wall_seconds,
        "shared_stage_seconds": dict(ctx.timings),
    }
    judge_dir = ctx.root / "judge"
    if (judge_dir / "stage.json").exists():
        summary["judge"] = workdir.read_summary(judge_dir)
    study_dir.mkdir(parents=True, exist_ok=True)
    summary["plots"] = write_plots(study_dir, summary)
    workdir.write_json(study_dir / "results.json", summary)
    (study_dir / "results.md").write_text(render_markdown(summary))
    return summary
