"""Merged exports on tiny random models: Hugging Face directories read by transformers, GGUF files
read by ``gguf`` and by ckt_jax's own loader."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ckt_jax.export import export_gguf, export_hf_directory
from ckt_jax.loading import load_gguf, load_hf_checkpoint
from ckt_jax.model import Llama, LlamaConfig, RopeScaling

TINY = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=128,
                   rope_theta=10000.0, rms_norm_eps=1e-5)
FAMILIES = {
    "llama": dataclasses.replace(TINY, tie_word_embeddings=False),
    "llama3": dataclasses.replace(TINY, rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 32)),
    "qwen2": dataclasses.replace(TINY, projection_biases=("q", "k", "v")),
    "mistral": dataclasses.replace(TINY, sliding_window=6, tie_word_embeddings=False),
}
IDS_BxL = np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 40)).astype(np.int32)


def random_params(config: LlamaConfig, seed=0) -> dict:
    """Initialize ``config`` and replace norm scales and biases with random values."""
    init = jax.jit(Llama(config).init)
    params = init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))["params"]
    rng = np.random.default_rng(seed)

    def randomize(path, leaf):
        name = path[-1].key
        if name == "scale":
            return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), jnp.float32)
        if name == "bias":
            return jnp.asarray(rng.normal(0.0, 0.5, leaf.shape), jnp.float32)
        return leaf

    return jax.tree_util.tree_map_with_path(randomize, params)


@functools.lru_cache(maxsize=None)
def jitted_apply(config):
    return jax.jit(Llama(config).apply)


def flax_logits(config, params, ids_BxL=IDS_BxL):
    logits_BxLxV = jitted_apply(config)({"params": params}, jnp.asarray(ids_BxL)).logits_BxLxV
    return np.asarray(logits_BxLxV)


def write_tokenizer_gguf(path, vocab_size):
    """A GGUF file with only tokenizer metadata, as the source that export_gguf copies from."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([f"t{i}" for i in range(vocab_size)])
    writer.add_token_types([gguf.TokenType.NORMAL] * vocab_size)
    writer.add_token_merges(["t 1"])
    writer.add_eos_token_id(2)
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_hf_export_loads_in_transformers(torch_available, tmp_path, family):
    import torch
    from transformers import AutoModelForCausalLM

    config = FAMILIES[family]
    params = random_params(config)
    export_hf_directory(tmp_path, config, params, tokenizer=None)

    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    with torch.no_grad():
        got_BxLxV = model(torch.from_numpy(IDS_BxL).long()).logits.numpy()
    difference = float(np.abs(got_BxLxV - flax_logits(config, params)).max())
    print(f"tiny {family} HF export: max |logit difference| {difference:.2e}")
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == family.rstrip("3")
    assert difference <= 1e-4


def test_hf_export_sharded_round_trip(tmp_path):
    config = FAMILIES["qwen2"]
    params = random_params(config)
    export_hf_directory(tmp_path, config, params, tokenizer=None, max_shard_bytes=40_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "model.safetensors").exists()

    loaded_config, loaded = load_hf_checkpoint(tmp_path)
    assert loaded_config == config
    for path, expected in jax.tree_util.tree_leaves_with_path(params):
        got = loaded
        for key in path:
            got = got[key.key]
        np.testing.assert_array_equal(got, np.asarray(expected), err_msg=str(path))


def test_hf_export_float16(tmp_path):
    params = random_params(TINY)
    export_hf_directory(tmp_path, TINY, params, tokenizer=None, dtype="float16")
    _, loaded = load_hf_checkpoint(tmp_path)
    np.testing.assert_allclose(flax_logits(TINY, loaded), flax_logits(TINY, params), atol=0.05)
    with pytest.raises(ValueError, match="dtype='bfloat16' is not supported"):
        export_hf_directory(tmp_path / "bf16", TINY, params, tokenizer=None, dtype="bfloat16")


@pytest.mark.parametrize("tied, rope_scaling", [
    (True, None), (False, None), (True, RopeScaling("linear", 2.0))],
    ids=["tied", "untied", "linear-rope"])
def test_gguf_export_round_trip(tmp_path, tied, rope_scaling):
    import gguf

    config = dataclasses.replace(TINY, tie_word_embeddings=tied, rope_scaling=rope_scaling)
    params = random_params(config)
    source = write_tokenizer_gguf(tmp_path / "source.gguf", config.vocab_size)
    path = export_gguf(tmp_path / "tiny.gguf", config, params, tokenizer_gguf=source,
                       name="tiny")

    reader = gguf.GGUFReader(path)
    names = {tensor.name for tensor in reader.tensors}
    assert len(names) == 2 + 9 * config.num_layers + (0 if tied else 1)
    assert ("output.weight" in names) == (not tied)
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["llama.attention.head_count_kv"].contents() == config.num_kv_heads
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == 2
    assert reader.fields["tokenizer.ggml.tokens"].contents()[:2] == ["t0", "t1"]

    loaded_config, loaded = load_gguf(path)
    assert loaded_config == config
    np.testing.assert_allclose(flax_logits(config, loaded), flax_logits(config, params),
                               atol=1e-5)


def test_gguf_export_q8_0(tmp_path):
    import gguf

    params = random_params(TINY)
    source = write_tokenizer_gguf(tmp_path / "source.gguf", TINY.vocab_size)
    path = export_gguf(tmp_path / "q8.gguf", TINY, params, tokenizer_gguf=source, gguf_type="q8_0")
    types = {tensor.name: tensor.tensor_type for tensor in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    _, loaded = load_gguf(path)
    np.testing.assert_allclose(flax_logits(TINY, loaded), flax_logits(TINY, params), atol=0.05)


@pytest.mark.parametrize("family, message", [
    ("qwen2", "no projection biases"),
    ("mistral", "sliding_window=6"),
    ("llama3", "rope scaling of type 'llama3'"),
])
def test_gguf_export_rejects_other_families(tmp_path, family, message):
    with pytest.raises(ValueError, match=message):
        export_gguf(tmp_path / "x.gguf", FAMILIES[family], {},
                    tokenizer_gguf=tmp_path / "unused.gguf")


def test_export_rejects_unmerged_lora(tmp_path):
    params = random_params(TINY)
    params["layers"]["attn"]["q"]["lora_a"] = jnp.zeros((2, 64, 4))
    with pytest.raises(ValueError, match="lora.merge_lora"):
        export_hf_directory(tmp_path, TINY, params, tokenizer=None)


def test_gguf_loader_rejects_rope_factors():
    from ckt_jax import loading

    with pytest.raises(ValueError, match="rope_freqs.weight, as in Llama 3.1"):
        loading._gguf_rope_scaling(None, {"rope_freqs.weight": np.ones(8)}, "llama31.gguf")
