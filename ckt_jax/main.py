"""Entry point: `python -m ckt_jax.main --config configs/smollm2_cpu.py --workdir DIR`.

Runs the stages named in `config.stages` in order (data, targets, teacher, distill, eval,
report). Finished stages are skipped on a re-run with the same config, so an interrupted job
continues where it stopped. Override any config field with `--config.<field>=<value>`.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from ckt_jax import stages, workdir

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml-collections config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for data, checkpoints and the report.")

# Errors caused by input (config, files, work directory): printed as one line, no traceback.
# Set CKT_JAX_TRACEBACK=1 to see the traceback anyway.
INPUT_ERRORS = (workdir.WorkdirError, FileNotFoundError, FileExistsError, ValueError,
                NotADirectoryError, PermissionError)


def parse_stages(text: str) -> list[str]:
    names = [s.strip() for s in str(text).split(",") if s.strip()]
    unknown = [s for s in names if s not in stages.STAGES]
    if unknown or not names:
        raise ValueError(f"config.stages={text!r} names unknown stage(s) {unknown}; use a "
                         f"comma-separated subset of {','.join(stages.STAGES)}")
    return [s for s in stages.STAGES if s in names]


def run(config, workdir_path: str) -> None:
    selected = parse_stages(config.stages)
    ctx = stages.Context(config=config, root=workdir.prepare_workdir(workdir_path))
    logging.info("work directory %s, stages %s", ctx.root, ",".join(selected))
    runners = {"data": stages.run_data, "targets": stages.run_targets,
               "teacher": stages.run_teacher, "distill": stages.run_distill,
               "eval": stages.run_eval, "report": stages.run_report}
    for name in selected:
        started = time.perf_counter()
        logging.info("stage %s: start", name)
        runners[name](ctx)
        ctx.timings[name] = round(time.perf_counter() - started, 1)
        logging.info("stage %s: done in %.1f s", name, ctx.timings[name])


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; use --config and --workdir")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required, for example --config configs/smollm2_cpu.py")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required, for example --workdir runs/smollm2_cpu")
    logging.set_verbosity(logging.INFO)
    try:
        run(_CONFIG.value, _WORKDIR.value)
    except INPUT_ERRORS as err:
        if os.environ.get("CKT_JAX_TRACEBACK"):
            raise
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"ckt_jax: error: {message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
