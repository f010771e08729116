"""XLA flags that ckt_jax's entry points add before JAX starts its backends.

XLA reads `XLA_FLAGS` once, when the first backend starts, so `apply_defaults` must run before
any array is created. A flag already present in `XLA_FLAGS` (with any value) is left as it is.
This module does not import JAX.
"""

from __future__ import annotations

import os
from typing import MutableMapping

# XLA's CPU scheduler orders operations for concurrency by default, which keeps more buffers
# alive at once. Without it, a float32 SmolLM2 step of the full objective at 4 x 256 tokens
# reserved 3.9 GB of temporary buffers instead of 4.9 (1.5 instead of 4.5 with full remat of
# unrolled layers). A float32 kd step got about 6% slower (4.54 s against 4.29 s), and bfloat16
# steps kept their speed. The flag only affects the CPU backend.
DEFAULT_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false",)


def apply_defaults(environ: MutableMapping[str, str] = os.environ) -> str:
    """Add each of DEFAULT_FLAGS to `environ["XLA_FLAGS"]` unless that option is set; return it.

    A value that does not start with "--" names a file of flags for XLA, and is left as it is.
    """
    value = environ.get("XLA_FLAGS", "")
    if value.strip() and not value.lstrip().startswith("--"):
        return value
    flags = value.split()
    present = {flag.split("=", 1)[0] for flag in flags}
    for flag in DEFAULT_FLAGS:
        if flag.split("=", 1)[0] not in present:
            flags.append(flag)
    environ["XLA_FLAGS"] = " ".join(flags)
    return environ["XLA_FLAGS"]
