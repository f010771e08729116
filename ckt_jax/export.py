"""Write a merged model as a Hugging Face directory or as a llama.cpp GGUF file.

Both writers take a plain parameter tree (LoRA already folded in with ``lora.merge_lora``) in the
layout of ``ckt_jax.model``. The Hugging Face directory contains ``config.json``,
``generation_config.json``, safetensors weights (sharded above ``max_shard_bytes``) and the
tokenizer with its chat template, so ``AutoModelForCausalLM`` and ``AutoTokenizer`` load it
as is. The GGUF file uses the ``llama`` architecture, with the Q and K rows permuted the way
llama.cpp's converter does, and copies the tokenizer metadata from the source GGUF file.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
from absl import logging
from flax import traverse_util

from ckt_jax.hf_config import to_hf_config
from ckt_jax.loading import write_safetensors
from ckt_jax.lora import ADAPTER_LEAF_NAMES
from ckt_jax.model import LlamaConfig
from ckt_jax.tokenizer import ChatTokenizer

HF_DTYPES = {"float32": np.float32, "float16": np.float16}
GGUF_TYPES = ("f32", "f16", "q8_0")
# 5 GB, the default shard size of transformers 4.x save_pretrained (5.25 uses 50 GB).
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
_ATTENTION = ("q", "k", "v", "o")
_MLP = ("gate", "up", "down")
_GGUF_NAMES = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output",
               "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down"}


def _check_merged(params: dict) -> None:
    flat = traverse_util.flatten_dict(params)
    lora_leaves = ["/".join(path) for path in flat if path[-1] in ADAPTER_LEAF_NAMES]
    if lora_leaves:
        raise ValueError(f"params still contain LoRA leaves ({lora_leaves[0]}, ...); fold them "
                         "into the kernels with lora.merge_lora before exporting")


def hf_state_dict(config: LlamaConfig, params: dict) -> dict[str, np.ndarray]:
    """Map ckt_jax parameters to transformers' tensor names ([out, in] weights, float32)."""
    _check_merged(params)

    def array(value):
        return np.asarray(value, np.float32)

    layers = params["layers"]
    state = {"model.embed_tokens.weight": array(params["embed"]["embedding"])}
    for layer in range(config.num_layers):
        prefix = f"model.layers.{layer}"
        state[f"{prefix}.input_layernorm.weight"] = array(layers["input_norm"]["scale"][layer])
        state[f"{prefix}.post_attention_layernorm.weight"] = array(
            layers["post_attn_norm"]["scale"][layer])
        for group, module, names in (("attn", "self_attn", _ATTENTION), ("mlp", "mlp", _MLP)):
            for name in names:
                leaves = layers[group][name]
                state[f"{prefix}.{module}.{name}_proj.weight"] = array(leaves["kernel"][layer]).T
                if name in config.projection_biases:
                    state[f"{prefix}.{module}.{name}_proj.bias"] = array(leaves["bias"][layer])
    state["model.norm.weight"] = array(params["final_norm"]["scale"])
    if not config.tie_word_embeddings:
        state["lm_head.weight"] = array(params["lm_head"]["kernel"]).T
    return {name: np.ascontiguousarray(value) for name, value in state.items()}


