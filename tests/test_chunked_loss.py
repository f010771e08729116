"""The chunked vocabulary-side loss equals the unchunked one, in value and gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ckt_jax import losses, lora, stages
from ckt_jax.model import Llama, LlamaConfig, LoraConfig
from ckt_jax.objective import TEACHER_CACHE_FIELDS, ObjectiveConfig, build_objective

TINY = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=10000.0)
LORA = LoraConfig(rank=4, alpha=8.0, targets=("q", "v"))


def test_chunked_map_matches_direct():
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(3, 7, 5)), jnp.float32)
    other = jnp.asarray(rng.normal(size=(3, 7, 5)), jnp.float32)
    weight = jnp.asarray(rng.normal(size=(5, 11)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 11, size=(3, 7)), jnp.int32)
    project = {"a": lambda h: h @ weight, "b": lambda h: 2.0 * h @ weight}

    def fn(logits, extras):
        log_probs = jax.nn.log_softmax(logits["a"], axis=-1)
        nll = -jnp.take_along_axis(log_probs, extras["targets"][..., None], axis=-1)[..., 0]
        return nll + losses.forward_kl(logits["a"], logits["b"])

    def direct(h, o):
        return fn({"a": project["a"](h), "b": project["b"](o)}, {"targets": targets})

    for chunk in (1, 3, 7, 10):
        def chunked(h, o):
            return losses.chunked_vocab_map(fn, project, {"a": h, "b": o}, {"targets": targets},
                                            chunk)

        got = chunked(hidden, other)
        assert got.shape == (3, 7)
        np.testing.assert_allclose(np.asarray(got), np.asarray(direct(hidden, other)),
                                   rtol=1e-5, atol=1e-6, err_msg=f"chunk {chunk}")
        got_grads = jax.grad(lambda h, o: jnp.sum(chunked(h, o)), argnums=(0, 1))(hidden, other)
        want_grads = jax.grad(lambda h, o: jnp.sum(direct(h, o)), argnums=(0, 1))(hidden, other)
        for got_grad, want_grad in zip(got_grads, want_grads):
            np.testing.assert_allclose(np.asarray(got_grad), np.asarray(want_grad), rtol=1e-5,
                                       atol=1e-6, err_msg=f"chunk {chunk}")


def test_chunked_map_rejects_bad_arguments():
    hidden = {"a": jnp.zeros((2, 4, 3))}
    project = {"a": lambda h: h}
    with pytest.raises(ValueError, match="chunk_size=0 must be >= 1"):
        losses.chunked_vocab_map(lambda l, e: l["a"][..., 0], project, hidden, {}, 0)
    with pytest.raises(ValueError, match="leading B x K shapes"):
        losses.chunked_vocab_map(lambda l, e: l["a"][..., 0], project, hidden,
                                 {"ids": jnp.zeros((2, 5), jnp.int32)}, 2)


@pytest.fixture(scope="module")
def setup():
    student = Llama(TINY, lora=LORA)
    dummy = jnp.zeros((1, 8), jnp.int32)
    full = student.init(jax.random.PRNGKey(0), dummy)["params"]
    adapters, backbone = lora.split_params(full)
    adapters = jax.tree_util.tree_map(lambda x: x + 0.05, adapters)
    teacher_params = Llama(TINY).init(jax.random.PRNGKey(1), dummy)["params"]

    rng = np.random.default_rng(0)
    batch, length = 4, 16
    attention = np.ones((batch, length), np.int32)
    attention[0, 12:] = 0
    loss_mask = np.zeros((batch, length), np.int32)
    loss_mask[:, 5:12] = 1
    loss_mask[2, 9:12] = 0   # a row with fewer scored positions
    tokens = {"input_ids": rng.integers(3, TINY.vocab_size, size=(batch, length)).astype(np.int32),
              "attention_mask": attention, "loss_mask": loss_mask,
              "is_harmful": np.asarray([1, 0, 1, 0], np.int32)}
    # Cached teacher fields from random teacher logits at the K = min(max_target_tokens, L)
    # scored slots; the objective reads them in the same slot order.
    slots = 10
    teacher_logits = jnp.asarray(rng.normal(size=(batch, slots, TINY.vocab_size)) * 3, jnp.float32)
    indices, log_probs = losses.teacher_top_k(teacher_logits, 8, 2.0)
    tail = losses.teacher_tail_log_mass(teacher_logits, indices, 2.0)
    cached = dict(zip(TEACHER_CACHE_FIELDS, (indices, log_probs, tail)))
    return dict(student=student, adapters=adapters, teacher_params=teacher_params,
                frozen={"backbone": backbone, "teacher": teacher_params}, batch=tokens,
                cached={**tokens, **cached}, slots=slots)


CASES = {
    "ce_kd_consistency_base_kl": dict(ce_weight=0.5, kd_weight=1.0, consistency_weight=0.5,
                                      consistency_row_stride=2, base_kl_weight=0.3,
                                      l2_weight=1e-3, temperature=2.0, opening_tokens=2,
                                      opening_weight=3.0),
    "jsd_teacher_consistency_adversarial": dict(kd_weight=1.0, divergence="jsd",
                                                consistency_weight=0.5,
                                                consistency_target="teacher",
                                                adversarial_weight=0.5, reduction="sequence"),
    "cached_kd": dict(kd_weight=1.0, ce_weight=0.2, temperature=2.0, cached_teacher_top_k=8),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_chunked_objective_matches_unchunked(setup, case):
    settings = dict(CASES[case], max_target_tokens=setup["slots"])
    batch = setup["cached"] if settings.get("cached_teacher_top_k") else setup["batch"]
    results = {}
    for chunk in (0, 3):
        cfg = ObjectiveConfig(**settings, vocab_chunk_size=chunk)
        loss_fn = build_objective(setup["student"], Llama(TINY), cfg)

        def loss(adapters):
            return loss_fn(adapters, setup["frozen"], batch, jax.random.PRNGKey(3))

        results[chunk] = jax.jit(jax.value_and_grad(loss, has_aux=True))(setup["adapters"])
    (loss_plain, aux_plain), grads_plain = results[0]
    (loss_chunked, aux_chunked), grads_chunked = results[3]
    np.testing.assert_allclose(float(loss_chunked), float(loss_plain), rtol=1e-5, atol=1e-6)
    for name in aux_plain:
        np.testing.assert_allclose(float(aux_chunked[name]), float(aux_plain[name]), rtol=1e-5,
                                   atol=1e-6, err_msg=name)
    for want, got in zip(jax.tree_util.tree_leaves(grads_plain),
                         jax.tree_util.tree_leaves(grads_chunked)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_chunk_size_validated_and_not_recorded():
    from ckt_jax import config_files, docs, studies

    config = config_files.load_module(docs.CONFIG_PATH).get_config()
    record = stages._distill_record(config)
    digest = studies.config_digest(config)
    config.train.vocab_chunk_size = 16
    stages.validate_config(config)
    assert stages.distill_objective(config).vocab_chunk_size == 16
    # Chunks change only memory and speed, so a run may resume with another chunk size.
    assert stages._distill_record(config) == record
    assert studies.config_digest(config) != digest
    config.train.vocab_chunk_size = 0
    assert studies.config_digest(config) == digest

    config.train.vocab_chunk_size = -1
    with pytest.raises(ValueError, match=r"config.train.vocab_chunk_size=-1 is invalid"):
        stages.validate_config(config)
