"""Translate between Hugging Face ``config.json`` files and ``LlamaConfig``.

Three Hugging Face model families share ckt_jax's decoder: ``llama`` (Llama 2, Llama 3 with
``llama3`` rope scaling, SmolLM2), ``qwen2`` (Qwen2 and Qwen2.5: biases on the q, k and v
projections) and ``mistral`` (an optional sliding attention window). ``from_hf_config`` raises a
one-line error, naming the field and the fix, for each setting that the Flax model does not
implement. ``to_hf_config`` writes the reverse for exports.

Field names follow transformers 5.25, which keeps rotary settings in ``rope_parameters``; the
older ``rope_theta`` and ``rope_scaling`` keys that checkpoints on the Hub still carry are read
too.
"""

from __future__ import annotations

from typing import Any

from ckt_jax.model import LlamaConfig, RopeScaling

FAMILIES = ("llama", "qwen2", "mistral")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "mistral": "MistralForCausalLM"}
_ATTENTION = ("q", "k", "v", "o")
_MLP = ("gate", "up", "down")
# transformers' defaults for fields that config.json files may omit, per family.
_DEFAULTS = {
    "llama": {"rms_norm_eps": 1e-6, "max_position_embeddings": 2048},
    "qwen2": {"rms_norm_eps": 1e-6, "max_position_embeddings": 32768},
    "mistral": {"rms_norm_eps": 1e-6, "max_position_embeddings": 4096 * 32,
                "sliding_window": 4096},
}
_DEFAULT_ROPE_THETA = 10000.0


