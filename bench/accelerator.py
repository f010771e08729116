"""Time ckt_jax's train step for a 1B-parameter Llama-shape student on one accelerator.

    python bench/accelerator.py                            # H200: batch 8, 16, 32 x 1024 tokens
    python bench/accelerator.py --tiny --json /tmp/a.json  # CPU smoke run of the same code

The student has the shape of Llama 3.2 1B: hidden 2048, 16 layers, 32 query heads, 8 key/value
heads of dimension 64, SwiGLU width 8192, vocabulary 128256 and tied embeddings, which is
1,235,814,400 parameters. Its weights are random (normal, std 0.02), and the teacher is a second
random model of the same shape. The objective is the benchmark's `ckt` objective
(`common.OBJECTIVES`): distillation at temperature 2, symmetric InfoNCE and a noisy second
student pass with a consistency loss, with LoRA rank 8 on q and v. The step is
`ckt_jax.train.make_train_step`, with bfloat16 compute, frozen weights stored in bfloat16 and
float32 adapters and losses.

Each batch size compiles once and runs `--warmup` untimed and `--steps` timed steps, each ended
with a host copy of the loss. The report gives the median step time, tokens per second and MFU
(model FLOPs from `ckt_jax.throughput.objective_flops`, which leaves out rematerialized
recomputation, over `--peak-tflops`, by default the H200's dense bfloat16 peak of 989 TFLOP/s).
When a batch size runs out of device memory under the `--remat` policy, it is retried once with
full rematerialization. A batch size is skipped when the time already spent plus the previous
batch size's time would pass `--time-budget`. The JSON is rewritten after every batch size, so
a run stopped early keeps what it measured. It goes to `--json`, by default
`$OUT/accelerator.json` when OUT is set and `runs/accelerator.json` otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import statistics
import sys
import time

BENCH_DIR = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH_DIR.parent), str(BENCH_DIR)]

import common  # noqa: E402

H200_BF16_TFLOPS = 989.0  # NVIDIA H200 SXM dense bfloat16 tensor-core peak, without sparsity.


def llama_1b():
    from ckt_jax.model import LlamaConfig

    return LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                       num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
                       rope_theta=500000.0, max_position_embeddings=8192)


def tiny_llama():
    from ckt_jax.model import LlamaConfig

    return LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=4096)


def int_list(text: str) -> list[int]:
    try:
        values = [int(value) for value in text.split(",") if value.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--batch-sizes={text!r} is invalid; pass positive "
                                         "integers separated by commas, for example 8,16,32")
    return values


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="accelerator.py", description=__doc__.splitlines()[0])
    parser.error = lambda message: parser.exit(2, f"{parser.prog}: {message}\n")
    parser.add_argument("--tiny", action="store_true",
                        help="a 2-layer random Llama, batch sizes 2,4 x 32 tokens, 2 steps")
    parser.add_argument("--batch-sizes", type=int_list, default=None,
                        help="rows per step, ascending (default 8,16,32; --tiny: 2,4)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="tokens per row (default 1024; --tiny: 32)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 5)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed steps before the timed ones; the first compiles")

    parser.add_argument("--objective", choices=tuple(common.OBJECTIVES), default="ckt")
    parser.add_argument("--compute-dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--param-dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="storage dtype of the frozen student and teacher weights")
    parser.add_argument("--remat", choices=("none", "full", "dots", "dots_no_batch"),
                        default="dots_no_batch",
                        help="layer rematerialization; out of memory retries with full")

    parser.add_argument("--peak-tflops", type=float, default=H200_BF16_TFLOPS,
                        help="peak TFLOP/s of the device, the denominator of MFU")
    parser.add_argument("--time-budget", type=float, default=390.0,
                        help="seconds after which no further batch size starts")
    parser.add_argument("--json", type=pathlib.Path, default=None,
                        help="output file (default $OUT/accelerator.json or runs/accelerator.json)")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="run the full-size model even when JAX finds only CPU devices")
    args = parser.parse_args(argv)

    if args.batch_sizes is None:
        args.batch_sizes = [2, 4] if args.tiny else [8, 16, 32]
    if args.seq_len is None:
        args.seq_len = 32 if args.tiny else 1024
    if args.steps is None:
        args.steps = 2 if args.tiny else 5
    # A row needs a prompt token and a reply token, as in bench/train_step.py.
    for option, minimum in (("seq_len", 2), ("steps", 1), ("warmup", 1)):
        if getattr(args, option) < minimum:
            parser.error(f"--{option.replace('_', '-')}={getattr(args, option)} is invalid; "
                         f"pass an integer >= {minimum}")
    for option in ("peak_tflops", "time_budget"):
        if not 0 < getattr(args, option) < float("inf"):
            parser.error(f"--{option.replace('_', '-')}={getattr(args, option)} is invalid; "
                         "pass a number > 0")
    if args.json is None:
        out = os.environ.get("OUT")
        args.json = pathlib.Path(out) / "accelerator.json" if out else pathlib.Path(
            "runs", "accelerator.json")
    common.check_output_path(parser, "--json", args.json)
    return args


def is_out_of_memory(error: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(error) or "out of memory" in str(error).lower()


class Bench:
    """The models, weights and compiled steps of one run, shared by its batch sizes."""

    def __init__(self, args):
        import jax
        import jax.numpy as jnp

        from ckt_jax import lora, throughput, train
        from ckt_jax.model import Llama, LoraConfig
        from ckt_jax.objective import ObjectiveConfig

        self.args = args
        self.config = tiny_llama() if args.tiny else llama_1b()
        self.lora_config = LoraConfig(rank=common.LORA_RANK, alpha=common.LORA_ALPHA,
                                      targets=common.LORA_TARGETS)
        self.objective = ObjectiveConfig(**common.OBJECTIVES[args.objective])
        self.precision = train.Precision(param=args.param_dtype, compute=args.compute_dtype)
        self.throughput = throughput
        self.steps = {}

        start = time.perf_counter()
        dummy = jnp.zeros((1, 8), jnp.int32)
        frozen_model = Llama(self.config, param_dtype=self.precision.param_dtype)
        # Initialised on the device, so the weights never pass through host memory.
        init = jax.jit(lambda key: frozen_model.init(key, dummy)["params"])
        self.frozen = {"backbone": init(jax.random.PRNGKey(0))}
        if self.objective.needs_teacher:
            self.frozen["teacher"] = init(jax.random.PRNGKey(1))
        self.adapters = lora.init_adapter_params(
            lambda r: Llama(self.config, lora=self.lora_config).init(r, dummy)["params"],
            jax.random.PRNGKey(2))
        jax.block_until_ready((self.frozen, self.adapters))
        self.init_seconds = time.perf_counter() - start
        self.parameters = lora.count_params(self.frozen["backbone"])
        self.adapter_parameters = lora.count_params(self.adapters)

    def train_step(self, remat: str):
        """Build (once) the jitted train step for one rematerialization policy."""
        if remat not in self.steps:
            from ckt_jax import lora, train
            from ckt_jax.model import Llama
            from ckt_jax.objective import build_objective

            kwargs = dict(dtype=self.precision.compute_dtype,
                          param_dtype=self.precision.param_dtype, remat=remat != "none",
                          remat_policy="full" if remat == "none" else remat)
            student = Llama(self.config, lora=self.lora_config, **kwargs)
            teacher = Llama(self.config, **kwargs) if self.objective.needs_teacher else None
            loss_fn = build_objective(student, teacher, self.objective)
            optimizer = lora.make_adapter_optimizer(common.LEARNING_RATE,
                                                    max_grad_norm=common.MAX_GRAD_NORM)
            self.steps[remat] = (train.make_train_step(loss_fn, optimizer), optimizer)
        return self.steps[remat]

    def measure(self, batch_size: int, remat: str) -> dict:
        import jax
        import jax.numpy as jnp

        args = self.args
        step, optimizer = self.train_step(remat)
        batch = {name: jnp.asarray(value) for name, value in common.make_batch(
            batch_size, args.seq_len, self.config.vocab_size).items()}
        adapters = jax.tree_util.tree_map(jnp.copy, self.adapters)
        opt_state = optimizer.init(adapters)
        key = jax.random.PRNGKey(3)
        seconds, losses = [], []
        for index in range(args.warmup + args.steps):
            start = time.perf_counter()
            adapters, opt_state, metrics = step(adapters, opt_state, self.frozen, batch,
                                                jax.random.fold_in(key, index))
            losses.append(float(metrics["loss"]))
            jax.block_until_ready((adapters, opt_state))
            seconds.append(time.perf_counter() - start)
        timed = seconds[args.warmup:]
        median = statistics.median(timed)
        flops = self.throughput.objective_flops(
            self.objective, self.config, self.lora_config,
            self.config if self.objective.needs_teacher else None, batch_size, args.seq_len)
        tokens = batch_size * args.seq_len
        stats = jax.devices()[0].memory_stats() or {}
        return {"batch_size": batch_size, "seq_len": args.seq_len, "remat": remat,
                "s_per_step": median, "mean_s_per_step": statistics.mean(timed),
                "step_seconds": timed, "first_step_seconds": seconds[0],
                "tokens_per_s": tokens / median, "flops_per_step": flops,
                "tflops": flops / median / 1e12,
                "mfu": flops / median / (args.peak_tflops * 1e12),
                "first_loss": losses[0], "last_loss": losses[-1],
                # The allocator's peak since the process started, so it never decreases.
                "device_peak_memory_gib": stats.get("peak_bytes_in_use", 0) / 2**30 or None}


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax

    start = time.perf_counter()
    device = jax.devices()[0]
    if device.platform == "cpu" and not (args.tiny or args.allow_cpu):
        # Two 1.2B-parameter models and their activations need tens of GiB of host memory.
        print("accelerator.py: JAX found no accelerator, only CPU devices; pass --tiny for a CPU "
              "smoke run, or --allow-cpu to run the 1B model on the CPU anyway", file=sys.stderr)
        return 2
    report = {"device": {"platform": device.platform, "kind": device.device_kind,
                         "count": jax.device_count(), "jax": jax.__version__},
              "settings": {key: str(value) if isinstance(value, pathlib.Path) else value
                           for key, value in vars(args).items()},
              "results": []}
    print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}", flush=True)
    bench = Bench(args)
    report["model"] = {**dataclasses.asdict(bench.config), "parameters": bench.parameters,
                       "adapter_parameters": bench.adapter_parameters}
    report["objective"] = dataclasses.asdict(bench.objective)
    report["init_seconds"] = bench.init_seconds
    print(f"student: {bench.parameters:,} parameters ({bench.adapter_parameters:,} in adapters), "
          f"random teacher of the same shape; built in {bench.init_seconds:.1f} s", flush=True)

    last_cost = 0.0
    for batch_size in args.batch_sizes:
        elapsed = time.perf_counter() - start
        if elapsed + 1.3 * last_cost > args.time_budget:
            report["results"].append({"batch_size": batch_size, "skipped": (
                f"time budget: {elapsed:.0f} s spent, the previous batch size took "
                f"{last_cost:.0f} s, budget {args.time_budget:.0f} s")})
            print(f"batch {batch_size}: skipped, time budget", flush=True)
            continue
        began = time.perf_counter()
        remats = [args.remat] if args.remat == "full" else [args.remat, "full"]
        for remat in remats:
            try:
                result = bench.measure(batch_size, remat)
                break
            except jax.errors.JaxRuntimeError as error:
                if not is_out_of_memory(error):
                    raise
                result = {"batch_size": batch_size, "remat": remat,
                          "error": f"out of device memory: {str(error).splitlines()[0][:200]}"}
                print(f"batch {batch_size}: out of device memory with remat={remat}", flush=True)
        last_cost = time.perf_counter() - began
        report["results"].append(result)
        if "error" not in result:
            print(f"batch {batch_size} x {args.seq_len} (remat {result['remat']}): "
                  f"{result['s_per_step']:.3f} s/step, {result['tokens_per_s']:,.0f} tokens/s, "
                  f"{result['tflops']:.1f} TFLOP/s, MFU {100 * result['mfu']:.1f}% of "
                  f"{args.peak_tflops:g} TFLOP/s; first step {result['first_step_seconds']:.1f} "
                  f"s; device peak memory so far "
                  f"{result['device_peak_memory_gib'] or 0:.1f} GiB", flush=True)
        report["seconds"] = time.perf_counter() - start
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json} after {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
