"""A tiny random Llama trained through `ckt_jax.trainer.run_training`, in this process or another.

Run as a script it trains and writes `losses.json` (per-step metrics) and `adapters.npz` (final
adapters, flattened paths as keys) into `--out`. The mesh, process and checkpoint options are
flags, so the multi-device, multi-process and resume tests share it:

    python tests/tiny_training.py --out DIR --steps 3 --devices 8 --mesh 2,2,2

`--print-steps` prints `step N` after each step and `saving N` when a checkpoint save starts, so a
test can kill the process at chosen moments. `--kill-after-save N` sends SIGKILL to the process
itself right after the save of step N starts, while orbax is still writing it.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for losses.json, adapters.npz")
    parser.add_argument("--steps", type=int, default=3, help="train steps")
    parser.add_argument("--devices", type=int, default=1, help="CPU devices of this process")
    parser.add_argument("--mesh", action="append",
                        help="data,fsdp,tensor sizes; repeat to train once per mesh, each into "
                             "OUT/mesh-DxFxT (default: one run on -1,1,1 into OUT)")
    parser.add_argument("--accum", type=int, default=1, help="micro-batches per step")
    parser.add_argument("--checkpoint-dir", default="", help="checkpoint directory; '' = none")
    parser.add_argument("--every", type=int, default=2, help="checkpoint every N steps")
    parser.add_argument("--sync-save", action="store_true", help="save synchronously")
    parser.add_argument("--coordinator", default="", help="host:port of process 0")
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--print-steps", action="store_true")
    parser.add_argument("--kill-after-save", type=int, default=0)
    parser.add_argument("--sleep-per-step", type=float, default=0.0,
                        help="seconds to sleep before each step, so kills land inside the run")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    # The device count must be set before JAX creates its CPU client.
    import jax
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.devices)
    if args.coordinator:
        jax.distributed.initialize(coordinator_address=args.coordinator,
                                   num_processes=args.num_processes, process_id=args.process_id)

    from absl import logging

    from ckt_jax import checkpoint, sharding, train

    logging.set_verbosity(logging.INFO)

    out = pathlib.Path(args.out)
    setup = build(seed=0, steps=args.steps)
    if args.print_steps or args.kill_after_save or args.sleep_per_step:
        _instrument(args)
    options = checkpoint.CheckpointOptions(every_steps=args.every, keep_last=2, keep_best=1,
                                           async_save=not args.sync_save)
    for spec in args.mesh or ["-1,1,1"]:
        data, fsdp, tensor = (int(x) for x in spec.split(","))
        mesh = sharding.make_mesh(data, fsdp, tensor)
        run_dir = out / f"mesh-{data}x{fsdp}x{tensor}" if args.mesh else out
        try:
            adapters, history = run(setup, mesh, accumulation_steps=args.accum,
                                    checkpoint_dir=args.checkpoint_dir or None,
                                    checkpoint_options=options)
        except train.TrainingStopped as stopped:
            print(stopped, file=sys.stderr, flush=True)
            sys.exit(stopped.exit_status)
        write_results(run_dir, adapters, history)


def write_results(directory: pathlib.Path, adapters, history) -> None:
    """Write history to losses.json and the full adapters to adapters.npz (process 0 only)."""
    import jax
    import numpy as np
    from flax import traverse_util
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather(adapters, tiled=True)
    if jax.process_index() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        flat = {"/".join(path): np.asarray(value)
                for path, value in traverse_util.flatten_dict(gathered).items()}
        np.savez(directory / "adapters.npz", **flat)
        (directory / "losses.json").write_text(json.dumps(history))


def _instrument(args) -> None:
    """Wrap the loop's checkpoint saves and steps to print progress, sleep or kill this process."""
    import signal
    import time

    from ckt_jax import batching, checkpoint

    original_save = checkpoint.TrainCheckpoints.save
    original_record = checkpoint.TrainCheckpoints.record_metrics
    original_next = batching.BatchStream.__next__

    def save(self, step, state, data_position):
        original_save(self, step, state, data_position)
        print(f"saving {step}", flush=True)
        if step == args.kill_after_save:
            os.kill(os.getpid(), signal.SIGKILL)

    def record_metrics(self, step, metrics):
        original_record(self, step, metrics)
        print(f"step {step}", flush=True)

    def next_batch(self):
        # At the start of a step: after the previous step's checkpoint save has started.
        if args.sleep_per_step:
            time.sleep(args.sleep_per_step)
        return original_next(self)

    checkpoint.TrainCheckpoints.save = save
    checkpoint.TrainCheckpoints.record_metrics = record_metrics
    batching.BatchStream.__next__ = next_batch


