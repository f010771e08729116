"""PEFT LoRA adapters: export read by PyTorch peft, import of adapters that peft wrote."""

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ckt_jax import lora
from ckt_jax.model import Llama, LlamaConfig, LoraConfig
from ckt_jax.peft_format import export_peft_adapter, load_peft_adapter

TINY = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=80, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=128,
                   tie_word_embeddings=False)
LORA = LoraConfig(rank=4, alpha=8.0, targets=("q", "v", "o", "down"))
PROMPT_BxL = np.asarray([[5, 17, 33, 2, 71, 9, 40, 88, 12, 3, 64]], np.int32)


def random_adapters(config, lora_config, seed=0):
    """Adapter tree of a LoRA model with random A and B, so that the update is not zero."""
    model = Llama(config, lora=lora_config)
    full = model.init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))["params"]
    adapters, _ = lora.split_params(full)
    keys = iter(jax.random.split(jax.random.key(seed + 1), 64))
    return jax.tree.map(lambda x: 0.1 * jax.random.normal(next(keys), x.shape), adapters)


@pytest.fixture(scope="module")
def tiny_torch_and_params(torch_available):
    from test_model import params_from_torch, torch_llama

    reference = torch_llama(TINY, seed=2)
    return reference, params_from_torch(reference, TINY)


def jax_logits(params, lora_config, adapters, ids_BxL=PROMPT_BxL):
    full = lora.combine_params(adapters, params)
    model = Llama(TINY, lora=lora_config)
    return np.asarray(model.apply({"params": full}, jnp.asarray(ids_BxL)).logits_BxLxV)


def peft_logits(torch_model, adapter_dir, ids_BxL=PROMPT_BxL):
    import torch
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(copy.deepcopy(torch_model), str(adapter_dir)).eval()
    with torch.no_grad():
        return peft_model(torch.from_numpy(ids_BxL).long()).logits.numpy()


def test_export_loads_in_peft(tiny_torch_and_params, peft_available, tmp_path):
    reference, params = tiny_torch_and_params
    adapters = random_adapters(TINY, LORA)
    export_peft_adapter(tmp_path, adapters, LORA, base_model_name_or_path="tiny")

    expected_BxLxV = jax_logits(params, LORA, adapters)
    got_BxLxV = peft_logits(reference, tmp_path)
    base_BxLxV = jax_logits(params, LORA, jax.tree.map(jnp.zeros_like, adapters))
    difference = float(np.abs(got_BxLxV - expected_BxLxV).max())
    print(f"tiny PEFT export: max |logit difference| {difference:.2e}")
    # The adapter must matter, or the comparison proves nothing.
    assert np.abs(expected_BxLxV - base_BxLxV).max() > 1e-2
    np.testing.assert_allclose(got_BxLxV, expected_BxLxV, atol=1e-4, rtol=0)


def test_export_layout_equals_peft_save(tiny_torch_and_params, peft_available, tmp_path):
    peft = peft_available
    from safetensors.numpy import load_file

    reference, _ = tiny_torch_and_params
    peft_config = peft.LoraConfig(r=LORA.rank, lora_alpha=int(LORA.alpha), task_type="CAUSAL_LM",
                                  target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
    peft.get_peft_model(copy.deepcopy(reference), peft_config).save_pretrained(tmp_path / "peft")
    export_peft_adapter(tmp_path / "ours", random_adapters(TINY, LORA), LORA)

    theirs = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    ours = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        assert ours[name].shape == theirs[name].shape, name
    their_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    our_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    for key in ("peft_type", "task_type", "r", "lora_alpha", "use_rslora", "use_dora", "bias"):
        assert our_config[key] == their_config[key], key
    assert sorted(our_config["target_modules"]) == sorted(their_config["target_modules"])


def test_import_peft_trained_adapter(tiny_torch_and_params, peft_available, tmp_path):
    import torch

    peft = peft_available

    reference, params = tiny_torch_and_params
    # rsLoRA and an adapter on layer 1 only: both need care on import.
    peft_config = peft.LoraConfig(r=4, lora_alpha=6, use_rslora=True, layers_to_transform=[1],
                                  target_modules=["k_proj", "gate_proj", "up_proj"],
                                  task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(copy.deepcopy(reference), peft_config)
    torch.manual_seed(5)
    with torch.no_grad():
        for name, tensor in peft_model.named_parameters():
            if "lora_B" in name:
                tensor.normal_(0.0, 0.1)
    peft_model.save_pretrained(tmp_path)

    lora_config, adapters = load_peft_adapter(tmp_path, TINY)
    assert lora_config.targets == ("k", "gate", "up")
    assert lora_config.rank == 4
    assert not np.any(adapters["layers"]["attn"]["k"]["lora_b"][0])
    expected_BxLxV = peft_logits(reference, tmp_path)
    got_BxLxV = jax_logits(params, lora_config, adapters)
    np.testing.assert_allclose(got_BxLxV, expected_BxLxV, atol=1e-4, rtol=0)


def test_export_import_round_trip(tmp_path):
    adapters = random_adapters(TINY, LORA)
    export_peft_adapter(tmp_path, adapters, LORA)
    lora_config, loaded = load_peft_adapter(tmp_path, TINY)
    assert lora_config == LORA
    for expected, got in zip(jax.tree.leaves(adapters), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(np.asarray(expected), got)


@pytest.mark.parametrize("changes, message", [
    ({"peft_type": "IA3"}, "peft_type 'IA3'; only 'LORA'"),
    ({"use_dora": True}, "use_dora=True"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save=\\['lm_head'\\]"),
    ({"rank_pattern": {"q_proj": 8}}, "rank_pattern="),
])
def test_import_rejects_unsupported_configs(tmp_path, changes, message):
    export_peft_adapter(tmp_path, random_adapters(TINY, LORA), LORA)
    config_path = tmp_path / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **changes}))
    with pytest.raises(ValueError, match=message):
        load_peft_adapter(tmp_path, TINY)


def test_import_rejects_foreign_tensor(tmp_path):
    from safetensors.numpy import save_file

    export_peft_adapter(tmp_path, random_adapters(TINY, LORA), LORA)
    weights = tmp_path / "adapter_model.safetensors"
    save_file({"base_model.model.model.embed_tokens.lora_embedding_A": np.zeros((4, 96),
                                                                                np.float32)},
              str(weights))
    with pytest.raises(ValueError, match="lora_embedding_A', which is not a LoRA matrix"):
        load_peft_adapter(tmp_path, TINY)
