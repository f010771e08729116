"""Sequence packing: segment-restricted attention, per-segment positions, padding measurements."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ckt_jax import batching, losses
from ckt_jax.model import Llama, LlamaConfig

TINY = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=10000.0)


def make_examples(lengths, seed=0):
    rng = np.random.default_rng(seed)
    examples = []
    for i, length in enumerate(lengths):
        ids = tuple(int(t) for t in rng.integers(3, TINY.vocab_size, size=length))
        mask = tuple([0] * (length // 2) + [1] * (length - length // 2))
        examples.append(batching.Example(ids, mask, "harmful" if i % 2 else "benign", f"ex{i}"))
    return examples


@pytest.fixture(scope="module")
def model_and_params():
    model = Llama(TINY)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    return model, params


def test_packed_logits_match_examples_alone(model_and_params):
    model, params = model_and_params
    examples = make_examples([9, 5, 12, 7, 3])
    batch = batching.pack_batch(examples, pad_id=0, max_seq_len=20)
    assert batch["input_ids"].shape[0] < len(examples)
    packed = model.apply({"params": params}, jnp.asarray(batch["input_ids"]),
                         attention_mask_BxL=jnp.asarray(batch["attention_mask"]),
                         segment_ids_BxL=jnp.asarray(batch["segment_ids"])).logits_BxLxV
    for index, example in enumerate(examples):
        alone = model.apply({"params": params},
                            jnp.asarray([example.input_ids], jnp.int32)).logits_BxLxV[0]
        row, start = batch["example_row"][index], batch["example_start"][index]
        got = packed[row, start:start + len(example.input_ids)]
        np.testing.assert_allclose(np.asarray(got), np.asarray(alone), rtol=1e-5, atol=1e-5,
                                   err_msg=example.prompt_id)


def test_packed_positions_restart_per_segment(model_and_params):
    from ckt_jax.model import segment_positions

    model, params = model_and_params
    ids = jnp.asarray(np.random.default_rng(1).integers(3, 61, size=(1, 10)), jnp.int32)
    segments = jnp.asarray([[1, 1, 1, 1, 2, 2, 2, 3, 3, 0]], jnp.int32)
    mask = jnp.asarray([[1] * 9 + [0]], jnp.int32)
    positions = segment_positions(segments, mask)
    np.testing.assert_array_equal(np.asarray(positions), [[0, 1, 2, 3, 0, 1, 2, 0, 1, 0]])

    def logits(**kwargs):
        return model.apply({"params": params}, ids, attention_mask_BxL=mask,
                           segment_ids_BxL=segments, **kwargs).logits_BxLxV

    # The model uses those positions when none are given.
    np.testing.assert_array_equal(np.asarray(logits()),
                                  np.asarray(logits(positions_BxL=positions)))


def test_segments_reject_cache(model_and_params):
    from ckt_jax.model import init_cache

    model, params = model_and_params
    ids = jnp.ones((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="cannot be combined with a KV cache"):
        model.apply({"params": params}, ids, segment_ids_BxL=jnp.ones((1, 4), jnp.int32),
                    cache=init_cache(TINY, 1, 8))


def test_pack_examples_first_fit_decreasing():
    examples = make_examples([7, 3, 10, 2, 6, 4])
    rows = batching.pack_examples(examples, 12)
    assert sorted(i for row in rows for i in row) == list(range(6))
    for row in rows:
        assert sum(len(examples[i].input_ids) for i in row) <= 12
    # 32 tokens need at least 3 rows of 12; first fit decreasing finds 3.
    assert len(rows) == 3
    assert rows[0][0] == 2
    with pytest.raises(ValueError, match="'ex2' has 10 tokens, more than the packed row "
                                         "length 8; pass a longer"):
        batching.pack_examples(examples, 8)


def test_pack_batch_layout():
    examples = make_examples([7, 3, 10, 2])
    batch = batching.pack_batch(examples, pad_id=0, max_seq_len=12)
    assert batch["input_ids"].shape == (2, 12)
    np.testing.assert_array_equal(batch["is_harmful"], [0, 1, 0, 1])
    for index, example in enumerate(examples):
        row, start = batch["example_row"][index], batch["example_start"][index]
        end = start + len(example.input_ids)
        np.testing.assert_array_equal(batch["input_ids"][row, start:end], example.input_ids)
        np.testing.assert_array_equal(batch["loss_mask"][row, start:end], example.loss_mask)
        assert np.all(batch["segment_ids"][row, start:end] == index + 1)
    assert batch["attention_mask"].sum() == 22
    assert np.all(batch["segment_ids"][batch["attention_mask"] == 0] == 0)


def test_padding_report_on_drawn_batches():
    lengths = np.random.default_rng(2).integers(8, 60, size=64)
    examples = make_examples(lengths.tolist())
    stream = batching.BatchStream(examples, 8, 0.5, seed=0, pad_id=0, max_seq_len=64)
    report = batching.padding_report(stream, count=20, max_seq_len=64)
    assert set(report) == {"padded_to_64", "padded_to_16", "padded_to_1", "packed"}
    real = report["padded_to_64"]["real_tokens"]
    assert all(entry["real_tokens"] == real for entry in report.values())
    assert (report["padded_to_64"]["padding_share"] >= report["padded_to_16"]["padding_share"]
            >= report["padded_to_1"]["padding_share"])
    assert report["packed"]["padding_share"] < report["padded_to_64"]["padding_share"]
    # Drawing batches for the report does not move the stream.
    assert stream.position == 0


def test_noise_scaled_per_segment():
    key = jax.random.PRNGKey(4)
    embeds = jnp.zeros((1, 10, 6))
    segments = jnp.asarray([[1, 1, 1, 1, 2, 2, 2, 3, 3, 0]], jnp.int32)
    mask = jnp.asarray([[1] * 9 + [0]], jnp.int32)
    noise = losses.length_scaled_noise(key, embeds, mask, alpha=5.0, segment_ids_BxL=segments)
    unit = jax.random.normal(key, embeds.shape, jnp.float32)
    scale = np.asarray(noise / unit)[0, :, 0]
    expected = 5.0 / np.sqrt(np.asarray([4, 4, 4, 4, 3, 3, 3, 2, 2]) * 6)
    np.testing.assert_allclose(scale[:9], expected, rtol=1e-5)
    assert scale[9] == 0
    # Without segment ids the whole row counts as one sequence of 9 tokens.
    row_scale = np.asarray(losses.length_scaled_noise(key, embeds, mask, alpha=5.0) / unit)
    np.testing.assert_allclose(row_scale[0, :9, 0], 5.0 / np.sqrt(9 * 6), rtol=1e-5)


def test_padding_report_bucketed_entry():
    lengths = np.random.default_rng(3).integers(8, 60, size=200)
    examples = make_examples(lengths.tolist())
    settings = dict(batch_size=8, harmful_fraction=0.5, seed=0, pad_id=0, max_seq_len=64,
                    pad_multiple=1)
    stream = batching.BatchStream(examples, pool_batches=2, **settings)
    bucketed = batching.BatchStream(examples, pool_batches=32, **settings)
    report = batching.padding_report(stream, count=32, max_seq_len=64, bucketed=bucketed)
    assert report["bucketed"]["real_tokens"] > 0
    assert report["bucketed"]["padding_share"] < report["padded_to_1"]["padding_share"]


def test_length_buckets_leave_records_and_digest():
    from ckt_jax import config_files, docs, stages, studies

    config = config_files.load_module(docs.CONFIG_PATH).get_config()
    record = stages._distill_record(config)
    digest = studies.config_digest(config)
    # A config written before the option existed has the same record and digest.
    del config.train["length_bucket_batches"]
    assert stages._distill_record(config) == record
    assert studies.config_digest(config) == digest
    config.train.length_bucket_batches = 64
    stages.validate_config(config)
    assert stages._distill_record(config)["train.length_bucket_batches"] == 64
    assert stages._teacher_record(config)["train.length_bucket_batches"] == 64
    assert studies.config_digest(config) != digest
    config.train.length_bucket_batches = 1
    with pytest.raises(ValueError, match=r"config.train.length_bucket_batches=1 is invalid; use "
                                         r"at least 2 batches"):
        stages.validate_config(config)


PACKED_OBJECTIVES = {
    "ce_sequence_opening": dict(ce_weight=1.0, reduction="sequence", opening_tokens=2,
                                opening_weight=3.0),
    "kd_contrastive_relation_base_kl": dict(kd_weight=1.0, contrastive_weight=0.5,
                                            relation_weight=0.5, base_kl_weight=0.3,
                                            temperature=2.0),
    "reply_mean_supcon_consistency": dict(kd_weight=1.0, contrastive_weight=0.5,
                                          contrastive_pooling="reply_mean",
                                          relation_weight=0.5, relation_method="supcon",
                                          consistency_weight=0.5, consistency_row_stride=2,
                                          l2_weight=1e-3),
}


def fixed_perturbation(key, embeds_BxLxD, mask_BxL, alpha, distribution="gaussian",
                       segment_ids_BxL=None):
    """Noise that depends only on each token's embedding, so it is the same packed or not."""
    return 0.05 * jnp.sin(7.0 * embeds_BxLxD) * mask_BxL[..., None]


