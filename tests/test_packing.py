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
