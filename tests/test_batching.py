"""Batch assembly: class balance, padding and length grouping."""

import numpy as np

from ckt_jax.batching import (BatchStream, Example, balanced_batches, examples_fingerprint,
                              pad_batch)


def make_examples(n, label, rng):
    out = []
    for i in range(n):
        length = int(rng.integers(10, 200))
        mask = [0] * (length // 2) + [1] * (length - length // 2)
        first = 3 if label == "harmful" else 4  # the first token tells the class apart
        out.append(Example(tuple(range(first, first + length)), tuple(mask), label, f"{label}{i}"))
    return out


def test_balanced_batches_class_share_and_padding():
    rng = np.random.default_rng(0)
    examples = make_examples(50, "harmful", rng) + make_examples(7, "benign", rng)
    stream = balanced_batches(examples, batch_size=8, harmful_fraction=0.5, seed=1, pad_id=0,
                              max_seq_len=256, pad_multiple=64, pool_batches=4)
    lengths = []
    for _ in range(8):
        batch = next(stream)
        assert batch["input_ids"].shape[0] == 8
        assert batch["input_ids"].shape[1] % 64 == 0
        assert int(np.sum(batch["input_ids"][:, 0] == 3)) == 4
        assert int(np.sum(batch["input_ids"][:, 0] == 4)) == 4
        real = batch["attention_mask"].sum(1)
        assert np.all(batch["loss_mask"].sum(1) > 0)
        assert np.all(batch["input_ids"][batch["attention_mask"] == 0] == 0)
        lengths.append(batch["input_ids"].shape[1] - real.max())
    # Length grouping: padding beyond the longest row stays under one pad multiple.
    assert max(lengths) < 64


def test_balanced_batches_deterministic():
    rng = np.random.default_rng(0)
    examples = make_examples(20, "harmful", rng) + make_examples(20, "benign", rng)
    a = balanced_batches(examples, 4, 0.5, seed=3, pad_id=0, max_seq_len=256)
    b = balanced_batches(examples, 4, 0.5, seed=3, pad_id=0, max_seq_len=256)
    for _ in range(5):
        x, y = next(a), next(b)
        np.testing.assert_array_equal(x["input_ids"], y["input_ids"])


def test_pad_batch_right_pads():
    ex = [Example((5, 6, 7), (0, 1, 1), "benign", "a"), Example((5,), (1,), "harmful", "b")]
    batch = pad_batch(ex, pad_id=2, pad_multiple=4, max_seq_len=16)
    np.testing.assert_array_equal(batch["input_ids"], [[5, 6, 7, 2], [5, 2, 2, 2]])
    np.testing.assert_array_equal(batch["attention_mask"], [[1, 1, 1, 0], [1, 0, 0, 0]])
    np.testing.assert_array_equal(batch["loss_mask"], [[0, 1, 1, 0], [1, 0, 0, 0]])


def test_wrapped_batches_are_balanced():
    rng = np.random.default_rng(1)
    plain = make_examples(30, "harmful", rng) + make_examples(30, "benign", rng)
    # Token 999 in second place marks a wrapped example.
    wrapped = [Example(e.input_ids[:1] + (999,) + e.input_ids[2:], e.loss_mask, e.label,
                       e.prompt_id + "/w", True)
               for e in make_examples(12, "harmful", rng) + make_examples(5, "benign", rng)]
    stream = balanced_batches(plain + wrapped, batch_size=4, harmful_fraction=0.5, seed=0,
                              pad_id=0, max_seq_len=256, wrapped_fraction=0.5, pool_batches=8)
    wrapped_batches = 0
    for _ in range(32):
        batch = next(stream)
        in_wrapped = list(batch["input_ids"][:, 1] == 999)
        assert all(in_wrapped) or not any(in_wrapped)  # one group per batch
        wrapped_batches += all(in_wrapped)
        assert int(np.sum(batch["input_ids"][:, 0] == 3)) == 2  # two harmful rows
    assert wrapped_batches == 16


def assert_same_batch(a, b):
    assert set(a) == set(b)
    for key in a:
        assert np.array_equal(a[key], b[key]), key


def test_batch_stream_resumes_at_any_position():
    rng = np.random.default_rng(0)
    examples = make_examples(30, "harmful", rng) + make_examples(11, "benign", rng)
    settings = dict(batch_size=8, harmful_fraction=0.5, seed=3, pad_id=0, max_seq_len=256,
                    pad_multiple=64, pool_batches=4, wrapped_fraction=0.0)
    plain = balanced_batches(examples, **settings)
    expected = [next(plain) for _ in range(30)]
    stream = BatchStream(examples, **settings)
    for k in range(30):
        assert_same_batch(next(stream), expected[k])
    assert stream.position == 30
    for position in (23, 5, 0, 29):  # Forwards, backwards and to the start.
        resumed = BatchStream(examples, **settings) if position == 23 else stream
        resumed.skip_to(position)
        assert_same_batch(next(resumed), expected[position])
        assert resumed.position == position + 1


def test_batch_stream_pads_selected_rows_to_global_length():
    rng = np.random.default_rng(1)
    examples = make_examples(16, "harmful", rng) + make_examples(16, "benign", rng)
    settings = dict(batch_size=8, harmful_fraction=0.5, seed=0, pad_id=0, max_seq_len=256,
                    pad_multiple=64)
    full = next(BatchStream(examples, **settings))
    rows = np.asarray([4, 5, 6, 7])
    part = next(BatchStream(examples, rows=rows, **settings))
    for key in full:
        assert np.array_equal(part[key], full[key][rows]), key


def test_examples_fingerprint_changes_with_content():
    rng = np.random.default_rng(2)
    examples = make_examples(5, "harmful", rng)
    assert examples_fingerprint(examples) == examples_fingerprint(list(examples))
    assert examples_fingerprint(examples) != examples_fingerprint(examples[::-1])
    changed = examples[:-1] + [Example(examples[-1].input_ids, examples[-1].loss_mask, "benign",
                                       examples[-1].prompt_id)]
    assert examples_fingerprint(examples) != examples_fingerprint(changed)


def test_fractional_harmful_share_is_kept_over_the_stream():
    # 0.35 of 8 rows is 2.8: batches hold 2 or 3 harmful rows, 2.8 on average, where rounding
    # every batch to 3 would train on 0.375.
    rng = np.random.default_rng(0)
    examples = make_examples(40, "harmful", rng) + make_examples(40, "benign", rng)
    stream = balanced_batches(examples, batch_size=8, harmful_fraction=0.35, seed=2, pad_id=0,
                              max_seq_len=256, pool_batches=4)
    per_batch = [int(np.sum(next(stream)["input_ids"][:, 0] == 3)) for _ in range(40)]
    assert set(per_batch) == {2, 3}
    assert sum(per_batch) == 112  # 40 batches x 2.8


def test_harmful_counts_prefixes_stay_within_one_row():
    from ckt_jax.batching import harmful_counts
    for fraction in (0.0, 0.1, 0.35, 0.4, 0.5, 2 / 3, 1.0):
        counts = harmful_counts(0, 50, 8, fraction)
        assert all(np.floor(8 * fraction) <= c <= np.ceil(8 * fraction) for c in counts)
        assert all(abs(sum(counts[:n]) - n * 8 * fraction) <= 0.5 for n in range(1, 51))
        # Drawing the stream in pieces gives the same counts as drawing it at once.
        assert harmful_counts(0, 20, 8, fraction) + harmful_counts(20, 30, 8, fraction) == counts
    assert harmful_counts(0, 4, 8, 0.5) == [4, 4, 4, 4]


def test_wider_length_buckets_keep_class_share_and_pad_less():
    from ckt_jax.batching import balanced_example_batches, harmful_counts, padding_share

    rng = np.random.default_rng(3)
    examples = make_examples(400, "harmful", rng) + make_examples(400, "benign", rng)
    shares = {}
    for window in (2, 16, 64):
        batches = balanced_example_batches(examples, 8, 0.375, seed=5, max_seq_len=256,
                                           pool_batches=window)
        drawn = [next(batches) for _ in range(128)]
        # Every window of batches contains the harmful rows of the same stretch of the stream.
        assert sorted(sum(e.label == "harmful" for e in b) for b in drawn) == sorted(
            harmful_counts(0, 128, 8, 0.375))
        shares[window] = padding_share(drawn, 1, 256)["padding_share"]
    assert shares[64] < shares[16] < shares[2]


def test_length_bucket_window_too_small_rejected():
    import pytest

    from ckt_jax.batching import balanced_example_batches

    rng = np.random.default_rng(4)
    examples = make_examples(8, "harmful", rng) + make_examples(8, "benign", rng)
    batches = balanced_example_batches(examples, 4, 0.5, seed=0, max_seq_len=256,
                                       pool_batches=1, wrapped_fraction=0.5)
    with pytest.raises(ValueError, match="pool_batches=1 gives the plain group .* use at least 2"):
        next(batches)
