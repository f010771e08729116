"""Profile ckt_jax's train step on the CPU: where its time goes, and its memory under each setting.

    .venv/bin/python bench/profile_step.py --objective ckt --precision bfloat16
    .venv/bin/python bench/profile_step.py --objective ce_lora --precision bfloat16 --scan-layers
    .venv/bin/python bench/profile_step.py --memory --objective ckt --json memory.json
    .venv/bin/python bench/profile_step.py --teacher-cache 32 --objective kd --steps 5

It builds the same step, model, adapters and batch as `bench/train_step.py` (SmolLM2-135M from
the packaged GGUF file, LoRA rank 8 on q and v, 4 x 256 tokens by default), in this process.

Time mode (the default) runs `--steps` steps under `jax.profiler` after the warm-up. It prints the
wall time of a step and the busy time of XLA's worker threads, summed over threads and grouped
by the kind of fused operation (the name of a fusion without its number). A `ynn_fusion` is a
matrix product that XLA hands to YNNPACK. It also counts the matrix products of the compiled
step by the types of their operands: a bfloat16 product whose operands XLA converted to float32
shows as float32. `--hlo FILE` writes the compiled step's HLO text.

Memory mode compiles the step for each chunk size of the vocabulary-side loss
(`--chunk-sizes`, 0 = no chunks) and each rematerialization policy (`--remats`). For each it
prints the temporary buffers that XLA's buffer assignment reserves for one step (the arrays the
step allocates beyond its inputs and outputs), the peak resident set size of this process during
one step, and the step's time.

Cache mode (`--teacher-cache K`) builds the step with a live teacher and the step that reads
the teacher's top-K log-probabilities from the batch (`config.distill.teacher_cache`), computed
once from the same teacher beforehand, and times them in alternating steps. For each it prints
the median step time, XLA's temporary and argument bytes and the peak resident set size. The
cached step's peak comes from two more steps after the teacher's weights are dropped (when no
other term needs them), as the distill stage never loads them.
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import re
import statistics
import sys
import tempfile

BENCH_DIR = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH_DIR.parent), str(BENCH_DIR)]

import common  # noqa: E402

REMATS = ("none", "full", "dots", "dots_no_batch")


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, "
                                         "such as 0,16") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"{text!r} needs integers >= 0, such as 0,16")
    return values


def remat_list(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",")]
    unknown = [v for v in values if v not in REMATS]
    if not values or unknown:
        raise argparse.ArgumentTypeError(f"{text!r} names unknown policies {unknown}; use a "
                                         f"subset of {','.join(REMATS)}")
    return values


def parse_args(argv=None) -> argparse.Namespace:
    parser = common.OneLineParser(prog="profile_step.py", description=__doc__.splitlines()[0])
    parser.add_argument("--objective", choices=tuple(common.OBJECTIVES), default="ckt")
    parser.add_argument("--precision", choices=("float32", "bfloat16"), default="bfloat16")
    parser.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--scan-layers", action="store_true",
                        help="run the layers as a loop instead of unrolled")
    parser.add_argument("--steps", type=int, default=2, help="profiled (or timed) steps")
    parser.add_argument("--warmup", type=int, default=2, help="steps before them (the first "
                                                              "compiles)")
    parser.add_argument("--top", type=int, default=15, help="kinds of operation to list")
    parser.add_argument("--hlo", type=pathlib.Path, default=None,
                        help="write the compiled step's HLO text here")
    parser.add_argument("--memory", action="store_true",
                        help="memory mode: every chunk size and remat policy")
    parser.add_argument("--chunk-sizes", type=int_list, default=[0, 16],
                        help="memory mode: config.train.vocab_chunk_size values")
    parser.add_argument("--remats", type=remat_list, default=list(REMATS),
                        help="memory mode: config.train.remat values")
    parser.add_argument("--teacher-cache", type=int, default=None, metavar="K",
                        help="cache mode: live teacher against its top-K cache (K >= 1)")
    parser.add_argument("--json", type=pathlib.Path, default=None, help="write results here")

    args = parser.parse_args(argv)
    for option, path in (("--json", args.json), ("--hlo", args.hlo)):
        common.check_output_path(parser, option, path)
    if args.teacher_cache is not None and args.teacher_cache < 1:
        parser.error(f"--teacher-cache={args.teacher_cache} is invalid; pass k >= 1 (or leave it "
                     "out)")
    if args.teacher_cache and args.memory:
        parser.error("--teacher-cache and --memory are separate modes; pass one of them")
    if args.teacher_cache and "kd_weight" not in common.OBJECTIVES[args.objective]:
        parser.error(f"--objective={args.objective} has no kd term to read from a teacher cache; "
                     "pass --objective kd or ckt")
    if args.hlo is not None and (args.memory or args.teacher_cache):
        parser.error("--hlo applies only to time mode; leave out --memory and --teacher-cache")
    if not args.memory:
        for option, value, default in (("--chunk-sizes", args.chunk_sizes, [0, 16]),
                                       ("--remats", args.remats, list(REMATS))):
            if value != default:
                parser.error(f"{option} applies only to memory mode; add --memory")
    # A row needs a prompt token and a reply token, as in bench/train_step.py.
    for name, minimum in (("batch", 1), ("seq_len", 2), ("steps", 1), ("warmup", 1), ("top", 1)):
        if getattr(args, name) < minimum:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} is invalid; pass a "
                         f"number >= {minimum}")
    return args


def product_operand_types(hlo: str) -> collections.Counter:
    """Count the matrix products of compiled HLO text by their operands' element types."""
    counts = collections.Counter()
    for computation in hlo.split("\n\n"):
        types = dict(re.findall(r"^\s*(?:ROOT )?(%\S+) = (\w+)\[", computation, re.MULTILINE))
        for operands in re.findall(r" dot\(([^)]*)\)", computation):
            counts[" x ".join(types.get(name, "?") for name in operands.split(", "))] += 1
    return counts


