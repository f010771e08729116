"""Llama model: agreement with transformers' PyTorch Llama, padding, LoRA and config checks."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ckt_jax import model as model_lib
from ckt_jax.model import Llama, LlamaConfig, LoraConfig, init_cache

TINY = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0,
                   rms_norm_eps=1e-5, max_position_embeddings=256)


def torch_llama(config: LlamaConfig, seed=0):
    """A randomly initialized transformers LlamaForCausalLM with the given shape."""
    import torch
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    hf_config = HFLlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim, rope_theta=config.rope_theta, rms_norm_eps=config.rms_norm_eps,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings, attn_implementation="eager")
    model = LlamaForCausalLM(hf_config).eval()
    # Random norm scales, so that a swapped or missing norm weight changes the logits.
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if name.endswith("norm.weight"):
                tensor.uniform_(0.5, 1.5)
    return model


def params_from_torch(model, config: LlamaConfig) -> dict:
    """Copy a transformers Llama state dict into this project's parameter layout."""
    state = {name: tensor.detach().numpy() for name, tensor in model.state_dict().items()}

    def stacked(suffix, transpose):
        arrays = [state[f"model.layers.{i}.{suffix}"] for i in range(config.num_layers)]
        return np.stack([a.T if transpose else a for a in arrays])

    params = {
        "embed": {"embedding": state["model.embed_tokens.weight"]},
        "layers": {
            "input_norm": {"scale": stacked("input_layernorm.weight", False)},
            "attn": {n: {"kernel": stacked(f"self_attn.{n}_proj.weight", True)}
                     for n in ("q", "k", "v", "o")},
            "post_attn_norm": {"scale": stacked("post_attention_layernorm.weight", False)},
            "mlp": {n: {"kernel": stacked(f"mlp.{n}_proj.weight", True)}
                    for n in ("gate", "up", "down")},
        },
        "final_norm": {"scale": state["model.norm.weight"]},
    }
    if not config.tie_word_embeddings:
        params["lm_head"] = {"kernel": state["lm_head.weight"].T}
    return params


def random_ids(shape, vocab_size, seed=0):
    return np.random.default_rng(seed).integers(3, vocab_size, size=shape).astype(np.int32)


def tiny_params(config=TINY, lora=None, seed=0):
    model = Llama(config, lora=lora)
    return model, model.init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))["params"]


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_tiny_matches_torch(torch_available, tied):
    torch = torch_available
    config = dataclasses.replace(TINY, tie_word_embeddings=tied)
    reference = torch_llama(config)
    params = params_from_torch(reference, config)
    ids_BxL = random_ids((2, 11), config.vocab_size)

    logits_BxLxV = Llama(config).apply({"params": params}, jnp.asarray(ids_BxL)).logits_BxLxV
    with torch.no_grad():
        expected_BxLxV = reference(torch.from_numpy(ids_BxL).long()).logits.numpy()

    assert logits_BxLxV.dtype == jnp.float32
    assert logits_BxLxV.shape == expected_BxLxV.shape
    np.testing.assert_allclose(np.asarray(logits_BxLxV), expected_BxLxV, atol=1e-4, rtol=0)