def _rope_settings(hf_config: dict, where: str) -> tuple[float, RopeScaling | None]:
    """Return (rope_theta, scaling) from ``rope_parameters`` or the older ``rope_scaling``."""
    parameters = dict(hf_config.get("rope_parameters") or {})
    field = "rope_parameters"
    if not parameters and hf_config.get("rope_scaling"):
        parameters = dict(hf_config["rope_scaling"])
        field = "rope_scaling"

    if parameters and all(isinstance(value, dict) for value in parameters.values()):
        raise ValueError(f"{where}: {field} has one entry per layer type "
                         f"({sorted(parameters)}); only one rotary setting for all layers is "
                         "supported")

    theta = float(parameters.get("rope_theta", hf_config.get("rope_theta")
                                 or _DEFAULT_ROPE_THETA))
    partial = parameters.get("partial_rotary_factor", hf_config.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ValueError(f"{where}: partial_rotary_factor={partial} is not supported; only a "
                         "rotary embedding over the whole head (1.0) is implemented")

    rope_type = parameters.get("rope_type", parameters.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type not in ("linear", "llama3"):
        raise ValueError(f"{where}: {field}.rope_type={rope_type!r} is not supported; use "
                         "'default', 'linear' or 'llama3', or remove the scaling to run at the "
                         "pretraining context length")
    if "factor" not in parameters:
        raise ValueError(f"{where}: {field} of type {rope_type!r} is missing 'factor'")
    if rope_type == "linear":
        return theta, RopeScaling("linear", float(parameters["factor"]))

    missing = [key for key in ("low_freq_factor", "high_freq_factor") if key not in parameters]
    if missing:
        raise ValueError(f"{where}: {field} of type 'llama3' is missing {missing}")
    original = parameters.get("original_max_position_embeddings",
                              hf_config.get("max_position_embeddings"))
    return theta, RopeScaling("llama3", float(parameters["factor"]),
                              float(parameters["low_freq_factor"]),
                              float(parameters["high_freq_factor"]), int(original))


def _projection_biases(hf_config: dict, family: str, where: str) -> tuple[str, ...]:
    if family == "qwen2":
        # Qwen2 always has q, k and v biases and no flag for them.
        return ("q", "k", "v")
    biases = ()
    if family == "llama":
        if hf_config.get("attention_bias"):
            biases += _ATTENTION
        if hf_config.get("mlp_bias"):
            biases += _MLP
    else:
        for flag in ("attention_bias", "mlp_bias"):
            if hf_config.get(flag):
                raise ValueError(f"{where}: {flag}=true is not part of the {family} "
                                 "architecture; remove the field or set it to false")
    return biases


def _sliding_window(hf_config: dict, family: str, where: str) -> int | None:
    if family == "mistral":
        window = hf_config.get("sliding_window", _DEFAULTS["mistral"]["sliding_window"])
        return None if window is None else int(window)
    if family == "qwen2":
        layer_types = hf_config.get("layer_types") or []
        if hf_config.get("use_sliding_window") or "sliding_attention" in layer_types:
            raise ValueError(f"{where}: use_sliding_window=true (or 'sliding_attention' in "
                             "layer_types) is not supported, because the Flax model uses one "
                             "attention span for all layers; set use_sliding_window to false")
        return None
    if hf_config.get("sliding_window") is not None:
        raise ValueError(f"{where}: sliding_window={hf_config['sliding_window']} is not part of "
                         "the llama architecture; remove the field or set it to null")
    return None


def from_hf_config(hf_config: dict, where: str = "config.json") -> LlamaConfig:
    """Build a ``LlamaConfig`` from a Hugging Face config dict, naming ``where`` in errors."""
    family = hf_config.get("model_type")
    if family not in FAMILIES:
        raise ValueError(f"{where} has model_type {family!r}; supported: "
                         f"{', '.join(repr(f) for f in FAMILIES)} (Llama 2/3, SmolLM2, Qwen2/2.5, "
                         "Mistral)")
    if hf_config.get("quantization_config"):
        method = hf_config["quantization_config"].get("quant_method", "unknown")
        raise ValueError(f"{where}: quantization_config (quant_method={method!r}) is not "
                         "supported; pass an unquantized float16, bfloat16 or float32 checkpoint")
    hidden_act = hf_config.get("hidden_act", "silu")
    if hidden_act != "silu":
        raise ValueError(f"{where} has hidden_act {hidden_act!r}; only 'silu' is supported")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads"):
        if key not in hf_config:
            raise ValueError(f"{where} is missing the required field {key!r}")

    defaults = _DEFAULTS[family]
    num_heads = int(hf_config["num_attention_heads"])
    hidden_size = int(hf_config["hidden_size"])
    rope_theta, rope_scaling = _rope_settings(hf_config, where)
    return LlamaConfig(
        vocab_size=int(hf_config["vocab_size"]),
        hidden_size=hidden_size,
        intermediate_size=int(hf_config["intermediate_size"]),
        num_layers=int(hf_config["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(hf_config.get("num_key_value_heads") or num_heads),
        head_dim=int(hf_config.get("head_dim") or hidden_size // num_heads),
        rope_theta=rope_theta,
        rms_norm_eps=float(hf_config.get("rms_norm_eps", defaults["rms_norm_eps"])),
        max_position_embeddings=int(hf_config.get("max_position_embeddings",
                                                  defaults["max_position_embeddings"])),
        # transformers defaults tie_word_embeddings to False for all three families.
        tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        rope_scaling=rope_scaling,
        projection_biases=_projection_biases(hf_config, family, where),
        sliding_window=_sliding_window(hf_config, family, where),
    )


def family_of(config: LlamaConfig) -> str:
    """Name the Hugging Face family that expresses ``config`` (llama, qwen2 or mistral)."""
    biases = set(config.projection_biases)
    if biases == {"q", "k", "v"}:
        if config.sliding_window is not None:
            raise ValueError("a model with q/k/v biases and a sliding window matches no supported "
                             "Hugging Face family (Qwen2 needs sliding_window=None)")
        return "qwen2"
    if config.sliding_window is not None:
        if biases:
            raise ValueError(f"a model with a sliding window and biases on {sorted(biases)} "
                             "matches no supported Hugging Face family")
        return "mistral"
    if biases - set(_ATTENTION) - set(_MLP):
        raise ValueError(f"projection_biases={config.projection_biases} are not expressible")
    for group, flag in ((_ATTENTION, "attention_bias"), (_MLP, "mlp_bias")):
        chosen = biases & set(group)
        if chosen and chosen != set(group):
            raise ValueError(f"projection_biases={config.projection_biases} cover only part of "
                             f"{group}; Llama's {flag} adds a bias to all of them")
    return "llama"


def to_hf_config(config: LlamaConfig, *, bos_token_id: int | None = None,
                 eos_token_id: int | None = None, pad_token_id: int | None = None,
                 dtype: str = "float32") -> dict[str, Any]:
    """Write ``config`` as a Hugging Face config dict of the matching family."""
    family = family_of(config)
    rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
    scaling = config.rope_scaling
    if scaling is not None:
        rope_parameters.update(rope_type=scaling.rope_type, factor=scaling.factor)
        if scaling.rope_type == "llama3":
            rope_parameters.update(
                low_freq_factor=scaling.low_freq_factor,
                high_freq_factor=scaling.high_freq_factor,
                original_max_position_embeddings=scaling.original_max_position_embeddings)
    hf_config: dict[str, Any] = {
        "architectures": [ARCHITECTURES[family]],
        "model_type": family,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_parameters": rope_parameters,
        # The older keys, for tools that predate rope_parameters.
        "rope_theta": config.rope_theta,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "dtype": dtype,
        "use_cache": True,
    }
    if scaling is not None:
        hf_config["rope_scaling"] = {k: v for k, v in rope_parameters.items() if k != "rope_theta"}
    if family == "llama":
        hf_config["attention_bias"] = "q" in config.projection_biases
        hf_config["mlp_bias"] = "gate" in config.projection_biases
    elif family == "qwen2":
        hf_config["use_sliding_window"] = False
    else:
        hf_config["sliding_window"] = config.sliding_window
    return hf_config