@pytest.mark.parametrize("name", sorted(PACKED_OBJECTIVES))
def test_packed_objective_matches_unpacked(name, monkeypatch):
    from ckt_jax import lora
    from ckt_jax.model import LoraConfig
    from ckt_jax.objective import WEIGHTS, ObjectiveConfig, build_objective

    monkeypatch.setattr(losses, "length_scaled_noise", fixed_perturbation)
    lora_config = LoraConfig(rank=4, alpha=8.0, targets=("q", "v", "down"))
    student = Llama(TINY, lora=lora_config)
    full = student.init(jax.random.PRNGKey(1), jnp.zeros((1, 8), jnp.int32))["params"]
    adapters, backbone = lora.split_params(full)
    adapters = jax.tree_util.tree_map(lambda x: x + 0.02, adapters)
    teacher = Llama(TINY)
    teacher_params = teacher.init(jax.random.PRNGKey(2), jnp.zeros((1, 8), jnp.int32))["params"]
    frozen = {"backbone": backbone, "teacher": teacher_params}
    cfg = ObjectiveConfig(max_target_tokens=5, **PACKED_OBJECTIVES[name])
    loss_fn = build_objective(student, teacher, cfg)

    examples = make_examples([9, 5, 12, 7, 3, 10])
    padded = batching.pad_batch(examples, pad_id=0, pad_multiple=1, max_seq_len=24)
    packed = batching.pack_batch(examples, pad_id=0, max_seq_len=24)
    assert packed["input_ids"].shape[0] < len(examples)

    def value_and_grad(batch):
        batch = {k: jnp.asarray(v) for k, v in batch.items()}
        fn = jax.value_and_grad(lambda a: loss_fn(a, frozen, batch, jax.random.PRNGKey(3)),
                                has_aux=True)
        return jax.jit(fn)(adapters)

    (loss_padded, aux_padded), grads_padded = value_and_grad(padded)
    (loss_packed, aux_packed), grads_packed = value_and_grad(packed)
    terms = [k for k in aux_padded if k.startswith("loss/")]
    assert len(terms) == len(set(PACKED_OBJECTIVES[name]) & set(WEIGHTS))
    for key in terms + ["target_tokens", "target_tokens_dropped"]:
        np.testing.assert_allclose(float(aux_packed[key]), float(aux_padded[key]), rtol=1e-5,
                                   atol=1e-6, err_msg=key)
    np.testing.assert_allclose(float(loss_packed), float(loss_padded), rtol=1e-5, atol=1e-6)
    for want, got in zip(jax.tree_util.tree_leaves(grads_padded),
                         jax.tree_util.tree_leaves(grads_packed)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


def test_packed_objective_rejects_adversarial():
    from ckt_jax.objective import ObjectiveConfig, build_objective

    examples = make_examples([9, 5, 12])
    batch = {k: jnp.asarray(v) for k, v in
             batching.pack_batch(examples, pad_id=0, max_seq_len=24).items()}
    model = Llama(TINY)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    loss_fn = build_objective(model, None, ObjectiveConfig(ce_weight=1.0, adversarial_weight=0.5))
    with pytest.raises(ValueError, match="adversarial_weight > 0 does not support packed rows"):
        loss_fn({}, {"backbone": params}, batch, jax.random.PRNGKey(0))


def test_pack_batch_rows_fixed_row_count():
    examples = make_examples([9, 5, 12, 7, 3, 10])
    batch = batching.pack_batch_rows(examples, pad_id=0, num_rows=2, pad_multiple=8)
    length = batch["input_ids"].shape[1]
    assert batch["input_ids"].shape == (2, 24)
    assert length == batching.packed_row_length(examples, 2, 8)
    # One pad multiple shorter, the examples need more than 2 rows.
    assert len(batching.pack_examples(examples, length - 8)) > 2
    assert batch["attention_mask"].sum() == 46
    np.testing.assert_array_equal(batch["is_harmful"], [0, 1, 0, 1, 0, 1])
    for index, example in enumerate(examples):
        row, start = batch["example_row"][index], batch["example_start"][index]
        end = start + len(example.input_ids)
        np.testing.assert_array_equal(batch["input_ids"][row, start:end], example.input_ids)
        assert np.all(batch["segment_ids"][row, start:end] == index + 1)
    # More rows than needed leaves whole rows of padding.
    wide = batching.pack_batch_rows(examples, pad_id=0, num_rows=6, pad_multiple=16)
    assert wide["input_ids"].shape == (6, 16)
    assert wide["attention_mask"][-1].sum() == 0
    with pytest.raises(ValueError, match="num_rows=0 must be >= 1"):
        batching.pack_batch_rows(examples, pad_id=0, num_rows=0, pad_multiple=8)


def test_packed_stream_draws_the_same_examples():
    lengths = np.random.default_rng(5).integers(8, 40, size=60)
    examples = make_examples(lengths.tolist())
    settings = dict(batch_size=8, harmful_fraction=0.375, seed=1, pad_id=0, max_seq_len=64,
                    pad_multiple=16)
    padded = batching.BatchStream(examples, **settings)
    packed = batching.BatchStream(examples, pack_rows=3, **settings)
    for _ in range(6):
        plain, rows = next(padded), next(packed)
        assert rows["input_ids"].shape[0] == 3
        assert rows["input_ids"].shape[1] % 16 == 0
        np.testing.assert_array_equal(rows["is_harmful"], plain["is_harmful"])
        assert int(rows["is_harmful"].sum()) == 3
        assert rows["attention_mask"].sum() == plain["attention_mask"].sum()
    other_process = batching.BatchStream(examples, pack_rows=3, rows=[0, 1, 2, 3], **settings)
    with pytest.raises(ValueError, match="packed batches cannot be split over processes"):
        next(other_process)


def test_packed_training_matches_padded():
    import tiny_training
    from ckt_jax import lora, sharding, trainer
    from ckt_jax.model import LoraConfig
    from ckt_jax.objective import ObjectiveConfig, build_objective

    setup = tiny_training.build(seed=0, steps=2)
    student = Llama(LlamaConfig(**tiny_training.TINY_KW),
                    lora=LoraConfig(rank=4, alpha=8.0, targets=("q", "k", "v", "o", "gate", "down")))
    loss_fn = build_objective(student, None, ObjectiveConfig(ce_weight=1.0, l2_weight=1e-3,
                                                             max_target_tokens=16))
    mesh = sharding.make_mesh(-1, 1, 1)
    histories = {}
    for pack_rows in (0, 4):
        batches = batching.BatchStream(setup["examples"], tiny_training.BATCH_SIZE, 0.5, seed=0,
                                       pad_id=0, max_seq_len=32, pad_multiple=32,
                                       pack_rows=pack_rows)
        _, histories[pack_rows] = trainer.run_training(
            name="tiny", loss_fn=loss_fn, optimizer=lora.make_adapter_optimizer(1e-2),
            adapter_params=setup["adapters"], frozen_params={"backbone": setup["frozen"]["backbone"]},
            batches=batches, batch_size=tiny_training.BATCH_SIZE, num_steps=2,
            rng=jax.random.PRNGKey(7), mesh=mesh)
    for padded_step, packed_step in zip(histories[0], histories[4]):
        for key in ("loss", "loss/ce", "grad_norm", "target_tokens", "tokens"):
            np.testing.assert_allclose(packed_step[key], padded_step[key], rtol=1e-4, err_msg=key)
    with pytest.raises(ValueError, match="pack_rows=4 cannot be combined with "
                                         "config.train.grad_accum_steps=2"):
        trainer.run_training(
            name="tiny", loss_fn=loss_fn, optimizer=lora.make_adapter_optimizer(1e-2),
            adapter_params=setup["adapters"], frozen_params={"backbone": setup["frozen"]["backbone"]},
            batches=batches, batch_size=tiny_training.BATCH_SIZE, num_steps=2,
            rng=jax.random.PRNGKey(7), mesh=mesh, accumulation_steps=2)


def test_pack_rows_validated_and_recorded():
    from ckt_jax import config_files, docs, stages, studies

    config = config_files.load_module(docs.CONFIG_PATH).get_config()
    record = stages._distill_record(config)
    digest = studies.config_digest(config)
    del config.train["pack_rows"]
    assert stages._distill_record(config) == record
    assert studies.config_digest(config) == digest
    config.train.pack_rows = 4
    stages.validate_config(config)
    assert stages._distill_record(config)["train.pack_rows"] == 4
    assert studies.config_digest(config) != digest
    cases = (("train.grad_accum_steps", 2, "cannot be combined with config.train.grad_accum_"),
             ("distill.adversarial_weight", 0.5, "does not support the adversarial term"),
             ("train.pack_rows", -1, "config.train.pack_rows=-1 is invalid"),
             ("train.pack_rows", 9, "exceeds config.teacher_train.batch_size=8"))
    for field, value, match in cases:
        changed = config_files.load_module(docs.CONFIG_PATH).get_config()
        changed.train.pack_rows = 4
        section, name = field.split(".")
        changed[section][name] = value
        with pytest.raises(ValueError, match=match):
            stages.validate_config(changed)
