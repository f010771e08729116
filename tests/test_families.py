"""Llama 3, Qwen2 and Mistral checkpoints: tiny random models against transformers' PyTorch code.

Each test builds a randomly initialized transformers model, saves it with ``save_pretrained``,
loads the directory with ckt_jax's loader and compares the logits.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ckt_jax.hf_config import from_hf_config, to_hf_config
from ckt_jax.loading import load_model
from ckt_jax.model import Llama, LlamaConfig, RopeScaling, init_cache

SHAPE = dict(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             max_position_embeddings=256, rms_norm_eps=1e-6)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


def torch_family_model(family: str, seed=0, **overrides):
    """A randomly initialized transformers model of ``family``, with random norms and biases."""
    import torch
    import transformers

    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[family]
    torch.manual_seed(seed)
    hf_config = config_class(**{**SHAPE, **overrides}, attn_implementation="eager")
    model = model_class(hf_config).eval()
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if name.endswith("norm.weight"):
                tensor.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                tensor.normal_(0.0, 0.5)
    return model


def compare_to_torch(model, directory, length=24, seed=0):
    """Load ``directory`` with ckt_jax and return max |logit difference| against ``model``."""
    import torch

    config, params = load_model(directory)
    ids_BxL = np.random.default_rng(seed).integers(0, config.vocab_size, (2, length))
    apply = jax.jit(Llama(config).apply)
    logits_BxLxV = np.asarray(apply({"params": params}, jnp.asarray(ids_BxL)).logits_BxLxV)
    with torch.no_grad():
        expected_BxLxV = model(torch.from_numpy(ids_BxL)).logits.numpy()
    return config, float(np.abs(logits_BxLxV - expected_BxLxV).max())


def test_llama3_rope_scaling_matches_torch(torch_available, tmp_path):
    model = torch_family_model("llama", rope_parameters=dict(LLAMA3_ROPE))
    model.save_pretrained(tmp_path)
    # 80 positions pass original_max_position_embeddings=64, where the scaling matters.
    config, difference = compare_to_torch(model, tmp_path, length=80)
    print(f"Llama 3 tiny: max |logit difference| {difference:.2e}")
    assert config.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 64)
    assert difference <= 1e-4


def test_qwen2_biases_match_torch(torch_available, tmp_path):
    model = torch_family_model("qwen2", tie_word_embeddings=True)
    model.save_pretrained(tmp_path)
    config, difference = compare_to_torch(model, tmp_path)
    print(f"Qwen2 tiny: max |logit difference| {difference:.2e}")
    assert config.projection_biases == ("q", "k", "v")
    assert config.tie_word_embeddings
    assert difference <= 1e-4


def test_mistral_sliding_window_matches_torch(torch_available, tmp_path):
    model = torch_family_model("mistral", sliding_window=5)
    model.save_pretrained(tmp_path)
    config, difference = compare_to_torch(model, tmp_path, length=20)
    print(f"Mistral tiny (window 5): max |logit difference| {difference:.2e}")
    assert config.sliding_window == 5
    assert difference <= 1e-4


def test_llama_attention_and_mlp_bias_match_torch(torch_available, tmp_path):
    model = torch_family_model("llama", attention_bias=True, mlp_bias=True)
    model.save_pretrained(tmp_path)
    config, difference = compare_to_torch(model, tmp_path)
    assert config.projection_biases == ("q", "k", "v", "o", "gate", "up", "down")
    assert difference <= 1e-4


def test_sliding_window_cache_matches_full():
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=8, sliding_window=3,
                         max_position_embeddings=64)
    model = Llama(config)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    apply = jax.jit(model.apply)
    prompt_len, steps = 6, 4
    ids_BxL = np.random.default_rng(1).integers(0, 64, (2, prompt_len + steps)).astype(np.int32)
    mask_BxL = np.ones_like(ids_BxL)
    mask_BxL[1, :2] = 0  # row 1 is left-padded by 2 tokens
    full_BxLxV = np.asarray(apply({"params": params}, jnp.asarray(ids_BxL),
                                  attention_mask_BxL=jnp.asarray(mask_BxL)).logits_BxLxV)

    cache = init_cache(config, 2, prompt_len + steps)
    out = apply({"params": params}, jnp.asarray(ids_BxL[:, :prompt_len]),
                attention_mask_BxL=jnp.asarray(mask_BxL[:, :prompt_len]), cache=cache)
    for step in range(steps):
        position = prompt_len + step
        out = apply({"params": params}, jnp.asarray(ids_BxL[:, position:position + 1]),
                    cache=out.cache)
        np.testing.assert_allclose(np.asarray(out.logits_BxLxV)[:, 0], full_BxLxV[:, position],
                                   atol=1e-5, err_msg=f"decode step {step}")


def test_hf_config_round_trip():
    for family, overrides in [("llama", {"rope_parameters": dict(LLAMA3_ROPE)}),
                              ("qwen2", {}), ("mistral", {"sliding_window": 7})]:
        hf_config = {"model_type": family, **SHAPE, **overrides}
        config = from_hf_config(hf_config)
        written = to_hf_config(config)
        assert written["model_type"] == family
        assert from_hf_config(json.loads(json.dumps(written))) == config


BASE = {"model_type": "llama", **SHAPE}


@pytest.mark.parametrize("changes, message", [
    ({"model_type": "gemma"}, "model_type 'gemma'; supported"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
     "rope_scaling.rope_type='dynamic' is not supported; use 'default', 'linear' or 'llama3'"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}},
     r"missing \['low_freq_factor', 'high_freq_factor'\]"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5 is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'; only 'silu'"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quant_method='gptq'"),
    ({"model_type": "qwen2", "use_sliding_window": True}, "use_sliding_window=true"),
    ({"model_type": "mistral", "attention_bias": True}, "attention_bias=true is not part of"),
    ({"sliding_window": 16}, "sliding_window=16 is not part of the llama architecture"),
])
def test_unsupported_fields_rejected(changes, message):
    with pytest.raises(ValueError, match=message) as raised:
        from_hf_config({**BASE, **changes}, where="tiny/config.json")
    assert "\n" not in str(raised.value)
