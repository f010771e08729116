"""Time ckt_jax's train step against PyTorch + transformers + PEFT on the same objective, on CPU.

    .venv/bin/python bench/train_step.py --json OUT.json                 # SmolLM2-135M, 4 x 256
    .venv/bin/python bench/train_step.py --model tiny --steps 2 --precisions float32

Both sides load the same weights (the packaged SmolLM2 GGUF file, or a tiny random Llama). They
train LoRA rank 8 on q and v from the same initial adapters, on the same batch, with the same
terms, temperature and AdamW settings. There are three objectives. `ce_lora` is cross-entropy
on reply tokens. `kd` is forward KL at temperature 2 from a live teacher, the base model with
its own merged LoRA pair. `ckt` adds to kd a symmetric InfoNCE between pooled student and
teacher states and a noisy second student pass tied to the clean one by a symmetric KL.
`common.OBJECTIVES` lists their `ObjectiveConfig` fields. ckt_jax runs with float32 and bfloat16
compute, and PyTorch in float32, under bfloat16 autocast and under bfloat16 autocast with
`torch.compile`.

Design:
- Two worker processes, one per framework (`jax_worker.py`, `torch_worker.py`), driven by this
  process over pipes. Separate processes keep XLA's and PyTorch's thread pools and allocators
  apart and give each side its own peak RSS. The JAX worker runs with JAX_PLATFORMS=cpu, so
  both sides use the same CPU cores.
- Steps alternate: after every variant is compiled and warmed up, round r runs one step of each
  variant in turn (ckt_jax float32, PyTorch float32, ckt_jax bfloat16, PyTorch autocast,
  PyTorch compile). Only one process computes at a time, and the other waits on its pipe. A
  drift in machine speed during the run (other load, clock changes) therefore slows every
  variant alike instead of favouring whichever side ran first. A step's time is measured inside
  its worker and ends with a host copy of the loss, and the reported time is the median over
  the rounds.
- Before the rounds, a check compares the first-step loss of both sides (initial adapters, same
  batch, and on the PyTorch side the ckt_jax side's embedding noise for the noisy pass). It
  uses float32 when that precision runs, and the run stops with an error if the two losses
  differ by more than `--rtol`.
- FLOPs per step come from `ckt_jax.throughput.objective_flops` for both sides. The achieved
  GFLOP/s of a variant is compared with the best square matrix product (`--matmul-size`) that
  its framework reaches at its precision, measured at the start of the run.
- Peak RSS is the highest resident set size of the worker process during a variant's steps.
  Each step resets the peak first (/proc/self/clear_refs), so it includes the weights and
  whatever else the process holds, but not the peaks of other variants.

Exit status: 0 on success, 1 when the loss check fails or a worker fails, 2 for invalid options
or missing PyTorch.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

BENCH_DIR = pathlib.Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path[:0] = [str(ROOT), str(BENCH_DIR)]

import common  # noqa: E402

PRECISIONS = ("float32", "bfloat16")
# Timed order inside one round: (side, variant, precision).
ROUND_ORDER = (("jax", "float32", "float32"), ("torch", "float32", "float32"),
               ("jax", "bfloat16", "bfloat16"), ("torch", "bf16_autocast", "bfloat16"),
               ("torch", "bf16_compile", "bfloat16"))
SIDE_NAMES = {"jax": "ckt_jax", "torch": "PyTorch"}
# Tolerance of the loss check when only bfloat16 runs: XLA and autocast round differently.
BF16_RTOL = 3e-2


def comma_list(allowed: tuple[str, ...], option: str):
    def parse(text: str) -> list[str]:
        values = [value.strip() for value in text.split(",") if value.strip()]
        unknown = [value for value in values if value not in allowed]
        if unknown or not values:
            raise argparse.ArgumentTypeError(
                f"{option}={text!r} is invalid; use a comma-separated subset of "
                f"{','.join(allowed)}")
        return list(dict.fromkeys(values))
    return parse


def positive_int(option: str, minimum: int = 1):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"{option}={text!r} is invalid; pass an integer "
                                             f">= {minimum}")
        return value
    return parse


def positive_float(option: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = None
        if value is None or not value > 0:
            raise argparse.ArgumentTypeError(f"{option}={text!r} is invalid; pass a number > 0")
        return value
    return parse


def parse_args(argv=None) -> argparse.Namespace:
    parser = common.OneLineParser(prog="train_step.py", description=__doc__.splitlines()[0])
    parser.add_argument("--objectives", type=comma_list(tuple(common.OBJECTIVES), "--objectives"),
                        default=list(common.OBJECTIVES), help="objectives to time (default: all)")
    parser.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2",
                        help="smollm2: the packaged SmolLM2-135M GGUF; tiny: a random 2-layer "
                             "Llama (hidden 64, vocab 256) for tests")
    parser.add_argument("--precisions", type=comma_list(PRECISIONS, "--precisions"),
                        default=list(PRECISIONS), help="compute precisions (default: both)")
    parser.add_argument("--batch", type=positive_int("--batch"), default=4, help="rows per step")
    parser.add_argument("--seq-len", type=positive_int("--seq-len", 2), default=256,
                        help="tokens per row")

    parser.add_argument("--steps", type=positive_int("--steps"), default=5,
                        help="timed steps per variant; the median is reported")
    parser.add_argument("--warmup", type=positive_int("--warmup"), default=2,
                        help="untimed steps per variant before the timed ones (the first "
                             "compiles)")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the torch.compile variant")
    parser.add_argument("--scan-layers", action="store_true",
                        help="run ckt_jax's layers as a loop (config.train.scan_layers=True) "
                             "instead of unrolled, as the CPU config does")

    parser.add_argument("--matmul-size", type=positive_int("--matmul-size", 16), default=2048,
                        help="side of the square matrices of the matmul peak")
    parser.add_argument("--matmul-repeats", type=positive_int("--matmul-repeats"), default=5,
                        help="timed matrix products per peak; the fastest counts")
    parser.add_argument("--rtol", type=positive_float("--rtol"), default=1e-3,
                        help="maximum relative difference of the float32 first-step losses")

    parser.add_argument("--seed", type=int, default=0, help="seed of weights, adapters, batch")
    parser.add_argument("--json", type=pathlib.Path, default=None, help="write results here")
    parser.add_argument("--verbose", action="store_true",
                        help="show the workers' logs instead of keeping them in files")
    args = parser.parse_args(argv)
    common.check_output_path(parser, "--json", args.json)
    return args


def require_torch() -> None:
    """Exit with a one-line error when PyTorch or PEFT is missing from this environment."""
    missing = [name for name in ("torch", "peft", "accelerate")
               if importlib.util.find_spec(name) is None]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        print(f"train_step.py: {', '.join(missing)} {verb} not installed in {sys.prefix}; "
              "install the test extras with `bash launch/setup.sh test`", file=sys.stderr)
        sys.exit(2)


# ---- workers ----------------------------------------------------------------------------------

class WorkerError(RuntimeError):
    pass


class Worker:
    """One worker process and its JSON-line pipe."""

    def __init__(self, side: str, workdir: pathlib.Path, verbose: bool):
        import os

        self.name = SIDE_NAMES[side]
        self.log_path = workdir / f"{side}_worker.log"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
        if side == "jax":
            env["JAX_PLATFORMS"] = "cpu"
        self.log = None if verbose else open(self.log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, str(BENCH_DIR / f"{side}_worker.py")], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self.log, text=True, env=env, cwd=ROOT)

    def request(self, command: str, **fields) -> dict:
        try:
            self.process.stdin.write(json.dumps({"cmd": command, **fields}) + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            pass
        line = self.process.stdout.readline()
        if not line:
            raise WorkerError(f"{self.name} worker exited during {command!r} (status "
                              f"{self.process.wait()}){self.log_tail()}")
        answer = json.loads(line)
        if "error" in answer:
            print(answer.get("traceback", ""), file=sys.stderr)
            raise WorkerError(f"{self.name} worker: {command!r} failed: {answer['error']}")
        return answer

    def log_tail(self, lines: int = 15) -> str:
        if self.log is None:
            return ""
        self.log.flush()
        tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return "; its log ends with:\n" + "\n".join(tail) if tail else ""

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.request("exit")
                self.process.wait(timeout=30)
            except (WorkerError, OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        if self.log is not None:
            self.log.close()


# ---- one objective ----------------------------------------------------------------------------

def check_losses(jax_first: dict, torch_first: dict, precision: str, rtol: float) -> dict:
    """Compare the first-step losses of the two sides; `agree` is False beyond `rtol`."""
    jax_loss, torch_loss = jax_first["first_loss"], torch_first["first_loss"]
    difference = abs(jax_loss - torch_loss) / max(abs(jax_loss), abs(torch_loss), 1e-12)
    terms = {name: {"jax": value, "torch": torch_first["first_terms"].get(name)}
             for name, value in jax_first["first_terms"].items()}
    return {"precision": precision, "jax_loss": jax_loss, "torch_loss": torch_loss,
            "relative_difference": difference, "rtol": rtol, "agree": difference <= rtol,
            "terms": terms}


def summarize(steps: list[dict], warmup: dict, flops: float, tokens: int, peak: float) -> dict:
    """Median step time and the rates derived from it, for one variant."""
    seconds = [step["seconds"] for step in steps]
    median = statistics.median(seconds)
    gflops = flops / median / 1e9
    return {"s_per_step": median, "step_seconds": seconds, "tokens_per_s": tokens / median,
            "gflops": gflops, "matmul_peak_gflops": peak, "peak_fraction": gflops / peak,
            "peak_rss_mib": max(step["peak_rss_bytes"] for step in steps) / 2**20,
            "minor_faults_per_step": statistics.median(step["minor_faults"] for step in steps),
            "warmup_seconds": [step["seconds"] for step in warmup["warmup"]],
            "first_loss": warmup["first_loss"], "first_terms": warmup["first_terms"],
            "last_loss": steps[-1]["loss"]}


def run_objective(name: str, args, workers: dict, config, peaks: dict, workdir) -> dict:
    from ckt_jax import throughput
    from ckt_jax.model import LoraConfig
    from ckt_jax.objective import ObjectiveConfig

    objective = ObjectiveConfig(**common.OBJECTIVES[name])
    settings = dataclasses.asdict(objective)
    order = [(side, variant, precision) for side, variant, precision in ROUND_ORDER
             if precision in args.precisions
             and not (args.no_compile and variant == "bf16_compile")]
    jax_variants = [v for side, v, _ in order if side == "jax"]
    torch_variants = [v for side, v, _ in order if side == "torch"]
    check_precision = "float32" if "float32" in args.precisions else "bfloat16"
    check_torch_variant = "float32" if check_precision == "float32" else "bf16_autocast"
    noise_path = str(workdir / f"noise_{name}.npy")

    print(f"\n== {name}: setting up {', '.join(jax_variants)} (ckt_jax) and "
          f"{', '.join(torch_variants)} (PyTorch)", flush=True)
    setups = {
        "jax": workers["jax"].request("setup", settings=settings, variants=jax_variants,
                                      warmup=args.warmup, noise_path=noise_path, seed=args.seed,
                                      scan_layers=args.scan_layers),
        "torch": workers["torch"].request("setup", settings=settings, variants=torch_variants,
                                          warmup=args.warmup, noise_path=noise_path,
                                          check_variant=check_torch_variant),
    }
    for variant, answer in setups["torch"].items():
        if "error" in answer:
            print(f"   PyTorch {variant} failed and is left out: {answer['error']}", flush=True)

    rtol = args.rtol if check_precision == "float32" else BF16_RTOL
    torch_first = setups["torch"].get(check_torch_variant, {})
    if "error" in torch_first:
        raise WorkerError(f"{name}: the PyTorch {check_torch_variant} variant needed for the "
                          f"loss check failed: {torch_first['error']}")
    check = check_losses(setups["jax"][check_precision], torch_first, check_precision, rtol)
    print(f"   loss check ({check_precision}): ckt_jax {check['jax_loss']:.6f}, PyTorch "
          f"{check['torch_loss']:.6f}, relative difference {check['relative_difference']:.2e} "
          f"(tolerance {rtol:g})", flush=True)
    for term, values in check["terms"].items():
        print(f"     {term}: ckt_jax {values['jax']:.6g}, PyTorch {values['torch']:.6g}")

    result = {"settings": settings, "check": check}
    if not check["agree"]:
        result["error"] = (f"first-step losses differ: ckt_jax {check['jax_loss']:.6f}, PyTorch "
                           f"{check['torch_loss']:.6f}")
        return result

    # Timed rounds, alternating between the processes.
    live = [(side, variant, precision) for side, variant, precision in order
            if "error" not in setups[side].get(variant, {})]
    steps = {(side, variant): [] for side, variant, _ in live}
    failed = {}
    for round_index in range(args.steps):
        for side, variant, _ in live:
            if (side, variant) in failed:
                continue
            try:
                steps[side, variant].append(workers[side].request("step", variant=variant))
            except WorkerError as error:
                if side == "jax":
                    raise
                failed[side, variant] = str(error)
        print(f"   round {round_index + 1}/{args.steps}: " + ", ".join(
            f"{SIDE_NAMES[s]} {v} {steps[s, v][-1]['seconds']:.3f} s"
            for s, v, _ in live if (s, v) not in failed), flush=True)
    for worker in workers.values():
        worker.request("release")

    lora_config = LoraConfig(rank=common.LORA_RANK, alpha=common.LORA_ALPHA,
                             targets=common.LORA_TARGETS)
    flops = throughput.objective_flops(objective, config, lora_config,
                                       config if objective.needs_teacher else None,
                                       args.batch, args.seq_len)
    tokens = args.batch * args.seq_len
    variants = {}
    for side, variant, precision in order:
        key = f"{side}_{variant}"
        error = setups[side].get(variant, {}).get("error") or failed.get((side, variant))
        if error:
            variants[key] = {"error": error}
            continue
        framework = "jax" if side == "jax" else "torch"
        variants[key] = summarize(steps[side, variant], setups[side][variant], flops, tokens,
                                  peaks[f"{framework}_{precision}"])
        variants[key]["precision"] = precision
    result.update(flops_per_step=flops, tokens_per_step=tokens, variants=variants)
    result.update(compare_sides(variants))
    return result


def compare_sides(variants: dict) -> dict:
    """Return the best ckt_jax and PyTorch times and their ratios (above 1: ckt_jax is faster)."""
    def best(prefix, precision=None):
        timed = {key: value for key, value in variants.items()
                 if key.startswith(prefix) and "error" not in value
                 and (precision is None or value["precision"] == precision)}
        if not timed:
            return None, None
        key = min(timed, key=lambda k: timed[k]["s_per_step"])
        return key[len(prefix):], timed[key]["s_per_step"]

    jax_variant, jax_time = best("jax_")
    torch_variant, torch_time = best("torch_")
    torch_fp32 = best("torch_", "float32")[1]
    torch_bf16 = best("torch_", "bfloat16")[1]
    ratio = lambda torch_seconds: (torch_seconds / jax_time
                                   if torch_seconds and jax_time else None)
    same_precision = {}
    for precision in PRECISIONS:
        jax_same = best("jax_", precision)[1]
        torch_same = best("torch_", precision)[1]
        if jax_same and torch_same:
            same_precision[precision] = torch_same / jax_same
    return {"jax_s_per_step": jax_time, "jax_best_variant": jax_variant,
            "torch_best_s_per_step": torch_time, "torch_best_variant": torch_variant,
            "ratio": ratio(torch_time), "ratio_fp32": ratio(torch_fp32),
            "ratio_bf16": ratio(torch_bf16), "ratio_same_precision": same_precision}


# ---- report -----------------------------------------------------------------------------------

def format_table(results: dict, peaks: dict) -> str:
    header = (f"{'objective':<9} {'side':<8} {'variant':<14} {'s/step':>8} {'tokens/s':>9} "
              f"{'GFLOP/s':>8} {'% peak':>7} {'peak RSS MiB':>12} {'first loss':>11}")
    lines = ["", header, "-" * len(header)]
    for name, result in results.items():
        for key, value in result.get("variants", {}).items():
            side, variant = key.split("_", 1)
            label = f"{name:<9} {SIDE_NAMES[side]:<8} {variant:<14}"
            if "error" in value:
                lines.append(f"{label} failed: {value['error'][:60]}")
                continue
            lines.append(f"{label} {value['s_per_step']:>8.3f} {value['tokens_per_s']:>9.0f} "
                         f"{value['gflops']:>8.1f} {100 * value['peak_fraction']:>6.1f}% "
                         f"{value['peak_rss_mib']:>12.0f} {value['first_loss']:>11.5f}")
    lines.append("")
    for name, result in results.items():
        if result.get("ratio") is None:
            lines.append(f"{name}: {result.get('error', 'no ratio')}")
            continue
        extra = ", ".join(f"{key} {value:.2f}" for key, value in (
            ("fp32", result["ratio_fp32"]), ("bf16", result["ratio_bf16"])) if value)
        lines.append(f"{name}: ckt_jax {result['jax_best_variant']} "
                     f"{result['jax_s_per_step']:.3f} s/step, PyTorch "
                     f"{result['torch_best_variant']} {result['torch_best_s_per_step']:.3f} "
                     f"s/step; PyTorch / ckt_jax time ratio {result['ratio']:.2f} "
                     f"(best PyTorch {extra})")
    lines.append("matmul peaks (GFLOP/s): " + ", ".join(
        f"{key} {value:.0f}" for key, value in peaks.items()))
    return "\n".join(lines)


def write_json(path: pathlib.Path | None, report: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


def llama_config(fields: dict):
    from ckt_jax.model import LlamaConfig, RopeScaling

    scaling = fields.get("rope_scaling")
    return LlamaConfig(**{**fields, "rope_scaling": RopeScaling(**scaling) if scaling else None})


def main(argv=None) -> int:
    args = parse_args(argv)
    require_torch()
    report = {"objectives": {}, "peaks": {}, "hardware": common.hardware(),
              "settings": {"model": args.model, "batch": args.batch, "seq_len": args.seq_len,
                           "steps": args.steps, "warmup": args.warmup,
                           "precisions": args.precisions, "lora_rank": common.LORA_RANK,
                           "lora_alpha": common.LORA_ALPHA, "lora_targets": common.LORA_TARGETS,
                           "learning_rate": common.LEARNING_RATE, "seed": args.seed,
                           "matmul_size": args.matmul_size, "scan_layers": args.scan_layers}}
    start = time.perf_counter()
    status = 0
    from ckt_jax.objective import ObjectiveConfig

    needs_teacher = any(ObjectiveConfig(**common.OBJECTIVES[name]).needs_teacher
                        for name in args.objectives)
    with tempfile.TemporaryDirectory(prefix="ckt_bench_") as tmp:
        workdir = pathlib.Path(tmp)
        workers = {}
        try:
            workers["jax"] = Worker("jax", workdir, args.verbose)
            prepared = workers["jax"].request("prepare", model=args.model, workdir=str(workdir),
                                              batch=args.batch, seq_len=args.seq_len,
                                              seed=args.seed, teacher=needs_teacher)
            print(f"ckt_jax loaded {args.model} in {prepared['load_seconds']:.1f} s", flush=True)
            workers["torch"] = Worker("torch", workdir, args.verbose)
            loaded = workers["torch"].request("load", files=prepared["files"])
            print(f"PyTorch loaded {args.model} in {loaded['load_seconds']:.1f} s "
                  f"(attention: {loaded['attention']})", flush=True)
            report["hardware"]["versions"] = {**prepared["versions"], **loaded["versions"]}
            report["settings"]["model_config"] = prepared["config"]

            matmul = dict(size=args.matmul_size, repeats=args.matmul_repeats)
            peaks = {**workers["jax"].request("peaks", **matmul),
                     **workers["torch"].request("peaks", **matmul)}
            report["peaks"] = peaks
            config = llama_config(prepared["config"])
            for name in args.objectives:
                result = run_objective(name, args, workers, config, peaks, workdir)
                report["objectives"][name] = result
                if "error" in result:
                    print(f"train_step.py: {name}: {result['error']}; the two implementations "
                          "do not compute the same objective, so no time is reported",
                          file=sys.stderr)
                    status = 1
                    break
        except WorkerError as error:
            print(f"train_step.py: {error}", file=sys.stderr)
            report["error"] = str(error)
            status = 1
        finally:
            for worker in workers.values():
                worker.close()

    report["hardware"]["load_average_at_end"] = common.hardware()["load_average_1_5_15"]
    report["seconds"] = time.perf_counter() - start
    if report["objectives"] and status == 0:
        print(format_table(report["objectives"], report["peaks"]))
    write_json(args.json, report)
    return status


if __name__ == "__main__":
    sys.exit(main())