def test_param_layout_matches_contract():
    lora = LoraConfig(rank=4, targets=("q", "v", "down"))
    config = dataclasses.replace(TINY, tie_word_embeddings=False)
    _, params = tiny_params(config, lora=lora)
    shapes = jax.tree.map(lambda x: x.shape, params)
    N, D, I, V = config.num_layers, config.hidden_size, config.intermediate_size, config.vocab_size
    Hd, KVd = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim

    assert shapes["embed"] == {"embedding": (V, D)}
    assert shapes["final_norm"] == {"scale": (D,)}
    assert shapes["lm_head"] == {"kernel": (D, V)}
    assert shapes["layers"]["input_norm"] == {"scale": (N, D)}
    assert shapes["layers"]["post_attn_norm"] == {"scale": (N, D)}
    assert shapes["layers"]["attn"]["q"] == {"kernel": (N, D, Hd), "lora_a": (N, D, 4),
                                              "lora_b": (N, 4, Hd)}
    assert shapes["layers"]["attn"]["k"] == {"kernel": (N, D, KVd)}
    assert shapes["layers"]["attn"]["v"] == {"kernel": (N, D, KVd), "lora_a": (N, D, 4),
                                              "lora_b": (N, 4, KVd)}
    assert shapes["layers"]["attn"]["o"] == {"kernel": (N, Hd, D)}
    assert shapes["layers"]["mlp"]["gate"] == {"kernel": (N, D, I)}
    assert shapes["layers"]["mlp"]["up"] == {"kernel": (N, D, I)}
    assert shapes["layers"]["mlp"]["down"] == {"kernel": (N, I, D), "lora_a": (N, I, 4),
                                                "lora_b": (N, 4, D)}
    assert set(params) == {"embed", "layers", "final_norm", "lm_head"}


def test_tied_model_has_no_lm_head():
    _, params = tiny_params(TINY)
    assert "lm_head" not in params


def test_lora_starts_as_identity_and_trains():
    lora = LoraConfig(rank=4, alpha=8.0, targets=("q", "k", "v", "o", "gate", "up", "down"))
    model, params = tiny_params(TINY, lora=lora)
    base_params = jax.tree_util.tree_map_with_path(
        lambda path, x: x, params,
        is_leaf=lambda x: isinstance(x, dict) and "lora_a" in x)
    ids_BxL = jnp.asarray(random_ids((2, 6), TINY.vocab_size))

    def strip_lora(tree):
        if isinstance(tree, dict):
            return {k: strip_lora(v) for k, v in tree.items() if k not in ("lora_a", "lora_b")}
        return tree

    base_logits = Llama(TINY).apply({"params": strip_lora(base_params)}, ids_BxL).logits_BxLxV
    lora_logits = model.apply({"params": params}, ids_BxL).logits_BxLxV
    np.testing.assert_allclose(np.asarray(lora_logits), np.asarray(base_logits), atol=1e-6)

    grads = jax.grad(lambda p: model.apply({"params": p}, ids_BxL).logits_BxLxV.std())(params)
    assert float(jnp.abs(grads["layers"]["attn"]["q"]["lora_b"]).max()) > 0
    # lora_a gets zero gradient at init because lora_b is zero.
    assert float(jnp.abs(grads["layers"]["attn"]["q"]["lora_a"]).max()) == 0

    bumped = jax.tree.map(lambda x: x, params)
    bumped["layers"]["mlp"]["down"]["lora_b"] = jnp.ones_like(
        params["layers"]["mlp"]["down"]["lora_b"])
    bumped_logits = model.apply({"params": bumped}, ids_BxL).logits_BxLxV
    assert float(jnp.abs(bumped_logits - lora_logits).max()) > 1e-3


def test_lora_scale_is_alpha_over_rank():
    lora = LoraConfig(rank=2, alpha=6.0, targets=("o",))
    model, params = tiny_params(TINY, lora=lora)
    rng = np.random.default_rng(1)
    o = params["layers"]["attn"]["o"]
    o["lora_b"] = jnp.asarray(rng.normal(size=o["lora_b"].shape).astype(np.float32))
    merged = jax.tree.map(lambda x: x, params)
    delta = jnp.einsum("nir,nro->nio", o["lora_a"], o["lora_b"]) * 3.0
    merged["layers"]["attn"]["o"] = {"kernel": o["kernel"] + delta}
    ids_BxL = jnp.asarray(random_ids((1, 5), TINY.vocab_size))

    lora_logits = model.apply({"params": params}, ids_BxL).logits_BxLxV
    merged_logits = Llama(TINY).apply({"params": merged}, ids_BxL).logits_BxLxV
    np.testing.assert_allclose(np.asarray(lora_logits), np.asarray(merged_logits), atol=1e-4)


