"""Entry point: `python -m ckt_jax.main --config configs/smollm2_cpu.py --workdir DIR`.

Runs the stages named in `config.stages` in order (data, targets, teacher, distill, eval,
report). Finished stages are skipped on a re-run with the same config, so an interrupted job
continues where it stopped. Override any config field with `--config.<field>=<value>`.
`--config.mode=chat` talks to the base, teacher or student model of DIR instead, and
`--config.mode=export` writes one of them as a PEFT adapter, a Hugging Face directory and a GGUF
file (see `ckt_jax.modes`). `--config.mode=study` runs a grid of students (`ckt_jax.studies`);
the configs under `configs/studies/` set it, and `--config=FILE:full` selects their accelerator
size.
"""

from __future__ import annotations

import difflib
import inspect
import logging as std_logging
import os
import sys
import time

from ckt_jax import xla_flags

xla_flags.apply_defaults()  # Before JAX starts a backend, which reads XLA_FLAGS once.

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_dict, config_flags  # noqa: E402

from ckt_jax import (config_files, distributed, modes, sharding, stages,  # noqa: E402
                     studies, workdir)
from ckt_jax.train import NonFiniteLossError, TrainingStopped  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml-collections config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for data, checkpoints and the report.")
_CHECK_ONLY = flags.DEFINE_bool(
    "check_only", False, "Check the config and its overrides, then exit without touching "
    "--workdir or reading model files (the cluster launchers run this before queueing).")

# Errors caused by input (config, files, work directory): printed as one line, no traceback.
# Set CKT_JAX_TRACEBACK=1 to see the traceback anyway.
INPUT_ERRORS = (workdir.WorkdirError, FileNotFoundError, FileExistsError, ValueError,
                NotADirectoryError, IsADirectoryError, PermissionError)


