"""Tokenized training examples and fixed-shape batches.

An example is one chat turn: the prompt rendered with the model's chat template, then the reply.
`loss_mask` marks the reply tokens, which are the only training targets. Each batch comes from
one group (prompts as written, or prompts wrapped in a jailbreak template) and mixes harmful and
benign examples at a fixed share. Within the wrapped group the two classes are balanced too, so
the wrapper itself never predicts the target: only the request inside it does. Batches are padded
on the right to a multiple of `pad_multiple` tokens, so jit compiles one step per length bucket
instead of one per batch, and wrapped (long) prompts do not pad the plain batches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Callable, Iterator, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Example:
    input_ids: tuple[int, ...]
    loss_mask: tuple[int, ...]
    label: str          # "harmful" or "benign".
    prompt_id: str
    wrapped: bool = False   # The prompt is wrapped in a jailbreak template.


def tokenize_examples(tokenizer, rows: Sequence[dict], max_seq_len: int,
                      ) -> tuple[list[Example], int]:
    """Tokenize `{"prompt", "reply", "label", "id", "complete", "wrapped"}` rows.

    Returns (examples, number dropped).

    A reply cut off by the generation length limit (`complete` False) has no end-of-turn token in
    its target, so the model is not taught to stop mid-sentence. Examples longer than
    `max_seq_len` tokens are dropped and counted, never truncated: a truncated prompt can lose the
    request itself.
    """
    examples, dropped = [], 0
    for row in rows:
        ids, mask = tokenizer.encode_chat(row["prompt"], row["reply"])
        mask = list(mask)
        if not row.get("complete", True):
            # Unmark everything after the reply text: the end-of-turn token and what follows it.
            reply_len = len(tokenizer.encode(row["reply"]))
            first = mask.index(1) if 1 in mask else len(mask)
            for i in range(first + reply_len, len(mask)):
                mask[i] = 0
        if len(ids) > max_seq_len:
            dropped += 1
            continue
        examples.append(Example(tuple(ids), tuple(mask), row["label"], row["id"],
                                bool(row.get("wrapped", False))))
    return examples, dropped


def pad_batch(examples: Sequence[Example], pad_id: int, pad_multiple: int,
              max_seq_len: int, rows: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """Right-pad examples into int32 arrays `input_ids`, `attention_mask`, `loss_mask` (B x L).

    Also returns `is_harmful` (B), 1 for harmful examples. With `rows`, only those examples are
    padded (B = len(rows)), to the length the whole batch needs: each process of a multi-host run
    pads its own rows of a global batch.
    """
    longest = max(len(e.input_ids) for e in examples)
    length = min(max_seq_len, int(math.ceil(longest / pad_multiple) * pad_multiple))
    if rows is not None:
        examples = [examples[int(i)] for i in rows]
    batch = {
        "input_ids": np.full((len(examples), length), pad_id, np.int32),
        "attention_mask": np.zeros((len(examples), length), np.int32),
        "loss_mask": np.zeros((len(examples), length), np.int32),
        "is_harmful": np.asarray([e.label == "harmful" for e in examples], np.int32),
    }
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        batch["input_ids"][row, :n] = example.input_ids
        batch["attention_mask"][row, :n] = 1
        batch["loss_mask"][row, :n] = example.loss_mask
    return batch


def balanced_batches(examples: Sequence[Example], batch_size: int, harmful_fraction: float,
                     seed: int, pad_id: int, max_seq_len: int, pad_multiple: int = 64,
                     pool_batches: int = 16, wrapped_fraction: float = 0.0,
                     ) -> Iterator[dict[str, np.ndarray]]:
    """Yield padded batches forever; see `balanced_example_batches` for how they are drawn."""
    for chosen in balanced_example_batches(examples, batch_size, harmful_fraction, seed,
                                           max_seq_len, pool_batches, wrapped_fraction):
        yield pad_batch(chosen, pad_id, pad_multiple, max_seq_len)


def pack_examples(examples: Sequence[Example], row_length: int) -> list[list[int]]:
    """Group example indices into rows of at most `row_length` tokens, first fit decreasing.

    Each row lists its examples in the order they are placed, longest first. An example longer
    than `row_length` raises ValueError, because packing never splits an example.
    """
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    rows: list[list[int]] = []
    free: list[int] = []
    for index in order:
        length = len(examples[index].input_ids)
        if length > row_length:
            raise ValueError(f"example {examples[index].prompt_id!r} has {length} tokens, more "
                             f"than the packed row length {row_length}; pass a longer row length")
        for row, room in enumerate(free):
            if length <= room:
                rows[row].append(index)
                free[row] -= length
                break
        else:
            rows.append([index])
            free.append(row_length - length)
    return rows


def pack_batch(examples: Sequence[Example], pad_id: int, max_seq_len: int,
               ) -> dict[str, np.ndarray]:
    """Pack examples into rows of `max_seq_len` tokens with `segment_ids` (R x L).

    Returns the arrays of `pad_batch` for the R rows that `pack_examples` needs, where example
    i of `examples` is segment i + 1 of its row and padding is segment 0. `is_harmful` stays
    per example (length `len(examples)`), and `example_row` and `example_start` (also per
    example) give the row and the first slot of each example. `objective.build_objective`
    scores these batches per example.
    """
    length = max(max_seq_len, max(len(e.input_ids) for e in examples))
    rows = pack_examples(examples, length)
    return _packed_arrays(examples, rows, length, len(rows), pad_id)


def packed_row_length(examples: Sequence[Example], num_rows: int, pad_multiple: int) -> int:
    """Return the shortest multiple of `pad_multiple` whose rows fit `examples` in `num_rows`.

    Rows are filled by `pack_examples`. The search stops at the longest example's length times
    the examples per row, a length that always fits.
    """
    if num_rows < 1:
        raise ValueError(f"num_rows={num_rows} must be >= 1")
    longest = max(len(e.input_ids) for e in examples)
    length = int(math.ceil(longest / pad_multiple) * pad_multiple)
    while len(pack_examples(examples, length)) > num_rows:
        length += pad_multiple
    return length


def pack_batch_rows(examples: Sequence[Example], pad_id: int, num_rows: int,
                    pad_multiple: int) -> dict[str, np.ndarray]:
    """Pack examples into exactly `num_rows` rows, as short as a multiple of `pad_multiple` allows.

    Returns the arrays of `pack_batch`. Rows that `pack_examples` leaves empty are all padding
    (segment 0), so every batch of a run has `num_rows` rows and one of a few row lengths, and
    jit compiles one step per row length.
    """
    length = packed_row_length(examples, num_rows, pad_multiple)
    return _packed_arrays(examples, pack_examples(examples, length), length, num_rows, pad_id)


def _packed_arrays(examples: Sequence[Example], rows: Sequence[Sequence[int]], length: int,
                   num_rows: int, pad_id: int) -> dict[str, np.ndarray]:
    batch = {
        "input_ids": np.full((num_rows, length), pad_id, np.int32),
        "attention_mask": np.zeros((num_rows, length), np.int32),
        "loss_mask": np.zeros((num_rows, length), np.int32),
        "segment_ids": np.zeros((num_rows, length), np.int32),
        "is_harmful": np.asarray([e.label == "harmful" for e in examples], np.int32),
        "example_row": np.zeros(len(examples), np.int32),
        "example_start": np.zeros(len(examples), np.int32),
    }
    for row, members in enumerate(rows):
        start = 0
        for index in members:
            example = examples[index]
            end = start + len(example.input_ids)
            batch["input_ids"][row, start:end] = example.input_ids
            batch["attention_mask"][row, start:end] = 1
            batch["loss_mask"][row, start:end] = example.loss_mask
            batch["segment_ids"][row, start:end] = index + 1
            batch["example_row"][index] = row
            batch["example_start"][index] = start
            start = end
    return batch


def padding_share(batches: Sequence[Sequence[Example]], pad_multiple: int, max_seq_len: int,
                  pack: bool = False, pack_rows: int = 0) -> dict[str, float]:
    """Measure the padding of `batches` as `pad_batch` (or `pack_batch` with `pack`, or
    `pack_batch_rows` with `pack_rows` rows and `pad_multiple`) lays them out.

    Returns `real_tokens`, `slots` (rows x length, summed over batches) and `padding_share`,
    the share of slots that contain padding.
    """
    real, slots = 0, 0
    for examples in batches:
        if pack_rows:
            shape = (pack_rows, packed_row_length(examples, pack_rows, pad_multiple))
        elif pack:
            shape = pack_batch(examples, 0, max_seq_len)["input_ids"].shape
        else:
            shape = pad_batch(examples, 0, pad_multiple, max_seq_len)["input_ids"].shape
        real += sum(len(e.input_ids) for e in examples)
        slots += shape[0] * shape[1]
    return {"real_tokens": real, "slots": slots,
            "padding_share": 1.0 - real / slots if slots else 0.0}


def padding_report(stream: "BatchStream", count: int, max_seq_len: int,
                   pad_multiples: Sequence[int] = (64, 16, 1),
                   bucketed: "BatchStream | None" = None,
                   pack_rows: Sequence[int] = ()) -> dict[str, dict[str, float]]:
    """Compare the padding share of the first `count` batches of `stream` under several layouts.

    The batches are those a training run draws (sorted by length within pools, so they are
    already bucketed by length). Keys: `padded_to_<m>` pads every batch to a multiple of `m`
    tokens (64 is what training uses), and `packed` packs each batch into rows of
    `max_seq_len` tokens, so only the last row of a batch carries much padding. With
    `bucketed`, a stream of the same examples that sorts by length over another number of
    batches, `bucketed` is its first `count` batches padded as that stream pads them. For
    each `r` in `pack_rows`, `packed_<r>_rows` packs each batch into `r` rows of a multiple of
    the stream's pad multiple (`pack_batch_rows`), as training with `train.pack_rows=r` does.
    """
    batches = stream.drawn_batches(count)
    report = {f"padded_to_{m}": padding_share(batches, m, max_seq_len) for m in pad_multiples}
    report["packed"] = padding_share(batches, 1, max_seq_len, pack=True)
    for rows in pack_rows:
        report[f"packed_{rows}_rows"] = padding_share(batches, stream.pad_multiple, max_seq_len,
                                                      pack_rows=rows)
    if bucketed is not None:
        report["bucketed"] = padding_share(bucketed.drawn_batches(count),
                                           bucketed.pad_multiple, max_seq_len)
    return report


def counts_needed(label: str, harmful_fraction: float) -> bool:
    """Return whether batches drawn with `harmful_fraction` contain any `label` rows."""
    return harmful_fraction > 0.0 if label == "harmful" else harmful_fraction < 1.0


def harmful_counts(first: int, n_batches: int, batch_size: int,
                   harmful_fraction: float) -> list[int]:
    """Harmful rows in batches `first .. first + n_batches - 1` of a stream.

    Batch i contains round((i + 1) * m) - round(i * m) rows for m = batch_size * harmful_fraction:
    the floor or the ceiling of m, spread evenly, so every prefix of the stream is within one row
    of its exact share, and a whole-number m gives m rows in every batch.
    """
    mean = batch_size * harmful_fraction
    edges = [int(np.floor(i * mean + 0.5)) for i in range(first, first + n_batches + 1)]
    return [edges[i + 1] - edges[i] for i in range(n_batches)]


def balanced_example_batches(examples: Sequence[Example], batch_size: int,
                             harmful_fraction: float, seed: int, max_seq_len: int,
                             pool_batches: int = 16, wrapped_fraction: float = 0.0,
                             ) -> Iterator[list[Example]]:
    """Yield batches of examples forever, `batch_size * harmful_fraction` harmful on average.

    When that product is not a whole number, batches hold its floor or its ceiling, spread
    evenly, so the share over a pool of batches matches `harmful_fraction` (0.35 of 8 rows
    gives 2.8 harmful rows per batch, not 3).

    A share `wrapped_fraction` of the batches holds only wrapped examples, the rest only plain
    ones. Every (group, class) stream is reshuffled (with `seed`) each time it is exhausted, so
    small classes are seen as often as large ones. Examples are drawn `pool_batches` batches at a
    time and sorted by length within each stream before they are cut into batches, so a batch
    holds examples of similar length and pads little; the batch order is then shuffled.
    """
    if not 0.0 <= wrapped_fraction <= 1.0:
        raise ValueError(f"wrapped_fraction={wrapped_fraction} is outside [0, 1]")
    if not 0.0 <= harmful_fraction <= 1.0:
        raise ValueError(f"harmful_fraction={harmful_fraction} is outside [0, 1]")
    labels = ("harmful", "benign")
    groups = {False: 1.0 - wrapped_fraction, True: wrapped_fraction}
    # A group whose share of the pool rounds to 0 batches would never be drawn, and with every
    # group at 0 the generator would loop without yielding.
    for wrapped, share in groups.items():
        if share > 0 and int(round(pool_batches * share)) == 0:
            kind = "wrapped" if wrapped else "plain"
            least = math.floor(0.5 / share) + 1
            raise ValueError(f"pool_batches={pool_batches} gives the {kind} group (share "
                             f"{share}) no batch per pool; use at least {least}")
    streams = {}
    for wrapped, share in groups.items():
        if share == 0:
            continue
        for label in labels:
            members = [e for e in examples if e.label == label and e.wrapped == wrapped]
            if counts_needed(label, harmful_fraction) and not members:
                kind = "wrapped" if wrapped else "plain"
                raise ValueError(
                    f"no {kind} {label} training examples fit max_seq_len={max_seq_len}; raise "
                    "data.max_seq_len, or change data.harmful_fraction or data.wrapped_fraction")
            streams[(wrapped, label)] = members
    rng = np.random.default_rng(seed)
    orders = {key: [] for key in streams}
    drawn = {False: 0, True: 0}  # Batches drawn so far from each group.

    def take(key) -> Example:
        if not orders[key]:
            orders[key] = list(rng.permutation(len(streams[key])))
        return streams[key][orders[key].pop()]

    while True:
        batches = []
        for wrapped, share in groups.items():
            n_batches = int(round(pool_batches * share))
            if n_batches == 0:
                continue
            harmful = harmful_counts(drawn[wrapped], n_batches, batch_size, harmful_fraction)
            drawn[wrapped] += n_batches
            counts = {"harmful": harmful, "benign": [batch_size - h for h in harmful]}
            pools = {label: sorted((take((wrapped, label)) for _ in range(sum(counts[label]))),
                                   key=lambda e: len(e.input_ids))
                     for label in labels}
            offsets = {label: np.concatenate([[0], np.cumsum(counts[label])]) for label in labels}
            for i in range(n_batches):
                chosen = [e for label in labels
                          for e in pools[label][offsets[label][i]:offsets[label][i + 1]]]
                order = rng.permutation(len(chosen))
                batches.append([chosen[j] for j in order])
        for i in rng.permutation(len(batches)):
            yield batches[i]


class BatchStream:
    """An endless batch iterator that can be resumed exactly: batch k depends only on (seed, k).

    `position` counts the batches taken so far and is stored in training checkpoints. `skip_to`
    replays the seeded example order without padding anything, so a resumed run gets exactly the
    batches an uninterrupted run would have got. `rows` selects the rows of each global batch that
    this process pads (all rows when None); see `ckt_jax.sharding.host_rows`. With
    `pack_rows > 0` every batch is packed into that many rows (`pack_batch_rows`). `batch_fields`,
    when set, is called with the padded examples and the row length and returns more `B x ...`
    arrays for the batch (the teacher cache uses it).
    """

    def __init__(self, examples: Sequence[Example], batch_size: int, harmful_fraction: float,
                 seed: int, pad_id: int, max_seq_len: int, pad_multiple: int = 64,
                 pool_batches: int = 16, wrapped_fraction: float = 0.0,
                 rows: Sequence[int] | None = None, pack_rows: int = 0):
        self._make = lambda: balanced_example_batches(
            examples, batch_size, harmful_fraction, seed, max_seq_len, pool_batches,
            wrapped_fraction)
        self._pad = dict(pad_id=pad_id, pad_multiple=pad_multiple, max_seq_len=max_seq_len)
        self.pad_multiple = pad_multiple
        self.rows = rows
        self.batch_size = batch_size
        self.pack_rows = pack_rows
        self.seed = seed
        self.position = 0
        self.batch_fields: Callable[[Sequence[Example], int], dict[str, np.ndarray]] | None = None
        self._batches = self._make()

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        chosen = next(self._batches)
        self.position += 1
        if self.pack_rows:
            return self._packed(chosen)
        batch = pad_batch(chosen, rows=self.rows, **self._pad)
        if self.batch_fields is not None:
            padded = chosen if self.rows is None else [chosen[int(i)] for i in self.rows]
            batch.update(self.batch_fields(padded, batch["input_ids"].shape[1]))
        return batch

    def _packed(self, chosen: Sequence[Example]) -> dict[str, np.ndarray]:
        # NOTE: a packed batch is laid out from all of its examples at once, so a process
        # cannot pad only its own rows. Packing runs on one process.
        if self.rows is not None and list(self.rows) != list(range(self.batch_size)):
            raise ValueError("packed batches cannot be split over processes; set "
                             "config.train.pack_rows=0 for multi-process training")
        batch = pack_batch_rows(chosen, self._pad["pad_id"], self.pack_rows, self.pad_multiple)
        if self.batch_fields is not None:
            # NOTE: no test runs the teacher cache on packed batches yet. Its fields have one
            # row per example, aligned with the objective's per-example scored positions.
            batch.update(self.batch_fields(chosen, batch["input_ids"].shape[1]))
        return batch

    def drawn_batches(self, count: int) -> list[list[Example]]:
        """Return the examples of batches 1 .. `count`, without padding them."""
        batches = self._make()
        return [next(batches) for _ in range(count)]

    def drawn_examples(self, count: int) -> list[Example]:
        """Return the examples of batches 1 .. `count` (with repeats), without padding them."""
        return [example for batch in self.drawn_batches(count) for example in batch]

    def skip_to(self, position: int) -> None:
        """Move to `position` batches from the start.

        NOTE: replaying costs time linear in `position` (a few milliseconds per thousand batches
        of 8), because the example order is drawn from one seeded generator.
        """
        if position < 0:
            raise ValueError(f"batch position {position} is negative")
        if position < self.position:
            self._batches = self._make()
            self.position = 0
        while self.position < position:
            next(self._batches)
            self.position += 1


def examples_fingerprint(examples: Sequence[Example]) -> str:
    """Return a SHA-256 hex digest of the examples' tokens, masks, labels and ids, in order."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(repr((example.input_ids, example.loss_mask, example.label,
                            example.prompt_id, example.wrapped)).encode())
    return digest.hexdigest()