def test_inputs_embeds_equal_input_ids():
    model, params = tiny_params()
    ids_BxL = jnp.asarray(random_ids((2, 7), TINY.vocab_size))
    embeds_BxLxD = model.apply({"params": params}, ids_BxL, method="embed")
    from_ids = model.apply({"params": params}, ids_BxL)
    from_embeds = model.apply({"params": params}, inputs_embeds_BxLxD=embeds_BxLxD)

    assert embeds_BxLxD.shape == (2, 7, TINY.hidden_size)
    np.testing.assert_array_equal(np.asarray(from_ids.logits_BxLxV),
                                  np.asarray(from_embeds.logits_BxLxV))
    assert from_ids.hidden_BxLxD.shape == (2, 7, TINY.hidden_size)
    assert from_ids.cache is None


def test_ids_and_embeds_together_rejected():
    model, params = tiny_params()
    ids_BxL = jnp.zeros((1, 3), jnp.int32)
    embeds_BxLxD = jnp.zeros((1, 3, TINY.hidden_size))
    with pytest.raises(ValueError, match="exactly one of input_ids_BxL or inputs_embeds_BxLxD"):
        model.apply({"params": params}, ids_BxL, inputs_embeds_BxLxD=embeds_BxLxD)
    with pytest.raises(ValueError, match="exactly one"):
        model.apply({"params": params})


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_matches_unpadded(side):
    model, params = tiny_params()
    lengths = [4, 9, 6]
    total = max(lengths) + 2
    prompts = [random_ids((n,), TINY.vocab_size, seed=n) for n in lengths]
    ids_BxL = np.zeros((len(prompts), total), np.int32)
    mask_BxL = np.zeros((len(prompts), total), np.int32)
    for row, prompt in enumerate(prompts):
        span = slice(total - len(prompt), total) if side == "left" else slice(0, len(prompt))
        ids_BxL[row, span] = prompt
        mask_BxL[row, span] = 1

    padded = model.apply({"params": params}, jnp.asarray(ids_BxL),
                         attention_mask_BxL=jnp.asarray(mask_BxL)).logits_BxLxV
    assert not np.isnan(np.asarray(padded)).any()
    for row, prompt in enumerate(prompts):
        alone = model.apply({"params": params}, jnp.asarray(prompt)[None]).logits_BxLxV[0]
        real = np.asarray(padded[row])[mask_BxL[row].astype(bool)]
        np.testing.assert_allclose(real, np.asarray(alone), atol=1e-5, err_msg=f"row {row}")


def test_all_padding_row_is_finite():
    model, params = tiny_params()
    ids_BxL = jnp.zeros((2, 5), jnp.int32)
    mask_BxL = jnp.asarray([[0, 0, 0, 0, 0], [0, 0, 1, 1, 1]])
    logits = model.apply({"params": params}, ids_BxL, attention_mask_BxL=mask_BxL).logits_BxLxV
    assert np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize("cache_is_empty", [False, True])
def test_cache_prefill_then_decode_matches_full(cache_is_empty):
    # cache_is_empty=True skips attention over the empty slots; the result must not change.
    model, params = tiny_params()
    prompt_len, steps = 8, 5
    ids_BxL = random_ids((2, prompt_len + steps), TINY.vocab_size)
    mask_BxL = np.ones_like(ids_BxL)
    mask_BxL[1, :3] = 0  # row 1 is left-padded by 3 tokens
    full = model.apply({"params": params}, jnp.asarray(ids_BxL),
                       attention_mask_BxL=jnp.asarray(mask_BxL)).logits_BxLxV

    cache = init_cache(TINY, 2, prompt_len + steps + 3)
    out = model.apply({"params": params}, jnp.asarray(ids_BxL[:, :prompt_len]),
                      attention_mask_BxL=jnp.asarray(mask_BxL[:, :prompt_len]), cache=cache,
                      cache_is_empty=cache_is_empty)
    np.testing.assert_allclose(np.asarray(out.logits_BxLxV)[0], np.asarray(full)[0, :prompt_len],
                               atol=1e-5)
    # Row 1's real tokens match too (its padded positions are never read).
    np.testing.assert_allclose(np.asarray(out.logits_BxLxV)[1, 3:],
                               np.asarray(full)[1, 3:prompt_len], atol=1e-5)
    for step in range(steps):
        position = prompt_len + step
        out = model.apply({"params": params}, jnp.asarray(ids_BxL[:, position:position + 1]),
                          cache=out.cache)
        np.testing.assert_allclose(np.asarray(out.logits_BxLxV)[:, 0],
                                   np.asarray(full)[:, position], atol=1e-5,
                                   err_msg=f"decode step {step}")
    assert int(out.cache["index"]) == prompt_len + steps


