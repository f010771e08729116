"""Load ml-collections config files by path.

Config files are plain Python files outside the package, so one that builds on another (the smoke
config on the main config, each study on the shared study settings) loads it by path. That works
whatever the current directory is and needs no ``__init__.py`` under ``configs/``.
"""

from __future__ import annotations

import importlib.util
import pathlib
import types


def load_module(path) -> types.ModuleType:
    """Execute the Python file at ``path`` and return it as a module (not put in sys.modules)."""
    path = pathlib.Path(path)
    spec = importlib.util.spec_from_file_location(f"ckt_jax_config_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load config file {str(path)!r}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sibling(file, name: str) -> types.ModuleType:
    """Load the config file ``name`` from the directory of ``file`` (pass ``__file__``)."""
    return load_module(pathlib.Path(file).resolve().with_name(name))