def build(worker, args, **setup) -> dict:
    worker.setup({"settings": setup.pop("settings"), "seed": 0, "variants": [args.precision],
                  "warmup": args.warmup, "noise_path": setup.pop("noise_path"),
                  "scan_layers": args.scan_layers, **setup})
    return worker.variants[args.precision]


def compiled_step(worker, variant):
    return variant["step"].lower(variant["adapters"], variant["opt_state"], variant["frozen"],
                                 worker.batch, worker.key).compile()


def profile_time(worker, args, tmp: pathlib.Path) -> dict:
    import jax

    settings = common.OBJECTIVES[args.objective]
    variant = build(worker, args, settings=settings, noise_path=str(tmp / "noise.npy"))
    hlo = compiled_step(worker, variant).as_text()
    if args.hlo:
        args.hlo.write_text(hlo)
    trace_dir = tmp / "trace"
    jax.profiler.start_trace(str(trace_dir))
    seconds = [worker.step({"variant": args.precision})["seconds"] for _ in range(args.steps)]
    jax.profiler.stop_trace()
    from ckt_jax import profiling

    kinds, busy = profiling.thread_seconds_by_kind(trace_dir, args.steps)
    wall = statistics.median(seconds)
    print(f"{args.objective} {args.precision} ({'loop' if args.scan_layers else 'unrolled'} "
          f"layers): {wall:.3f} s per step (profiled), {busy:.3f} busy thread-seconds per step "
          f"on {len(jax.devices())} device(s)")
    print(f"{'thread-s':>9}  {'share':>6}  kind of operation")
    for name, value in list(kinds.items())[:args.top]:
        print(f"{value:9.3f}  {value / busy:6.1%}  {name}")
    products = product_operand_types(hlo)
    print("matrix products by operand types: "
          + ", ".join(f"{k}: {v}" for k, v in products.most_common()))
    return {"objective": args.objective, "precision": args.precision,
            "scan_layers": args.scan_layers, "seconds_per_step": wall,
            "busy_thread_seconds_per_step": busy, "thread_seconds_by_kind": kinds,
            "products_by_operand_types": dict(products)}


def profile_memory(worker, args, tmp: pathlib.Path) -> dict:
    rows = []
    print(f"{args.objective} {args.precision}, batch {args.batch} x {args.seq_len}")
    print(f"{'chunk':>5}  {'remat':<13} {'XLA temp MiB':>12} {'peak RSS MiB':>12} {'s/step':>7}")
    for chunk in args.chunk_sizes:
        for remat in args.remats:
            settings = {**common.OBJECTIVES[args.objective], "vocab_chunk_size": chunk}
            variant = build(worker, args, settings=settings, remat=remat,
                            noise_path=str(tmp / f"noise_{chunk}_{remat}.npy"))
            analysis = compiled_step(worker, variant).memory_analysis()
            step = worker.step({"variant": args.precision})
            row = {"vocab_chunk_size": chunk, "remat": remat,
                   "temp_bytes": int(analysis.temp_size_in_bytes),
                   "argument_bytes": int(analysis.argument_size_in_bytes),
                   "output_bytes": int(analysis.output_size_in_bytes),
                   "peak_rss_bytes": step["peak_rss_bytes"], "seconds": step["seconds"],
                   "loss": step["loss"]}
            rows.append(row)
            print(f"{chunk:5d}  {remat:<13} {row['temp_bytes'] / 2**20:12.0f} "
                  f"{row['peak_rss_bytes'] / 2**20:12.0f} {row['seconds']:7.2f}", flush=True)
    return {"objective": args.objective, "precision": args.precision,
            "batch": args.batch, "seq_len": args.seq_len, "rows": rows}


