"""Tokenized training examples and fixed-shape batches.

An example is one chat turn: the prompt rendered with the model's chat template, then the reply.
`loss_mask` marks the reply tokens, which are the only training targets. Batches mix harmful and
benign examples at a fixed share and are padded on the right to a multiple of `pad_multiple`
tokens, so jit compiles one step per length bucket instead of one per batch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Example:
    input_ids: tuple[int, ...]
    loss_mask: tuple[int, ...]
    label: str          # "harmful" or "benign".
    prompt_id: str


def tokenize_examples(tokenizer, rows: Sequence[dict], max_seq_len: int,
                      ) -> tuple[list[Example], int]:
    """Tokenize `{"prompt", "reply", "label", "id", "complete"}` rows; return (examples, dropped).

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
        examples.append(Example(tuple(ids), tuple(mask), row["label"], row["id"]))
    return examples, dropped


def pad_batch(examples: Sequence[Example], pad_id: int, pad_multiple: int,
              max_seq_len: int) -> dict[str, np.ndarray]:
    """Right-pad examples into int32 arrays `input_ids`, `attention_mask`, `loss_mask` (B x L)."""
    longest = max(len(e.input_ids) for e in examples)
    length = min(max_seq_len, int(math.ceil(longest / pad_multiple) * pad_multiple))
    batch = {
        "input_ids": np.full((len(examples), length), pad_id, np.int32),
        "attention_mask": np.zeros((len(examples), length), np.int32),
        "loss_mask": np.zeros((len(examples), length), np.int32),
    }
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        batch["input_ids"][row, :n] = example.input_ids
        batch["attention_mask"][row, :n] = 1
        batch["loss_mask"][row, :n] = example.loss_mask
    return batch


def balanced_batches(examples: Sequence[Example], batch_size: int, harmful_fraction: float,
                     seed: int, pad_id: int, max_seq_len: int, pad_multiple: int = 64,
                     pool_batches: int = 16) -> Iterator[dict[str, np.ndarray]]:
    """Yield batches forever: `round(batch_size * harmful_fraction)` harmful examples each.

    Each class is reshuffled (with `seed`) every time it is exhausted, so both are seen evenly even
    when one class is much larger than the other. Examples are drawn `pool_batches` batches at a
    time and sorted by length within each class before they are cut into batches, so a batch holds
    examples of similar length and pads little; the batch order is then shuffled.
    """
    by_label = {"harmful": [e for e in examples if e.label == "harmful"],
                "benign": [e for e in examples if e.label == "benign"]}
    n_harmful = int(round(batch_size * harmful_fraction))
    counts = {"harmful": n_harmful, "benign": batch_size - n_harmful}
    for label, count in counts.items():
        if count and not by_label[label]:
            raise ValueError(f"no {label} training examples fit max_seq_len={max_seq_len}; "
                             "raise data.max_seq_len or change data.harmful_fraction")
    rng = np.random.default_rng(seed)
    orders = {label: [] for label in by_label}

    def take(label: str) -> Example:
        if not orders[label]:
            orders[label] = list(rng.permutation(len(by_label[label])))
        return by_label[label][orders[label].pop()]

    while True:
        pools = {label: sorted((take(label) for _ in range(count * pool_batches)),
                               key=lambda e: len(e.input_ids))
                 for label, count in counts.items()}
        batches = []
        for i in range(pool_batches):
            chosen = [e for label, count in counts.items()
                      for e in pools[label][i * count:(i + 1) * count]]
            order = rng.permutation(len(chosen))
            batches.append([chosen[j] for j in order])
        for i in rng.permutation(pool_batches):
            yield pad_batch(batches[i], pad_id, pad_multiple, max_seq_len)
