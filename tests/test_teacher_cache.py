"""The teacher cache: the kd term from stored top-k values against the live teacher."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ckt_jax import batching, lora, stages, teacher_cache
from ckt_jax.model import Llama, LlamaConfig, LoraConfig
from ckt_jax.objective import ObjectiveConfig, build_objective

TINY = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=10000.0)
LORA = LoraConfig(rank=4, alpha=8.0, targets=("q", "v"))
MAX_TARGETS = 6
TEMPERATURE = 2.0


@pytest.fixture(scope="module")
def setup():
    student = Llama(TINY, lora=LORA)
    teacher = Llama(TINY)
    dummy = jnp.zeros((1, 8), jnp.int32)
    full = student.init(jax.random.PRNGKey(0), dummy)["params"]
    adapters, backbone = lora.split_params(full)
    adapters = jax.tree_util.tree_map(lambda x: x + 0.05, adapters)
    teacher_params = teacher.init(jax.random.PRNGKey(1), dummy)["params"]
    rng = np.random.default_rng(0)
    examples = []
    for i in range(12):
        length = int(rng.integers(10, 24))
        ids = tuple(int(t) for t in rng.integers(3, TINY.vocab_size, size=length))
        # Replies of 4 to 10 tokens, so some rows have fewer scored positions than MAX_TARGETS.
        reply = int(rng.integers(4, 11))
        mask = tuple([0] * (length - reply) + [1] * reply)
        examples.append(batching.Example(ids, mask, "harmful" if i % 2 else "benign", f"ex{i}"))
    return dict(student=student, teacher=teacher, adapters=adapters, backbone=backbone,
                teacher_params=teacher_params, examples=examples)


def build_cache(setup, directory, top_k, needed=None, reference=True):
    settings = teacher_cache.CacheSettings(top_k=top_k, temperature=TEMPERATURE,
                                           max_target_tokens=MAX_TARGETS, batch_size=4)
    fingerprint = teacher_cache.cache_fingerprint(
        teacher_params=setup["teacher_params"], teacher=setup["teacher"],
        examples_fingerprint=batching.examples_fingerprint(setup["examples"]), settings=settings)
    ref = (Llama(TINY), setup["backbone"]) if reference else None
    cache = teacher_cache.load_or_build(
        directory, fingerprint, setup["examples"], needed or setup["examples"], settings,
        setup["teacher"], setup["teacher_params"], pad_id=0, reference=ref)
    return cache, fingerprint


def cached_batch(setup, cache, rows=range(8)):
    examples = [setup["examples"][i] for i in rows]
    batch = batching.pad_batch(examples, pad_id=0, pad_multiple=8, max_seq_len=32)
    batch.update(cache.batch_fields(examples, batch["input_ids"].shape[1]))
    return batch


def kd_loss(setup, batch, top_k):
    objective = ObjectiveConfig(kd_weight=1.0, temperature=TEMPERATURE,
                                max_target_tokens=MAX_TARGETS, cached_teacher_top_k=top_k,
                                opening_tokens=2, opening_weight=3.0)
    loss_fn = build_objective(setup["student"], setup["teacher"], objective)
    frozen = {"backbone": setup["backbone"], "teacher": setup["teacher_params"]}

    def loss(adapters):
        return loss_fn(adapters, frozen, batch, jax.random.PRNGKey(0))

    (value, aux), grads = jax.value_and_grad(loss, has_aux=True)(setup["adapters"])
    return float(aux["loss/kd"]), grads


def test_cached_kd_equals_dense_at_full_vocabulary(setup, tmp_path):
    cache, _ = build_cache(setup, tmp_path / "cache", top_k=TINY.vocab_size)
    batch = cached_batch(setup, cache)
    dense, dense_grads = kd_loss(setup, batch, top_k=0)
    cached, cached_grads = kd_loss(setup, batch, top_k=TINY.vocab_size)
    np.testing.assert_allclose(cached, dense, rtol=1e-5)
    for want, got in zip(jax.tree_util.tree_leaves(dense_grads),
                         jax.tree_util.tree_leaves(cached_grads)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-6)


def test_cached_kd_approximates_dense_for_small_k(setup, tmp_path):
    batch_dense = cached_batch(setup, build_cache(setup, tmp_path / "full", TINY.vocab_size)[0])
    dense, _ = kd_loss(setup, batch_dense, top_k=0)
    previous = 0.0
    for k in (1, 8, 48):
        cache, _ = build_cache(setup, tmp_path / f"k{k}", top_k=k, reference=False)
        value, _ = kd_loss(setup, cached_batch(setup, cache), top_k=k)
        # The bucket form is a lower bound on the dense KL that tightens as k grows.
        assert value <= dense + 1e-6, k
        assert value >= previous - 1e-6, k
        previous = value
    # A random teacher at T=2 is close to uniform, the worst case for a top-k cache: 48 of 61
    # tokens still leave about 13% of the KL in the lumped remainder.
    assert previous > 0.8 * dense


def test_kl_error_report(setup, tmp_path):
    teacher_logits = np.random.default_rng(1).normal(size=(2, 5, 61)).astype(np.float32) * 3
    student_logits = np.random.default_rng(2).normal(size=(2, 5, 61)).astype(np.float32) * 3
    mask = np.ones((2, 5), np.float32)
    mask[1, 3:] = 0
    full = teacher_cache.top_k_kl_error(student_logits, teacher_logits, mask, 61, TEMPERATURE)
    assert full["tokens"] == 8
    assert full["kd_abs_error"] < 1e-5
    assert full["per_token_abs_error_max"] < 1e-5
    small = teacher_cache.top_k_kl_error(student_logits, teacher_logits, mask, 3, TEMPERATURE)
    np.testing.assert_allclose(small["kd_dense"], full["kd_dense"], rtol=1e-6)
    assert small["kd_top_k"] < small["kd_dense"]
    np.testing.assert_allclose(small["kd_abs_error"], small["kd_dense"] - small["kd_top_k"],
                               rtol=1e-5)
    assert small["per_token_abs_error_max"] >= small["per_token_abs_error_mean"] > 0

    # The error measured at build time is stored next to the cache.
    build_cache(setup, tmp_path / "cache", top_k=4)
    manifest = json.loads((tmp_path / "cache" / teacher_cache.MANIFEST).read_text())
    assert manifest["top_k"] == 4
    assert manifest["kl_error"]["tokens"] > 0
    assert manifest["kl_error"]["kd_top_k"] <= manifest["kl_error"]["kd_dense"] + 1e-6


def test_cache_reused_and_extended(setup, tmp_path, monkeypatch):
    directory = tmp_path / "cache"
    first, fingerprint = build_cache(setup, directory, top_k=4, needed=setup["examples"][:5])
    assert len(list(directory.glob("shard-*.npz"))) == 1
    expected = cached_batch(setup, first, rows=range(5))

    scored = []
    original = teacher_cache._score_examples
    monkeypatch.setattr(teacher_cache, "_score_examples",
                        lambda cache, missing, *args: scored.append(missing)
                        or original(cache, missing, *args))
    again, _ = build_cache(setup, directory, top_k=4, needed=setup["examples"][:5])
    assert scored == []
    reread = cached_batch(setup, again, rows=range(5))
    for field in teacher_cache.BATCH_FIELDS:
        np.testing.assert_array_equal(reread[field], expected[field])

    more, _ = build_cache(setup, directory, top_k=4, needed=setup["examples"])
    assert scored == [list(range(5, 12))]
    assert len(list(directory.glob("shard-*.npz"))) == 2
    cached_batch(setup, more, rows=range(12))


def test_stale_or_damaged_cache_rejected(setup, tmp_path):
    directory = tmp_path / "cache"
    _, fingerprint = build_cache(setup, directory, top_k=4)
    settings = teacher_cache.CacheSettings(top_k=4, temperature=TEMPERATURE,
                                           max_target_tokens=MAX_TARGETS)
    other_teacher = jax.tree_util.tree_map(lambda x: x * 1.01, setup["teacher_params"])
    other = teacher_cache.cache_fingerprint(
        teacher_params=other_teacher, teacher=setup["teacher"],
        examples_fingerprint=batching.examples_fingerprint(setup["examples"]), settings=settings)
    assert other != fingerprint
    with pytest.raises(ValueError, match="another teacher or data set; delete"):
        teacher_cache.load_or_build(directory, other, setup["examples"], setup["examples"],
                                    settings, setup["teacher"], other_teacher, pad_id=0)

    shard = next(directory.glob("shard-*.npz"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ValueError, match="is unreadable"):
        build_cache(setup, directory, top_k=4)


def test_fingerprint_covers_settings(setup):
    base = dict(top_k=4, temperature=TEMPERATURE, max_target_tokens=MAX_TARGETS)
    digest = batching.examples_fingerprint(setup["examples"])

    def fingerprint(examples_digest=digest, **changes):
        settings = teacher_cache.CacheSettings(**{**base, **changes})
        return teacher_cache.cache_fingerprint(teacher_params=setup["teacher_params"],
                                               teacher=setup["teacher"],
                                               examples_fingerprint=examples_digest,
                                               settings=settings)

    reference = fingerprint()
    assert fingerprint(batch_size=2) == reference
    for changes in ({"top_k": 5}, {"temperature": 1.0}, {"max_target_tokens": 7},
                    {"examples_digest": "0" * 64}):
        assert fingerprint(**changes) != reference, changes


def test_batch_fields_for_uncached_example(setup, tmp_path):
    cache, _ = build_cache(setup, tmp_path / "cache", top_k=4, needed=setup["examples"][:2])
    fields = cache.batch_fields(setup["examples"][:2], length=32)
    assert fields["teacher_top_k_indices"].shape == (2, MAX_TARGETS, 4)
    assert np.all(fields["teacher_top_k_indices"] < TINY.vocab_size)
    with pytest.raises(KeyError, match="'ex2' is not in the teacher cache"):
        cache.batch_fields(setup["examples"][2:4], length=32)


def test_cache_settings_in_record_only_when_enabled():
    from ckt_jax import config_files, docs

    config = config_files.load_module(docs.CONFIG_PATH).get_config()
    record = stages._distill_record(config)
    assert "teacher_cache" not in record["distill"]
    config.distill.teacher_cache.top_k = 8
    assert stages._distill_record(config) == record

    config.distill.teacher_cache.enabled = True
    stages.validate_config(config)
    assert stages._distill_record(config)["distill"]["teacher_cache"] == {"enabled": True,
                                                                          "top_k": 8}
    assert stages.distill_objective(config).cached_teacher_top_k == 8

    config.distill.divergence = "reverse_kl"
    with pytest.raises(ValueError, match="config.distill.divergence='reverse_kl' cannot"):
        stages.validate_config(config)
    config.distill.divergence = "forward_kl"
    config.distill.teacher_cache.top_k = 0
    with pytest.raises(ValueError, match=r"config.distill.teacher_cache.top_k=0 must be >= 1"):
        stages.validate_config(config)


def test_cached_training_resumes_exactly(setup, tmp_path):
    from ckt_jax import checkpoint, sharding, trainer

    cache, fingerprint = build_cache(setup, tmp_path / "cache", top_k=8, reference=False)
    objective = ObjectiveConfig(kd_weight=1.0, temperature=TEMPERATURE,
                                max_target_tokens=MAX_TARGETS, cached_teacher_top_k=8)
    assert not objective.needs_teacher
    loss_fn = build_objective(setup["student"], None, objective)
    optimizer = lora.make_adapter_optimizer(1e-2)
    # NumPy copies, because the train step donates the adapter buffers it is given.
    adapters = jax.tree_util.tree_map(np.asarray, setup["adapters"])
    options = checkpoint.CheckpointOptions(every_steps=2, keep_last=2, keep_best=0,
                                           async_save=False)

    def run(steps, checkpoint_dir):
        batches = batching.BatchStream(setup["examples"], 4, 0.5, seed=3, pad_id=0,
                                       max_seq_len=32, pad_multiple=8)
        batches.batch_fields = cache.batch_fields
        return trainer.run_training(
            name="cached", loss_fn=loss_fn, optimizer=optimizer,
            adapter_params=adapters, frozen_params={"backbone": setup["backbone"]},
            batches=batches, batch_size=4, num_steps=steps, rng=jax.random.PRNGKey(5),
            mesh=sharding.make_mesh(), checkpoint_dir=checkpoint_dir, checkpoint_options=options,
            identity={"teacher_cache": fingerprint})

    _, reference = run(4, tmp_path / "uninterrupted")
    run(2, tmp_path / "resumed")
    _, resumed = run(4, tmp_path / "resumed")
    assert [row["step"] for row in resumed] == [1, 2, 3, 4]
    for row, ref_row in zip(resumed[2:], reference[2:]):
        assert row["loss/kd"] == ref_row["loss/kd"], row["step"]
        assert row["loss"] == ref_row["loss"], row["step"]

    # A checkpoint made with another cache is not restored.
    with pytest.raises(checkpoint.CheckpointMismatchError, match="teacher_cache"):
        run_identity = {"teacher_cache": "0" * 64}
        batches = batching.BatchStream(setup["examples"], 4, 0.5, seed=3, pad_id=0,
                                       max_seq_len=32, pad_multiple=8)
        batches.batch_fields = cache.batch_fields
        trainer.run_training(
            name="cached", loss_fn=loss_fn, optimizer=optimizer,
            adapter_params=adapters, frozen_params={"backbone": setup["backbone"]},
            batches=batches, batch_size=4, num_steps=4, rng=jax.random.PRNGKey(5),
            mesh=sharding.make_mesh(), checkpoint_dir=tmp_path / "resumed",
            checkpoint_options=options, identity=run_identity)