def teacher_cache_fields(worker, args, k: int) -> dict:
    """Compute the teacher's top-k fields of the kd term for the worker's batch, as cached."""
    import jax
    import jax.numpy as jnp
    from ckt_jax import losses, objective, train
    from ckt_jax.model import Llama

    settings = common.OBJECTIVES[args.objective]
    config = objective.ObjectiveConfig(**settings)
    precision = train.Precision(compute=args.precision)
    teacher = Llama(worker.config, dtype=precision.compute_dtype,
                    param_dtype=precision.param_dtype, output_dtype=precision.output_dtype)

    @jax.jit
    def score(params, batch):
        target_mask = losses.next_token_mask(batch["loss_mask"])
        positions, _ = objective.gather_target_positions(target_mask, config.max_target_tokens)
        out = teacher.apply({"params": params}, batch["input_ids"],
                            attention_mask_BxL=batch["attention_mask"])
        hidden = jnp.take_along_axis(out.hidden_BxLxD, positions[..., None], axis=1)
        logits = teacher.apply({"params": params}, hidden, method="project").astype(jnp.float32)
        indices, log_probs = losses.teacher_top_k(logits, k, config.temperature)
        tail = losses.teacher_tail_log_mass(logits, indices, config.temperature)
        return dict(zip(objective.TEACHER_CACHE_FIELDS, (indices, log_probs, tail)))

    return score(worker.teacher, worker.batch)


def profile_cache(worker, args) -> dict:
    import gc

    import jax
    from ckt_jax.objective import ObjectiveConfig

    k = args.teacher_cache
    if k > worker.config.vocab_size:
        print(f"profile_step.py: --teacher-cache={k} exceeds the model's vocabulary of "
              f"{worker.config.vocab_size} tokens; pass at most that", file=sys.stderr)
        sys.exit(2)
    live = ObjectiveConfig(**common.OBJECTIVES[args.objective])
    cached = ObjectiveConfig(**common.OBJECTIVES[args.objective], cached_teacher_top_k=k)
    labels = {"live": "live", "cached": f"top:{k}"}
    # Both steps are built on one batch that carries the cache fields (the live step ignores
    # them) and start from the same adapters and key, as `JaxWorker.setup` builds a variant.
    worker.release({})
    worker.key = jax.random.PRNGKey(0)
    worker.scan_layers, worker.remat = args.scan_layers, "none"
    worker.batch.update(teacher_cache_fields(worker, args, k))
    rows = {}
    for name, objective in (("live", live), ("cached", cached)):
        worker.variants[name] = worker.build_variant(objective, args.precision)
        analysis = compiled_step(worker, worker.variants[name]).memory_analysis()
        warmup = [worker.run_step(name) for _ in range(args.warmup)]
        rows[name] = {"teacher": labels[name], "temp_bytes": int(analysis.temp_size_in_bytes),
                      "argument_bytes": int(analysis.argument_size_in_bytes),
                      "loss": warmup[0]["loss"], "steps": []}
    # Alternating steps, so a slow phase of the machine slows both alike.
    for _ in range(args.steps):
        for name in rows:
            rows[name]["steps"].append(worker.run_step(name))
    rows["live"]["peak_rss_bytes"] = max(s["peak_rss_bytes"] for s in rows["live"]["steps"])
    if not cached.needs_teacher:
        # As in the distill stage, the cached student's process keeps no teacher weights.
        worker.teacher = None
        del worker.variants["live"]
        gc.collect()
    alone = [worker.run_step("cached") for _ in range(2)]
    rows["cached"]["peak_rss_bytes"] = max(s["peak_rss_bytes"] for s in alone)
    print(f"{args.objective} {args.precision}, batch {args.batch} x {args.seq_len}, median of "
          f"{args.steps} alternating steps")
    print(f"{'teacher':<8} {'s/step':>7} {'XLA temp MiB':>12} {'arguments MiB':>13} "
          f"{'peak RSS MiB':>12}")
    for row in rows.values():
        row["seconds"] = statistics.median(s["seconds"] for s in row.pop("steps"))
        print(f"{row['teacher']:<8} {row['seconds']:7.3f} {row['temp_bytes'] / 2**20:12.0f} "
              f"{row['argument_bytes'] / 2**20:13.0f} {row['peak_rss_bytes'] / 2**20:12.0f}")
    cut = 1.0 - rows["cached"]["seconds"] / rows["live"]["seconds"]
    print(f"step time {abs(cut):.1%} {'lower' if cut >= 0 else 'higher'} with the cache")
    return {"objective": args.objective, "precision": args.precision, "batch": args.batch,
            "seq_len": args.seq_len, "top_k": k, "rows": list(rows.values()),
            "step_time_cut": cut}


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax

    jax.config.update("jax_platforms", "cpu")
    import jax_worker

    worker = jax_worker.JaxWorker()
    with tempfile.TemporaryDirectory(prefix="ckt_profile_") as name:
        tmp = pathlib.Path(name)
        worker.prepare({"workdir": name, "seed": 0, "model": args.model, "batch": args.batch,
                        "seq_len": args.seq_len,
                        "teacher": args.objective != "ce_lora"})
        if args.memory:
            result = profile_memory(worker, args, tmp)
        elif args.teacher_cache:
            result = profile_cache(worker, args)
        else:
            result = profile_time(worker, args, tmp)
    result["hardware"] = common.hardware()
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