class _OwnInfoOnly(std_logging.Filter):
    """Keep INFO lines from ckt_jax only; orbax and TFDS log several per checkpoint or split."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or f"{os.sep}ckt_jax{os.sep}" in record.pathname


def parse_stages(text: str) -> list[str]:
    names = [s.strip() for s in str(text).split(",") if s.strip()]
    unknown = [s for s in names if s not in stages.STAGES]
    if not names:
        raise ValueError(f"config.stages={text!r} names no stage; use a comma-separated subset "
                         f"of {','.join(stages.STAGES)}")
    if unknown:
        raise ValueError(f"config.stages={text!r} names unknown stage(s) {unknown}; use a "
                         f"comma-separated subset of {','.join(stages.STAGES)}")
    return [s for s in stages.STAGES if s in names]


# Stages that every process runs together, sharded over the mesh. On a multi-process run the
# other stages run on process 0 while the rest wait.
SHARDED_STAGES = ("teacher", "distill")


MODES = modes.MODES + ("study",)


def check(config) -> list[str]:
    """Check `config` without touching a work directory or model file; return its stages."""
    mode = config.get("mode", "stages")
    if mode not in MODES:
        raise ValueError(f"config.mode={mode!r} is invalid; use one of {', '.join(MODES)}")
    if mode == "study":
        if "study" not in config:
            raise ValueError("config.mode='study' needs a config.study section; use a config "
                             "from configs/studies/")
        studies.study_cells(config)
    selected = parse_stages(config.stages)
    stages.validate_config(config)
    return selected


def run(config, workdir_path: str) -> None:
    mode = config.get("mode", "stages")
    selected = check(config)
    distributed.initialize(config.distributed)
    if not distributed.is_primary():
        logging.set_verbosity(logging.WARNING)
    ctx = stages.Context(config=config, root=workdir.prepare_workdir(workdir_path))
    if mode == "chat":
        modes.run_chat(ctx)
        return
    if mode == "export":
        modes.run_export(ctx)
        return
    if mode == "study":
        # NOTE: the study loop calls the stages directly, without the per-stage process-0 and
        # collective handling of the stage loop below, so it runs in one process only.
        if jax.process_count() > 1:
            raise ValueError("config.mode='study' runs in one process; launch it without "
                             "multi-process settings (one host, any number of local devices)")
        studies.run_study(ctx)
        return
    stages.check_model_settings(ctx, selected)
    logging.info("work directory %s, stages %s", ctx.root, ",".join(selected))
    if any(name in SHARDED_STAGES for name in selected):
        logging.info("training mesh %s", sharding.describe(ctx.mesh))
    runners = {"data": stages.run_data, "targets": stages.run_targets,
               "teacher": stages.run_teacher, "distill": stages.run_distill,
               "eval": stages.run_eval, "report": stages.run_report}
    for name in selected:
        started = time.perf_counter()
        logging.info("stage %s: start", name)
        if name in SHARDED_STAGES:
            runners[name](ctx)
        else:
            distributed.run_on_primary(f"stage {name}", lambda: runners[name](ctx))
        ctx.timings[name] = round(time.perf_counter() - started, 1)
        logging.info("stage %s: done in %.1f s", name, ctx.timings[name])


def main(argv) -> None:
    problem = None
    if len(argv) > 1:
        problem = f"unexpected arguments {argv[1:]}; use --config and --workdir"
    elif _CONFIG.value is None:
        problem = "--config is required, for example --config configs/smollm2_cpu.py"
    elif not (_WORKDIR.value or "").strip():
        problem = "--workdir is required, for example --workdir runs/smollm2_cpu"
    if problem is not None:
        print(f"ckt_jax: error: {problem}", file=sys.stderr)
        sys.exit(2)
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_OwnInfoOnly())
    try:
        if _CHECK_ONLY.value:
            check(_CONFIG.value)
            print("ckt_jax: config checked, no problems found", file=sys.stderr)
            return
        run(_CONFIG.value, _WORKDIR.value)
    except TrainingStopped as stopped:
        # The log line already reaches stderr, so the message is not printed a second time.
        logging.warning("%s", stopped)
        sys.exit(stopped.exit_status)
    except KeyboardInterrupt:
        # A second Ctrl-C stops at once. os._exit skips the interpreter's teardown, which can
        # crash while XLA's threads still run. A resume removes any half-written checkpoint.
        print("ckt_jax: stopped by Ctrl-C without saving; the same command resumes from the "
              "last saved checkpoint", file=sys.stderr)
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(130)
    except NonFiniteLossError as err:
        # The run itself failed, not its input: checkpoints up to the previous save are kept.
        if os.environ.get("CKT_JAX_TRACEBACK"):
            raise
        print(f"ckt_jax: error: {err}", file=sys.stderr)
        sys.exit(1)
    except INPUT_ERRORS as err:
        if os.environ.get("CKT_JAX_TRACEBACK"):
            raise
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"ckt_jax: error: {message}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        # A read-only or full disk: the stages finished before it are kept and reused.
        if os.environ.get("CKT_JAX_TRACEBACK"):
            raise
        print(f"ckt_jax: error: {err}; fix the path or free disk space, then run the same "
              "command again (finished stages are reused)", file=sys.stderr)
        sys.exit(1)


def _config_path_and_overrides(argv: list[str]) -> tuple[str | None, list[str]]:
    path, overrides = None, []
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith("--config."):
            field, _, value = arg[len("--config."):].partition("=")
            overrides.append((field, value if "=" in arg else None))
    return path, overrides


_BOOL_WORDS = ("true", "false", "t", "f", "1", "0")


def _value_problem(field: str, current, value: str | None) -> str | None:
    """Return a one-line problem when `value` cannot become the type of `current`, or None."""
    if value is None:
        return None
    if isinstance(current, bool):
        if value.lower() in _BOOL_WORDS:
            return None
        return f"--config.{field}={value!r} is not a boolean; use True or False"
    if not isinstance(current, (int, float)):
        return None
    parse, words = (int, "a whole number") if isinstance(current, int) else (float, "a number")
    try:
        parse(value)
    except ValueError:
        return f"--config.{field}={value!r} is not {words}; use, for example, {current!r}"
    return None


def check_config_args(argv: list[str]) -> str | None:
    """Return a one-line problem with --config or a --config.<field> override, or None."""
    path, overrides = _config_path_and_overrides(argv)
    if path is None:
        return None  # main() reports the missing flag.
    argument = None
    if not os.path.isfile(path) and ":" in path:
        # config_flags passes the text after the last ':' to get_config (FILE:full).
        path, argument = path.rsplit(":", 1)
    if os.path.isdir(path):
        return (f"config path {path!r} is a directory; pass --config with a config file, "
                "for example configs/smollm2_cpu.py")
    if not os.path.isfile(path):
        return (f"config file {path!r} not found; pass --config with an existing file, "
                "for example configs/smollm2_cpu.py")
    try:
        module = config_files.load_module(path)
        get_config = getattr(module, "get_config", None)
        if (argument is not None and callable(get_config)
                and not inspect.signature(get_config).parameters):
            return (f"config file {path!r} takes no argument, but --config passes {argument!r}; "
                    f"drop ':{argument}'")
        config = module.get_config() if argument is None else module.get_config(argument)
    except Exception as err:  # noqa: BLE001 - any failure in user code is reported the same way.
        return f"config file {path!r} failed to load: {type(err).__name__}: {err}"
    if not isinstance(config, config_dict.ConfigDict):
        return (f"get_config() of {path!r} returned a {type(config).__name__}, not an "
                "ml_collections ConfigDict; build it from configs/smollm2_cpu.py's get_config()")
    for field, value in overrides:
        node = config
        for depth, part in enumerate(field.split(".")):
            if not hasattr(node, "keys") or part not in node:
                names = sorted(node.keys()) if hasattr(node, "keys") else []
                where = ".".join(field.split(".")[:depth]) or "config"
                close = difflib.get_close_matches(part, names, n=1)
                if close:
                    parts = field.split(".")
                    fixed = ".".join(parts[:depth] + close + parts[depth + 1:])
                    return (f"unknown config field {field!r} (--config.{field}); did you mean "
                            f"--config.{fixed}?")
                return (f"unknown config field {field!r} (--config.{field}); fields of "
                        f"{where}: {', '.join(names)}")
            node = node[part]
        problem = _value_problem(field, node, value)
        if problem is not None:
            return problem
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """Parse flags; a bad config file, field or value becomes a one-line error (exit code 2)."""
    problem = check_config_args(argv)
    if problem is None:
        try:
            return flags.FLAGS(argv)
        except flags.Error as err:
            problem = " ".join(str(err).split())
    print(f"ckt_jax: error: {problem}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
