"""LoRA adapters in the layout of Hugging Face PEFT (checked against peft 0.21.2).

A PEFT LoRA directory contains ``adapter_config.json`` and ``adapter_model.safetensors``. Tensor
names follow the PyTorch module path with PEFT's wrapper prefix and no adapter name, for example
``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`` [r, in] and
``...q_proj.lora_B.weight`` [out, r]. PEFT scales the update by ``lora_alpha / r`` (or
``lora_alpha / sqrt(r)`` with ``use_rslora``), as ckt_jax does with ``alpha / rank``.

ckt_jax stores a pair as ``lora_a`` [N, in, r] and ``lora_b`` [N, r, out] with a leading layer
axis, so export transposes each layer's slice and import stacks them. Layers or projections
that a PEFT adapter leaves out get zero matrices, which change nothing.
"""

from __future__ import annotations

import json
import math
import pathlib
import re
from typing import Any

import numpy as np
from absl import logging

from ckt_jax.lora import ADAPTER_GROUPS
from ckt_jax.loading import read_safetensors, write_safetensors
from ckt_jax.model import LORA_TARGETS, LlamaConfig, LoraConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_MODULE_GROUP = {"q": "attn", "k": "attn", "v": "attn", "o": "attn",
                 "gate": "mlp", "up": "mlp", "down": "mlp"}
_TORCH_GROUP = {"attn": "self_attn", "mlp": "mlp"}
_PREFIX = "base_model.model."
# An optional wrapper prefix, the layer, the module, A or B, and an optional adapter name.
_KEY_PATTERN = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(?:self_attn|mlp)\."
    r"(q|k|v|o|gate|up|down)_proj\.lora_([AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")
# adapter_config.json settings that change the computation and have no ckt_jax equivalent:
# (key, value that is fine, fix).
_UNSUPPORTED = (
    ("use_dora", False, "merge the DoRA adapter into the weights with PEFT first"),
    ("bias", "none", "retrain with bias='none'"),
    ("lora_bias", False, "retrain with lora_bias=False"),
    ("modules_to_save", None, "merge the adapter with PEFT and load the merged model instead"),
    ("layer_replication", None, "merge the adapter with PEFT and load the merged model instead"),
)


def _module_path(layer: int, target: str) -> str:
    return f"model.layers.{layer}.{_TORCH_GROUP[_MODULE_GROUP[target]]}.{target}_proj"


def peft_target_modules(targets) -> list[str]:
    """Map ckt_jax projection names ("q", "gate", ...) to PEFT's ("q_proj", "gate_proj", ...)."""
    return [f"{target}_proj" for target in targets]


def export_peft_adapter(directory, adapter_params: dict, lora_config: LoraConfig, *,
                        base_model_name_or_path: str | None = None) -> pathlib.Path:
    """Write ``adapter_params`` as a PEFT LoRA adapter directory and return its path.

    ``adapter_params`` is the adapter tree of a LoRA ``Llama`` (``lora.split_params``); top-level
    groups that are not part of the model (the contrastive projection head) are skipped.
    """
    directory = pathlib.Path(directory)
    layers = adapter_params.get("layers")
    if layers is None:
        raise ValueError(f"adapter_params has no 'layers' group (top-level keys "
                         f"{sorted(adapter_params)}); pass the adapter tree of a LoRA Llama")
    skipped = sorted(set(adapter_params) - {"layers"})
    if skipped:
        logging.info("PEFT export: skipping %s, which are not part of the model", skipped)
        unknown = [name for name in skipped if name not in ADAPTER_GROUPS]
        if unknown:
            raise ValueError(f"adapter_params has unexpected top-level groups {unknown}")

    tensors = {}
    for target in lora_config.targets:
        pair = layers.get(_MODULE_GROUP[target], {}).get(target)
        if pair is None or "lora_a" not in pair or "lora_b" not in pair:
            raise ValueError(f"adapter_params has no LoRA pair for target {target!r}, which "
                             f"lora_config.targets={lora_config.targets} lists")
        lora_a_NxIxR = np.asarray(pair["lora_a"], np.float32)
        lora_b_NxRxO = np.asarray(pair["lora_b"], np.float32)
        if lora_a_NxIxR.shape[-1] != lora_config.rank or lora_b_NxRxO.shape[1] != lora_config.rank:
            raise ValueError(f"LoRA pair {target!r} has rank {lora_a_NxIxR.shape[-1]}, but "
                             f"lora_config.rank={lora_config.rank}")
        for layer in range(lora_a_NxIxR.shape[0]):
            module = _PREFIX + _module_path(layer, target)
            tensors[f"{module}.lora_A.weight"] = np.ascontiguousarray(lora_a_NxIxR[layer].T)
            tensors[f"{module}.lora_B.weight"] = np.ascontiguousarray(lora_b_NxRxO[layer].T)

    alpha = lora_config.alpha
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "r": lora_config.rank,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else float(alpha),
        "target_modules": peft_target_modules(lora_config.targets),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    directory.mkdir(parents=True, exist_ok=True)
    # transformers 5.25 writes the same metadata into the safetensors files it saves.
    write_safetensors(directory / WEIGHTS_FILE, tensors, {"format": "pt"})
    (directory / CONFIG_FILE).write_text(json.dumps(adapter_config, indent=2, sort_keys=True)
                                         + "\n")
    return directory


