"""Helpers shared by the benchmark scripts and their two worker processes (NumPy and stdlib only).

The PyTorch worker imports this module but never JAX, and the JAX worker never imports torch, so
neither framework's thread pool or allocator runs inside the other's process.

Workers talk to the parent over a pipe. The parent writes one JSON object per line to the
worker's stdin, and the worker replies to each with one JSON line. Arrays (the batch, the check
noise) travel as `.npy`/`.npz` files in a temporary directory that the parent owns.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
import traceback
from typing import Callable

import numpy as np

# LoRA settings of the student on both sides (PEFT: r=8, lora_alpha=16, q_proj and v_proj).
LORA_RANK = 8
LORA_ALPHA = 16.0
LORA_TARGETS = ("q", "v")
# Constant AdamW step size on both sides, with gradients clipped to a global norm of 1.
LEARNING_RATE = 1e-3
MAX_GRAD_NORM = 1.0

# The three benchmarked objectives as `ckt_jax.objective.ObjectiveConfig` fields. Every field not
# named keeps its default (token reduction, 96 scored reply positions per row, no opening weight).
# The PyTorch worker implements the same terms from the same fields.
OBJECTIVES = {
    # Cross-entropy on the reply tokens.
    "ce_lora": {"ce_weight": 1.0, "l2_weight": 1e-4},
    # Forward KL from a live teacher at temperature 2.
    "kd": {"kd_weight": 1.0, "temperature": 2.0, "l2_weight": 1e-4},
    # Distillation, symmetric InfoNCE between pooled student and teacher states, and a second
    # student pass on noisy input embeddings tied to the clean pass by a symmetric KL.
    "ckt": {"kd_weight": 1.0, "temperature": 2.0, "contrastive_weight": 0.1,
            "consistency_weight": 0.5, "consistency_row_stride": 1, "l2_weight": 1e-4},
}

# Initial adapters: lora_a as ckt_jax initialises it, lora_b drawn from N(0, std) instead of 0 so
# that the adapter path changes the first loss and the loss check covers it.
STUDENT_LORA_B_STD = 0.01
# The teacher is the base model with its own random LoRA pair on q and v, merged.
TEACHER_LORA_B_STD = 0.05


# ---- command lines ----------------------------------------------------------------------------

class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, without the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message}\n")


def check_output_path(parser: argparse.ArgumentParser, option: str, path) -> None:
    """Stop with a one-line error unless `path` can be written, before any work starts.

    Creates its missing directories and opens the file for appending; a file that did not
    exist before is removed again.
    """
    if path is None:
        return
    if path.is_dir():
        parser.error(f"{option}={str(path)!r} is a directory; pass a file path")
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a"):
            pass
    except OSError as error:
        blocking = next((parent for parent in path.parents if parent.is_file()), None)
        if blocking is not None:
            parser.error(f"{option}={str(path)!r} is invalid: {str(blocking)!r} is a file, not a "
                         "directory; pass a path under a directory")
        parser.error(f"{option}={str(path)!r} is not writable ({error.strerror}); pass a "
                     "writable path")
    if not existed:
        path.unlink()


# ---- the batch --------------------------------------------------------------------------------

def make_batch(batch_size: int, seq_len: int, vocab_size: int, seed: int = 0) -> dict:
    """Build a batch of random token ids whose replies start at different offsets per row.

    Every token is real (no padding). Row `b` has a prompt of `seq_len / 2 - (b % 4) * seq_len / 16`
    tokens (at least 1) and a reply up to the end of the row, which `loss_mask` marks. Half of
    the rows are labelled harmful. Ids start at 3 to stay clear of special tokens.
    """
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(3, vocab_size, size=(batch_size, seq_len), dtype=np.int64)
    loss_mask = np.zeros((batch_size, seq_len), np.int32)
    for row in range(batch_size):
        prompt_len = max(1, seq_len // 2 - (row % 4) * (seq_len // 16))
        loss_mask[row, prompt_len:] = 1
    return {
        "input_ids": input_ids.astype(np.int32),
        "attention_mask": np.ones((batch_size, seq_len), np.int32),
        "loss_mask": loss_mask,
        "is_harmful": (np.arange(batch_size) % 2).astype(np.int32),
    }


# ---- memory and page faults -------------------------------------------------------------------

def reset_peak_rss() -> bool:
    """Reset this process's peak resident set size (VmHWM) to its current RSS.

    Writing 5 to /proc/self/clear_refs does this on Linux 4.0 and later. Returns False where it
    is not possible, and the peak then counts from the start of the process.
    """
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident set size of this process since the last reset, in bytes."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    # ru_maxrss is in KiB on Linux (bytes on macOS) and never resets.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure_step(run_step: Callable[[], dict]) -> dict:
    """Run one step after resetting the peak RSS, and add its seconds, peak RSS and page faults.

    `run_step` must return only after the step's work is finished (a host copy of the loss).
    """
    reset_peak_rss()
    faults = minor_faults()
    start = time.perf_counter()
    result = run_step()
    seconds = time.perf_counter() - start
    result.update(seconds=seconds, peak_rss_bytes=peak_rss_bytes(),
                  minor_faults=minor_faults() - faults)
    return result


# ---- matrix-product peaks ---------------------------------------------------------------------

def best_seconds(run: Callable[[], None], repeats: int) -> float:
    """Smallest wall time of `repeats` calls of `run`, after one untimed call."""
    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_gflops(size: int, seconds: float) -> float:
    """GFLOP/s of one `size x size` by `size x size` product that took `seconds`."""
    return 2.0 * size**3 / seconds / 1e9


# ---- the machine ------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    """Return the CPU's bfloat16 and AMX feature flags from /proc/cpuinfo (empty if unreadable)."""
    feature_flags = ("avx512_bf16", "amx_bf16", "amx_tile", "amx_int8", "avx512f")
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [flag for flag in feature_flags if flag in flags]
    except OSError:
        pass
    return []


def memory_total_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def hardware() -> dict:
    """Describe the host: CPU, usable cores, memory, load average and Python."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "memory_bytes": memory_total_bytes(),
        "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


# ---- the worker side of the pipe --------------------------------------------------------------

def serve(handlers: dict[str, Callable[[dict], dict]]) -> None:
    """Serve the parent's JSON-line requests until it sends `exit` or closes the pipe.

    Each request is `{"cmd": name, ...}` and gets one JSON line back: the handler's dict, or
    `{"error": message, "traceback": text}` when the handler raised. The replies go to a copy of
    the original stdout, and stdout itself is pointed at stderr, so that a library that prints
    cannot corrupt the protocol.
    """
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        command = request.pop("cmd")
        if command == "exit":
            replies.write(json.dumps({"ok": True}) + "\n")
            return
        handler = handlers.get(command)
        try:
            if handler is None:
                raise ValueError(f"worker command {command!r} is unknown; use one of "
                                 f"{', '.join(sorted(handlers))} or exit")
            reply = handler(request)
        except Exception as error:  # Sent back to the parent, which decides what is fatal.
            reply = {"error": f"{type(error).__name__}: {error}",
                      "traceback": traceback.format_exc()}
        replies.write(json.dumps(reply) + "\n")