def _write_safetensors(directory: pathlib.Path, state: dict[str, np.ndarray],
                       max_shard_bytes: int) -> list[str]:
    """Write ``state`` as one file or as numbered shards with an index; return the file names."""
    shards: list[dict[str, np.ndarray]] = [{}]
    shard_bytes = 0
    for name, value in state.items():
        if shards[-1] and shard_bytes + value.nbytes > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = value
        shard_bytes += value.nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        write_safetensors(directory / "model.safetensors", shards[0], metadata)
        return ["model.safetensors"]

    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file_name, shard in zip(names, shards):
        write_safetensors(directory / file_name, shard, metadata)
        weight_map.update({tensor: file_name for tensor in shard})
    index = {"metadata": {"total_size": int(sum(v.nbytes for v in state.values()))},
             "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names


def _special_ids(tokenizer: ChatTokenizer | None) -> dict[str, int | None]:
    if tokenizer is None:
        return {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    bos = tokenizer.tokenizer.token_to_id(tokenizer.bos_token) if tokenizer.bos_token else None
    return {"bos_token_id": bos, "eos_token_id": tokenizer.eos_id,
            "pad_token_id": tokenizer.pad_id}


def export_hf_directory(directory, config: LlamaConfig, params: dict,
                        tokenizer: ChatTokenizer | None, *, dtype: str = "float32",
                        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> pathlib.Path:
    """Write a merged model as a Hugging Face directory and return its path.

    ``dtype`` is ``float32`` or ``float16``. ``tokenizer`` may be None for weights only.
    """
    if dtype not in HF_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported for Hugging Face export; use one of "
                         f"{sorted(HF_DTYPES)}")
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: value.astype(HF_DTYPES[dtype])
             for name, value in hf_state_dict(config, params).items()}
    files = _write_safetensors(directory, state, max_shard_bytes)

    special_ids = _special_ids(tokenizer)
    hf_config = to_hf_config(config, dtype=dtype, **special_ids)
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    generation_config = {key: value for key, value in special_ids.items() if value is not None}
    (directory / "generation_config.json").write_text(json.dumps(generation_config, indent=2)
                                                      + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    logging.info("wrote Hugging Face model (%s, %d weight files) to %s", dtype, len(files),
                 directory)
    return directory


def _permute_rows(weight_OxI: np.ndarray, num_heads: int) -> np.ndarray:
    """Interleave each head's two rotary halves, as llama.cpp expects Q and K rows.

    Inverse of ``loading._unpermute_rows``: rows (H, 2, E/2) -> (H, E/2, 2).
    """
    rows, in_features = weight_OxI.shape
    head_dim = rows // num_heads
    return (weight_OxI.reshape(num_heads, 2, head_dim // 2, in_features)
            .swapaxes(1, 2)
            .reshape(rows, in_features))


def _check_gguf_exportable(config: LlamaConfig) -> None:
    fix = ("export a Hugging Face directory instead and convert it with llama.cpp's "
           "convert_hf_to_gguf.py")
    if config.projection_biases:
        raise ValueError(f"GGUF export writes the 'llama' architecture, which has no projection "
                         f"biases, but this model has {config.projection_biases}; {fix}")
    if config.sliding_window is not None:
        raise ValueError(f"GGUF export does not write sliding_window={config.sliding_window}; "
                         f"{fix}")
    if config.rope_scaling is not None and config.rope_scaling.rope_type != "linear":
        raise ValueError(f"GGUF export does not write rope scaling of type "
                         f"{config.rope_scaling.rope_type!r}; {fix}")


def _copy_tokenizer_metadata(writer, source_gguf: pathlib.Path) -> int:
    """Copy every ``tokenizer.*`` key of ``source_gguf`` into ``writer``; return the key count."""
    import gguf

    reader = gguf.GGUFReader(source_gguf)
    copied = 0
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), value_type, sub_type)
        copied += 1
    if not copied:
        raise ValueError(f"{source_gguf} has no tokenizer.* metadata to copy")
    return copied


def _gguf_tensor(writer, name: str, value_OxI: np.ndarray, gguf_type: str) -> None:
    """Add one 2-D weight in ``gguf_type``; rows that Q8_0 cannot split fall back to F16."""
    import gguf

    if gguf_type == "q8_0":
        block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
        if value_OxI.shape[-1] % block == 0:
            quantized = gguf.quants.quantize(value_OxI, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, quantized, raw_shape=quantized.shape,
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            return
        gguf_type = "f16"
    dtype = np.float16 if gguf_type == "f16" else np.float32
    writer.add_tensor(name, np.ascontiguousarray(value_OxI, dtype))


def export_gguf(path, config: LlamaConfig, params: dict, *, tokenizer_gguf, name: str = "ckt_jax",
                gguf_type: str = "f32") -> pathlib.Path:
    """Write a merged model as a llama-architecture GGUF file and return its path.

    ``tokenizer_gguf`` is the source GGUF file whose ``tokenizer.*`` metadata (vocabulary, merges,
    special tokens, chat template) is copied. ``gguf_type`` is ``f32``, ``f16`` or ``q8_0`` for
    the 2-D weights; norm scales stay float32, as llama.cpp's converter writes them.
    """
    import gguf

    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"gguf_type={gguf_type!r} is not supported; use one of {GGUF_TYPES}")
    _check_gguf_exportable(config)
    _check_merged(params)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_name(name)
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_file_type(int(file_types[gguf_type]))
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if config.rope_scaling is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(config.rope_scaling.factor)
    _copy_tokenizer_metadata(writer, pathlib.Path(tokenizer_gguf))

    state = hf_state_dict(config, params)
    _gguf_tensor(writer, "token_embd.weight", state["model.embed_tokens.weight"], gguf_type)
    for layer in range(config.num_layers):
        prefix = f"model.layers.{layer}"
        writer.add_tensor(f"blk.{layer}.attn_norm.weight",
                          state[f"{prefix}.input_layernorm.weight"])
        writer.add_tensor(f"blk.{layer}.ffn_norm.weight",
                          state[f"{prefix}.post_attention_layernorm.weight"])
        for group, names in (("self_attn", _ATTENTION), ("mlp", _MLP)):
            for module in names:
                weight_OxI = state[f"{prefix}.{group}.{module}_proj.weight"]
                if module == "q":
                    weight_OxI = _permute_rows(weight_OxI, config.num_heads)
                elif module == "k":
                    weight_OxI = _permute_rows(weight_OxI, config.num_kv_heads)
                _gguf_tensor(writer, f"blk.{layer}.{_GGUF_NAMES[module]}.weight", weight_OxI,
                             gguf_type)
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    if not config.tie_word_embeddings:
        _gguf_tensor(writer, "output.weight", state["lm_head.weight"], gguf_type)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    logging.info("wrote GGUF model (%s) to %s", gguf_type, path)
    return path