def _check_adapter_config(adapter_config: dict, path: pathlib.Path) -> None:
    peft_type = adapter_config.get("peft_type")
    if peft_type != "LORA":
        raise ValueError(f"{path} has peft_type {peft_type!r}; only 'LORA' adapters can be "
                         "imported")
    for key, fine, fix in _UNSUPPORTED:
        value = adapter_config.get(key, fine)
        if value != fine and not (fine is None and not value):
            raise ValueError(f"{path} sets {key}={value!r}, which ckt_jax does not support; {fix}")
    for key in ("rank_pattern", "alpha_pattern"):
        if adapter_config.get(key):
            raise ValueError(f"{path} sets {key}={adapter_config[key]!r}; ckt_jax uses one rank "
                             "and one alpha for every module, so retrain without per-module "
                             "patterns")


def load_peft_adapter(directory, model_config: LlamaConfig) -> tuple[LoraConfig, dict]:
    """Read a PEFT LoRA directory into (``LoraConfig``, adapter tree) for ``model_config``.

    With ``use_rslora`` the B matrices are multiplied by ``sqrt(r)``, so that ckt_jax's
    ``alpha / rank`` scale gives PEFT's ``alpha / sqrt(r)`` update.
    """
    directory = pathlib.Path(directory)
    config_path = directory / CONFIG_FILE
    weights_path = directory / WEIGHTS_FILE
    for required in (config_path, weights_path):
        if not required.is_file():
            raise FileNotFoundError(f"{required} not found; pass a directory written by PEFT's "
                                    "save_pretrained (adapter_config.json and "
                                    "adapter_model.safetensors)")
    adapter_config = json.loads(config_path.read_text())
    _check_adapter_config(adapter_config, config_path)
    rank = int(adapter_config["r"])
    alpha = float(adapter_config["lora_alpha"])

    found: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    for name, array in read_safetensors(weights_path).items():
        match = _KEY_PATTERN.match(name)
        if match is None:
            raise ValueError(f"{weights_path} contains tensor {name!r}, which is not a LoRA "
                             "matrix of a q/k/v/o/gate/up/down projection; ckt_jax cannot "
                             "import it")
        layer, target, side = int(match.group(1)), match.group(2), match.group(3)
        if layer >= model_config.num_layers:
            raise ValueError(f"{weights_path} has tensor {name!r} for layer {layer}, but the "
                             f"model has {model_config.num_layers} layers")
        found.setdefault((target, side), {})[layer] = np.asarray(array, np.float32)
    if not found:
        raise ValueError(f"{weights_path} contains no LoRA matrices")

    targets = tuple(t for t in LORA_TARGETS if (t, "A") in found or (t, "B") in found)
    scale_fix = math.sqrt(rank) if adapter_config.get("use_rslora") else 1.0
    layers: dict[str, Any] = {}
    for target in targets:
        in_features, out_features = _projection_shape(model_config, target)
        lora_a_NxIxR = np.zeros((model_config.num_layers, in_features, rank), np.float32)
        lora_b_NxRxO = np.zeros((model_config.num_layers, rank, out_features), np.float32)
        a_layers, b_layers = found.get((target, "A"), {}), found.get((target, "B"), {})
        if set(a_layers) != set(b_layers):
            raise ValueError(f"{weights_path}: {target}_proj has lora_A for layers "
                             f"{sorted(a_layers)} but lora_B for layers {sorted(b_layers)}")
        for layer, weight_RxI in a_layers.items():
            weight_OxR = b_layers[layer]
            if weight_RxI.shape != (rank, in_features) or weight_OxR.shape != (out_features, rank):
                raise ValueError(
                    f"{weights_path}: layer {layer} {target}_proj has lora_A {weight_RxI.shape} "
                    f"and lora_B {weight_OxR.shape}, expected {(rank, in_features)} and "
                    f"{(out_features, rank)} for r={rank} on this model")
            lora_a_NxIxR[layer] = weight_RxI.T
            lora_b_NxRxO[layer] = weight_OxR.T * scale_fix
        group = layers.setdefault(_MODULE_GROUP[target], {})
        group[target] = {"lora_a": lora_a_NxIxR, "lora_b": lora_b_NxRxO}
    lora_config = LoraConfig(rank=rank, alpha=alpha, targets=targets)
    return lora_config, {"layers": layers}


def _projection_shape(config: LlamaConfig, target: str) -> tuple[int, int]:
    """Return (in, out) features of projection ``target``."""
    query = config.num_heads * config.head_dim
    key_value = config.num_kv_heads * config.head_dim
    return {
        "q": (config.hidden_size, query),
        "k": (config.hidden_size, key_value),
        "v": (config.hidden_size, key_value),
        "o": (query, config.hidden_size),
        "gate": (config.hidden_size, config.intermediate_size),
        "up": (config.hidden_size, config.intermediate_size),
        "down": (config.intermediate_size, config.hidden_size),
    }[target]


def is_peft_adapter_dir(path) -> bool:
    """Return whether ``path`` is a directory containing a PEFT adapter config."""
    return (pathlib.Path(path) / CONFIG_FILE).is_file()