def test_remat_gives_same_values_and_grads():
    _, params = tiny_params()
    ids_BxL = jnp.asarray(random_ids((2, 6), TINY.vocab_size))

    def loss(model, p):
        return model.apply({"params": p}, ids_BxL).logits_BxLxV.std()

    plain_loss, plain_grads = jax.value_and_grad(lambda p: loss(Llama(TINY), p))(params)
    remat_loss, remat_grads = jax.value_and_grad(lambda p: loss(Llama(TINY, remat=True), p))(params)
    np.testing.assert_allclose(float(remat_loss), float(plain_loss), rtol=1e-6)
    for plain, remat in zip(jax.tree.leaves(plain_grads), jax.tree.leaves(remat_grads)):
        np.testing.assert_allclose(np.asarray(remat), np.asarray(plain), atol=1e-6)


def test_unrolled_layers_give_same_values_and_grads():
    lora = LoraConfig(rank=4, targets=("q", "v"))
    _, params = tiny_params(lora=lora)
    ids_BxL = jnp.asarray(random_ids((2, 6), TINY.vocab_size))

    def loss(model, p):
        return model.apply({"params": p}, ids_BxL).logits_BxLxV.std()

    looped = Llama(TINY, lora=lora)
    unrolled = Llama(TINY, lora=lora, scan_layers=False)
    assert (jax.tree.map(jnp.shape, unrolled.init(jax.random.PRNGKey(0), ids_BxL))
            == jax.tree.map(jnp.shape, looped.init(jax.random.PRNGKey(0), ids_BxL)))
    looped_loss, looped_grads = jax.value_and_grad(lambda p: loss(looped, p))(params)
    unrolled_loss, unrolled_grads = jax.value_and_grad(lambda p: loss(unrolled, p))(params)
    np.testing.assert_allclose(float(unrolled_loss), float(looped_loss), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(looped_grads), jax.tree.leaves(unrolled_grads)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6)


def test_scan_layers_option_is_validated_and_not_recorded():
    from ckt_jax import config_files, docs, stages

    config = config_files.load_module(docs.CONFIG_PATH).get_config()
    assert config.train.scan_layers is False
    assert stages._model_kwargs(config.train)["scan_layers"] is False
    record = stages._distill_record(config)
    # Looped and unrolled layers compute the same numbers, so a run may resume with either.
    config.train.scan_layers = True
    stages.validate_config(config)
    assert stages._distill_record(config) == record
    # The main config types the field as a bool; a config file may still give another type.
    del config.train["scan_layers"]
    config.train.scan_layers = "no"
    with pytest.raises(ValueError, match=r"config.train.scan_layers='no' is not a bool"):
        stages.validate_config(config)