TINY_KW = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
               num_kv_heads=2, head_dim=8, rope_theta=10000.0)
BATCH_SIZE = 8
SCHEDULE_STEPS = 10


def build(seed: int, steps: int):
    """Return everything `run` needs: models, losses, parameters and examples (seeded)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ckt_jax import batching, lora
    from ckt_jax.model import Llama, LlamaConfig, LoraConfig
    from ckt_jax.objective import ObjectiveConfig, build_objective

    config = LlamaConfig(**TINY_KW)
    lora_config = LoraConfig(rank=4, alpha=8.0, targets=("q", "k", "v", "o", "gate", "down"))
    student = Llama(config, lora=lora_config)
    teacher = Llama(config)
    dummy = jnp.zeros((1, 8), jnp.int32)
    # One jitted init for both models: compiling the layer scan is the slow part on CPU.
    init = jax.jit(lambda key: (student.init(key, dummy)["params"],
                                teacher.init(jax.random.fold_in(key, 1), dummy)["params"]))
    full, teacher_params = jax.tree_util.tree_map(np.asarray, init(jax.random.PRNGKey(seed)))
    adapters, backbone = lora.split_params(full)
    # Non-zero lora_b, so that every adapter leaf moves from the first step on.
    adapters = jax.tree_util.tree_map(lambda x: x + np.float32(0.01), adapters)
    # The teacher is placed and fingerprinted but unused: a kd term would about double the
    # compile time of every test that uses this model.
    objective = ObjectiveConfig(ce_weight=1.0, consistency_weight=0.5, l2_weight=1e-3,
                                max_target_tokens=16)
    loss_fn = build_objective(student, teacher, objective)
    # The schedule does not depend on `steps`, so a short run is a prefix of a longer one.
    optimizer = lora.make_adapter_optimizer(lora.warmup_cosine(1e-2, SCHEDULE_STEPS, 1))

    rng = np.random.default_rng(seed)
    examples = []
    for i in range(48):
        length = int(rng.integers(18, 31))
        ids = tuple(int(t) for t in rng.integers(3, config.vocab_size, size=length))
        mask = tuple([0] * (length // 2) + [1] * (length - length // 2))
        examples.append(batching.Example(ids, mask, "harmful" if i % 2 else "benign", f"ex{i}"))
    return dict(loss_fn=loss_fn, optimizer=optimizer, adapters=adapters,
                frozen={"backbone": backbone, "teacher": teacher_params}, examples=examples,
                steps=steps, seed=seed)


def run(setup, mesh, **kwargs):
    """Train `setup` on `mesh` through run_training; return (adapters, history)."""
    import jax

    from ckt_jax import batching, trainer

    batches = batching.BatchStream(setup["examples"], BATCH_SIZE, 0.5, seed=setup["seed"],
                                   pad_id=0, max_seq_len=32, pad_multiple=32)
    return trainer.run_training(
        name="tiny", loss_fn=setup["loss_fn"], optimizer=setup["optimizer"],
        adapter_params=setup["adapters"], frozen_params=setup["frozen"], batches=batches,
        batch_size=BATCH_SIZE, num_steps=setup["steps"], rng=jax.random.PRNGKey(7), mesh=mesh,
        identity={"examples": batching.examples_fingerprint(setup["examples"])},
        log_every=1, **kwargs)


if __name__ == "__main__":
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    main()
