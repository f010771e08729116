"""Exports of a SmolLM2 student (random LoRA adapters on the real weights) read by PyTorch peft,
transformers, ``gguf`` and ckt_jax's own GGUF loader."""

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ckt_jax import lora
from ckt_jax.export import export_gguf, export_hf_directory
from ckt_jax.loading import load_gguf
from ckt_jax.model import Llama, LoraConfig
from ckt_jax.peft_format import export_peft_adapter

pytestmark = pytest.mark.real

STUDENT_LORA = LoraConfig(rank=8, alpha=16.0, targets=("q", "k", "v", "o"))
PROMPT = "Can you suggest a healthy breakfast?"


@pytest.fixture(scope="module")
def student(smollm2_flax):
    """(config, LoRA params, merged params) of SmolLM2 with seeded random adapters."""
    config, params = smollm2_flax
    model = Llama(config, lora=STUDENT_LORA)
    init = jax.jit(lambda key: lora.split_params(
        model.init(key, jnp.zeros((1, 4), jnp.int32))["params"])[0])
    adapters = init(jax.random.key(7))
    keys = iter(jax.random.split(jax.random.key(8), 64))
    # B starts at zero; random B makes the adapters change the logits.
    adapters = jax.tree.map(lambda x: 0.02 * jax.random.normal(next(keys), x.shape), adapters)
    full = lora.combine_params(adapters, params)
    merged = lora.merge_lora(full, STUDENT_LORA.scale)
    return config, adapters, full, merged


@pytest.fixture(scope="module")
def prompt_ids_1xL(smollm2_tokenizer):
    ids, _ = smollm2_tokenizer.encode_chat(PROMPT)
    return np.asarray(ids, np.int32)[None]


@pytest.fixture(scope="module")
def student_logits_1xLxV(student, prompt_ids_1xL, smollm2_flax):
    config, adapters, full, _ = student
    logits = Llama(config, lora=STUDENT_LORA).apply({"params": full}, jnp.asarray(prompt_ids_1xL))
    base = Llama(config).apply({"params": smollm2_flax[1]}, jnp.asarray(prompt_ids_1xL))
    # The adapters must move the logits, or the comparisons below prove nothing.
    assert float(jnp.abs(logits.logits_BxLxV - base.logits_BxLxV).max()) > 0.1
    return np.asarray(logits.logits_BxLxV)


def _max_logit_difference(torch_model, prompt_ids_1xL, reference_1xLxV) -> float:
    """Run a PyTorch causal LM on the prompt; return its max abs logit difference to the reference."""
    import torch

    with torch.no_grad():
        logits_1xLxV = torch_model(torch.from_numpy(prompt_ids_1xL).long()).logits.numpy()
    return float(np.abs(logits_1xLxV - reference_1xLxV).max())


def test_peft_adapter_matches_student(student, student_logits_1xLxV, prompt_ids_1xL,
                                      smollm2_torch, peft_available, tmp_path):
    from peft import PeftModel

    _, adapters, _, _ = student
    export_peft_adapter(tmp_path, adapters, STUDENT_LORA,
                        base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(smollm2_torch), str(tmp_path)).eval()
    difference = _max_logit_difference(peft_model, prompt_ids_1xL, student_logits_1xLxV)
    print(f"SmolLM2 student, PEFT adapter in PyTorch vs JAX: max |logit difference| "
          f"{difference:.2e} over {prompt_ids_1xL.shape[1]} positions")
    assert difference <= 1e-3


def test_hf_directory_matches_student(student, student_logits_1xLxV, prompt_ids_1xL,
                                      smollm2_tokenizer, torch_available, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config, _, _, merged = student
    export_hf_directory(tmp_path, config, merged, smollm2_tokenizer)
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / name).is_file(), name

    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    difference = _max_logit_difference(model, prompt_ids_1xL, student_logits_1xLxV)
    print(f"SmolLM2 student, merged HF directory in transformers vs JAX: max |logit difference| "
          f"{difference:.2e}")
    assert difference <= 1e-3

    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "user", "content": PROMPT}]
    text = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == smollm2_tokenizer.render_chat(messages, add_generation_prompt=True)
    assert hf_tokenizer(text, add_special_tokens=False)["input_ids"] == prompt_ids_1xL[0].tolist()
    assert json.loads((tmp_path / "config.json").read_text())["eos_token_id"] == 2


def test_gguf_matches_student(student, student_logits_1xLxV, prompt_ids_1xL, smollm2_gguf_path,
                              tmp_path):
    import gguf

    config, _, _, merged = student
    path = export_gguf(tmp_path / "student.gguf", config, merged,
                       tokenizer_gguf=smollm2_gguf_path, name="SmolLM2-135M-Instruct student")
    reader = gguf.GGUFReader(path)
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    source = gguf.GGUFReader(smollm2_gguf_path)
    assert sorted(tensors) == sorted(tensor.name for tensor in source.tensors)
    assert len(tensors) == 272
    assert list(tensors["blk.0.attn_k.weight"].shape) == [576, 192]  # GGUF order: (in, out)
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["llama.block_count"].contents() == 30
    assert reader.fields["llama.rope.freq_base"].contents() == 100000.0
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.chat_template",
                "tokenizer.ggml.eos_token_id"):
        assert reader.fields[key].contents() == source.fields[key].contents(), key

    loaded_config, loaded = load_gguf(path)
    assert loaded_config == config
    reloaded = Llama(config).apply({"params": loaded}, jnp.asarray(prompt_ids_1xL))
    difference = float(np.abs(np.asarray(reloaded.logits_BxLxV) - student_logits_1xLxV).max())
    print(f"SmolLM2 student, GGUF re-loaded by ckt_jax vs JAX: max |logit difference| "
          f"{difference:.2e}")
    assert difference <= 1e-3