@pytest.mark.parametrize("spec, shapes", [
    ("abz,zy->aby", ((2, 3, 8), (8, 5))),           # a projection
    ("bld,vd->blv", ((2, 3, 8), (7, 8))),           # the tied output projection
    ("blkge,bmke->bkglm", ((2, 3, 2, 2, 4), (2, 5, 2, 4))),  # attention scores
    ("bkglm,bmke->blkge", ((2, 2, 2, 3, 5), (2, 5, 2, 4))),  # attention-weighted values
])
def test_matmul_gradients_in_bfloat16(spec, shapes):
    rng = np.random.default_rng(0)
    a, b = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in shapes)
    out_shape = jax.eval_shape(lambda: jnp.einsum(spec, a, b)).shape
    weights = jnp.asarray(rng.standard_normal(out_shape), jnp.float32)

    def loss(fn, a, b):
        return jnp.sum(weights * fn(a, b))

    # Reference: NumPy einsum of the operands rounded to bfloat16, in float64, and its gradients
    # (cotangents rounded to bfloat16, as the backward products take them).
    def rounded(x):
        return np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32), np.float64)

    inputs, out = spec.split("->")
    a_spec, b_spec = inputs.split(",")
    expected = np.einsum(spec, rounded(a), rounded(b))
    w = rounded(weights)
    expected_grad_a = np.einsum(f"{out},{b_spec}->{a_spec}", w, rounded(b))
    expected_grad_b = np.einsum(f"{a_spec},{out}->{b_spec}", rounded(a), w)

    def low(x, y):
        return model_lib.matmul(spec, x, y, jnp.bfloat16)

    value = low(a, b)
    assert value.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(value), expected, rtol=1e-5, atol=1e-5)
    grad_a, grad_b = jax.grad(lambda x, y: loss(low, x, y), argnums=(0, 1))(a, b)
    assert grad_a.dtype == grad_b.dtype == jnp.float32
    # The gradients are rounded to bfloat16 once, after float32 accumulation.
    np.testing.assert_allclose(np.asarray(grad_a), expected_grad_a, rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(np.asarray(grad_b), expected_grad_b, rtol=1e-2, atol=1e-2)
    # In float32 the values and gradients are those of a plain einsum.
    full = lambda x, y: model_lib.matmul(spec, x, y, jnp.float32)  # noqa: E731
    plain = lambda x, y: jnp.einsum(spec, x, y)  # noqa: E731
    for got, want in zip(jax.grad(lambda x, y: loss(full, x, y), argnums=(0, 1))(a, b),
                         jax.grad(lambda x, y: loss(plain, x, y), argnums=(0, 1))(a, b)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_bfloat16_products_reach_the_bfloat16_kernels():
    """After XLA's passes, both products of a bfloat16 projection and its input gradient still
    take bfloat16 operands.

    XLA's CPU backend converts a bfloat16 product's operands to float32 when its result is
    bfloat16 or when its operands' types differ. The model's products must avoid both, or
    bfloat16 compute gets no faster than float32.
    """
    x = jnp.ones((4, 8, 16), jnp.float32)
    w = jnp.ones((16, 32), jnp.float32)

    def loss(x):
        product = model_lib.matmul("abz,zy->aby", x, jax.lax.stop_gradient(w), jnp.bfloat16)
        return jnp.sum(product.astype(jnp.bfloat16).astype(jnp.float32) ** 2)

    hlo = jax.jit(jax.grad(loss)).lower(x).compile().as_text()
    operand_types = []
    for computation in hlo.split("\n\n"):
        types = dict(re.findall(r"^\s*(?:ROOT )?(%\S+) = (\w+)\[", computation, re.MULTILINE))
        for operands in re.findall(r" dot\(([^)]*)\)", computation):
            operand_types.append([types[name] for name in operands.split(", ")])
    assert operand_types == [["bf16", "bf16"]] * 2


def test_lora_weight_gradients_copy_no_cotangent():
    """A float32 LoRA projection's backward pass copies no array the size of its output.

    Differentiating the einsum directly made XLA's CPU backend transpose the output's
    cotangent for the weight gradient of `lora_b`, a copy that cost more than the layer's
    products on the 8 x 192 x 1536 MLP activations of the CPU config.
    """
    projection = model_lib.Projection(features=96, lora=LoraConfig(rank=4, targets=("up",)),
                                      dtype=jnp.float32, param_dtype=jnp.float32)
    x = jnp.ones((4, 48, 64), jnp.float32)
    params = projection.init(jax.random.PRNGKey(0), x)["params"]

    def loss(adapters):
        out = projection.apply({"params": {"kernel": params["kernel"], **adapters}}, x)
        return jnp.sum(jnp.sin(out))

    adapters = {"lora_a": params["lora_a"], "lora_b": params["lora_b"] + 0.1}
    hlo = jax.jit(jax.grad(loss)).lower(adapters).compile().as_text()
    cotangent_size = 4 * 48 * 96
    copied = [line for line in hlo.splitlines()
              if re.search(r" (copy|transpose)\(", line)
              and np.prod([int(d) for d in re.search(r"= \w+\[([\d,]*)\]", line).group(1)
                           .split(",") if d]) == cotangent_size]
    assert copied == []


def test_bfloat16_compute_keeps_float32_logits():
    model, params = tiny_params()
    ids_BxL = jnp.asarray(random_ids((1, 6), TINY.vocab_size))
    full = model.apply({"params": params}, ids_BxL).logits_BxLxV
    half = Llama(TINY, dtype=jnp.bfloat16).apply({"params": params}, ids_BxL).logits_BxLxV
    assert half.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(half), np.asarray(full), atol=0.1)


@pytest.mark.parametrize("changes, message", [
    (dict(num_kv_heads=3), "not a multiple of num_kv_heads=3"),
    (dict(head_dim=15), "head_dim=15 is odd"),
    (dict(num_layers=0), "num_layers must be a positive int"),
    (dict(rope_theta=0.0), "rope_theta must be > 0"),
])
def test_config_validation(changes, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(TINY, **changes)


@pytest.mark.parametrize("kwargs, message", [
    (dict(targets=("q", "proj")), "unknown names \\['proj'\\]"),
    (dict(targets=()), "targets is empty"),
    (dict(targets="q"), "got the string 'q'"),
    (dict(rank=0), "rank must be a positive int"),
    (dict(targets=("q", "q")), "duplicates"),
])
def test_lora_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(**kwargs)


# --------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct GGUF


@pytest.fixture(scope="module")
def chat_prompt_ids(smollm2_tokenizer):
    ids, _ = smollm2_tokenizer.encode_chat("Can you suggest a healthy breakfast?",
                                           reply="Oatmeal with fresh berries and nuts.")
    return np.asarray(ids, np.int32)


@pytest.mark.real
def test_smollm2_matches_torch(smollm2_flax, smollm2_torch, chat_prompt_ids):
    import torch

    config, params = smollm2_flax
    logits_LxV = np.asarray(Llama(config).apply(
        {"params": params}, jnp.asarray(chat_prompt_ids)[None]).logits_BxLxV[0])
    with torch.no_grad():
        expected_LxV = smollm2_torch(torch.from_numpy(chat_prompt_ids).long()[None]).logits[0]
    expected_LxV = expected_LxV.numpy()

    max_difference = float(np.abs(logits_LxV - expected_LxV).max())
    print(f"SmolLM2 Flax vs PyTorch: max |logit difference| {max_difference:.2e} over "
          f"{logits_LxV.shape[0]} positions")
    assert max_difference <= 1e-3
    np.testing.assert_array_equal(logits_LxV.argmax(-1), expected_LxV.argmax(-1))


@pytest.mark.real
def test_smollm2_left_padding_matches(smollm2_flax, chat_prompt_ids):
    config, params = smollm2_flax
    model = Llama(config)
    pad = 7
    short = chat_prompt_ids[:-pad]
    ids_BxL = np.stack([chat_prompt_ids, np.concatenate([np.full(pad, 2, np.int32), short])])
    mask_BxL = np.ones_like(ids_BxL)
    mask_BxL[1, :pad] = 0

    padded = np.asarray(model.apply({"params": params}, jnp.asarray(ids_BxL),
                                    attention_mask_BxL=jnp.asarray(mask_BxL)).logits_BxLxV)
    alone = np.asarray(model.apply({"params": params}, jnp.asarray(short)[None]).logits_BxLxV[0])
    np.testing.assert_allclose(padded[1, pad:], alone, atol=1e-3)
    np.testing.assert_array_equal(padded[1, pad:].argmax(-1), alone.argmax(-1))
    assert not np.isnan(padded).any()
