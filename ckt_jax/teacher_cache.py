"""The teacher's top-k log-probabilities on scored reply tokens, computed once and stored.

With a live teacher, every distillation step runs the teacher forward and a float32 softmax over
the whole vocabulary at every scored position. The teacher is frozen, so its distribution at a
position depends only on the example. This module computes, once per example, the teacher's
top-k token ids and log-probabilities (`losses.teacher_top_k`) and the exact log-mass outside
them (`losses.teacher_tail_log_mass`). The kd term then uses `losses.sparse_forward_kl` on the
values that the batch carries.

Layout on disk, in `<workdir>/teacher_cache/<first 16 hex digits of the fingerprint>/`:

    cache.json        the fingerprint, the settings and the top-k KL error measured at build time
    shard-NNNNN.npz   one file per build: example_indices [n], offsets [n + 1],
                      indices [T, k] int32, log_probs [T, k] float32, tail_log_mass [T] float32,
                      where T is the number of scored positions of those n examples

The shards are uncompressed NumPy `.npz` files. Every field is a dense numeric array, the whole
cache is read into memory at start-up (about 8 bytes per entry: 26 MB for 100,000 scored
tokens at k = 32), and reading needs nothing beyond NumPy. array_record stores variable-size
byte records for random access from disk, which would add a serialisation step per example here
and no speed.

The fingerprint covers the teacher's weights and architecture, the training examples, k, the
temperature, the scored-position limit and the compute and parameter dtypes. A change to any of
them selects another directory, so a stale cache is never read. A directory whose files carry
another fingerprint stops the run with the fix. Only the examples that the run's batches draw
are scored. A later run that draws more of them adds a shard, so an interrupted build, a resumed
run and another student with the same teacher and data reuse what exists.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import time
import zipfile
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from ckt_jax import batching, checkpoint, distributed, losses
from ckt_jax.model import Llama
from ckt_jax.objective import TEACHER_CACHE_FIELDS, gather_target_positions

# The batch keys that carry the cache into the objective, `B x K x k`, `B x K x k` and `B x K`.
BATCH_FIELDS = TEACHER_CACHE_FIELDS
MANIFEST = "cache.json"
CACHE_VERSION = 1
# Rows per teacher forward are padded to a multiple of this many tokens, as training batches are.
PAD_MULTIPLE = 64


@dataclasses.dataclass(frozen=True)
class CacheSettings:
    top_k: int                 # Cached tokens per position.
    temperature: float         # The kd temperature; the cached values are log softmax(z / T).
    max_target_tokens: int     # Scored positions per example, as in the objective.
    batch_size: int = 8        # Examples per teacher forward while building.

    def __post_init__(self):
        if self.top_k < 1:
            raise ValueError(f"top_k={self.top_k} must be >= 1")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")


def cache_fingerprint(*, teacher_params: Any, teacher: Llama, examples_fingerprint: str,
                      settings: CacheSettings) -> str:
    """SHA-256 of everything the cached values depend on (not of `settings.batch_size`)."""
    record = {
        "version": CACHE_VERSION,
        "teacher_weights": checkpoint.tree_fingerprint(teacher_params),
        "teacher_config": repr(teacher.config),
        "compute_dtype": jnp.dtype(teacher.dtype).name,
        "param_dtype": jnp.dtype(teacher.param_dtype).name,
        "output_dtype": jnp.dtype(teacher.output_dtype).name,
        "examples": examples_fingerprint,
        "top_k": settings.top_k,
        "temperature": float(settings.temperature),
        "max_target_tokens": settings.max_target_tokens,
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def cache_directory(root: pathlib.Path, fingerprint: str) -> pathlib.Path:
    return root / "teacher_cache" / fingerprint[:16]


def top_k_kl_error(student_logits_BxKxV: jax.Array, teacher_logits_BxKxV: jax.Array,
                   mask_BxK: jax.Array, k: int, temperature: float = 1.0) -> dict[str, float]:
    """Measure how far the top-k kd term is from the dense one on a batch.

    Compares `sparse_forward_kl` (bucket tail, exact teacher remainder) from the teacher's
    top-`k` with the dense `forward_kl`, both times `T**2`, at the positions where `mask_BxK` is
    set. Returns floats: `kd_dense` and `kd_top_k` (token means, as the kd loss with
    `reduction="token"`), `kd_abs_error` (their absolute difference), and
    `per_token_abs_error_mean` and `per_token_abs_error_max` (of the per-token KL values), with
    `tokens`, the number of positions compared. The bucket form is a lower bound on the full KL,
    so `kd_top_k <= kd_dense` up to float32 rounding.
    """
    teacher = jnp.asarray(teacher_logits_BxKxV, jnp.float32)
    student = jnp.asarray(student_logits_BxKxV, jnp.float32)
    indices, log_probs = losses.teacher_top_k(teacher, k, temperature)
    tail = losses.teacher_tail_log_mass(teacher, indices, temperature)
    sparse_BxK = losses.sparse_forward_kl(student, indices, log_probs, temperature,
                                          teacher_tail_log_mass_BxL=tail)
    dense_BxK = losses.forward_kl(student, teacher, temperature)
    mask = jnp.asarray(mask_BxK, jnp.float32)
    count = jnp.maximum(jnp.sum(mask), 1.0)
    kd_dense = jnp.sum(dense_BxK * mask) / count
    kd_sparse = jnp.sum(sparse_BxK * mask) / count
    per_token_error = jnp.abs(sparse_BxK - dense_BxK) * mask
    return {"kd_dense": float(kd_dense), "kd_top_k": float(kd_sparse),
            "kd_abs_error": float(jnp.abs(kd_dense - kd_sparse)),
            "per_token_abs_error_mean": float(jnp.sum(per_token_error) / count),
            "per_token_abs_error_max": float(jnp.max(per_token_error)),
            "tokens": int(jnp.sum(mask))}


def _scored_logits(model: Llama, params, batch: dict, max_target_tokens: int):
    """Logits `B x K x V` at each row's scored positions, and their validity `B x K`."""
    target_mask = losses.next_token_mask(batch["loss_mask"])
    positions, valid = gather_target_positions(target_mask, max_target_tokens)
    out = model.apply({"params": params}, batch["input_ids"],
                      attention_mask_BxL=batch["attention_mask"])
    hidden = jnp.take_along_axis(out.hidden_BxLxD, positions[..., None], axis=1)
    logits = model.apply({"params": params}, hidden, method="project")
    return logits.astype(jnp.float32), valid


class TeacherCache:
    """The cached entries of a list of examples, and the batch fields built from them."""

    def __init__(self, examples: Sequence[batching.Example], settings: CacheSettings):
        self.settings = settings
        # Identical examples share one index, and so one cache entry.
        self.index_of: dict[batching.Example, int] = {}
        for index, example in enumerate(examples):
            self.index_of.setdefault(example, index)
        self.examples = list(examples)
        self.entries: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def missing(self, examples: Sequence[batching.Example]) -> list[int]:
        """Indices of those examples with no entry yet, sorted, without repeats."""
        requested = {self.index_of[example] for example in examples}
        return sorted(requested - set(self.entries))

    def add_shard(self, shard: dict[str, np.ndarray]) -> None:
        offsets = shard["offsets"]
        for row, index in enumerate(shard["example_indices"]):
            start, end = int(offsets[row]), int(offsets[row + 1])
            self.entries[int(index)] = (shard["indices"][start:end],
                                        shard["log_probs"][start:end],
                                        shard["tail_log_mass"][start:end])

    def batch_fields(self, examples: Sequence[batching.Example], length: int,
                     ) -> dict[str, np.ndarray]:
        """Cache fields for a padded batch of `examples` of `length` tokens per row.

        Slot j of row b contains the entry of that example's j-th scored position, in the order
        of `objective.gather_target_positions`. Slots past an example's scored positions contain
        a finite placeholder (all teacher mass on token 0), which the objective masks out.
        """
        k = self.settings.top_k
        slots = min(self.settings.max_target_tokens, length)
        indices = np.broadcast_to(np.arange(k, dtype=np.int32), (len(examples), slots, k)).copy()
        log_probs = np.full((len(examples), slots, k), -np.inf, np.float32)
        log_probs[..., 0] = 0.0
        tail = np.full((len(examples), slots), -np.inf, np.float32)
        for row, example in enumerate(examples):
            entry = self.entries.get(self.index_of.get(example, -1))
            if entry is None:
                raise KeyError(f"example {example.prompt_id!r} is not in the teacher cache; "
                               "the cache covers only the examples the run's batches draw")
            count = len(entry[2])
            indices[row, :count], log_probs[row, :count], tail[row, :count] = entry
        return dict(zip(BATCH_FIELDS, (indices, log_probs, tail)))


def _read_shard(path: pathlib.Path, fingerprint: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path) as data:
            shard = {name: data[name] for name in data.files}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        raise ValueError(f"teacher cache shard {path} is unreadable ({err}); delete it to "
                         "score its examples again") from None
    if str(shard.get("fingerprint")) != fingerprint:
        raise ValueError(f"teacher cache shard {path} belongs to another teacher or data set; "
                         f"delete {path.parent} to rebuild the cache")
    return shard


def _write_npz(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
    """Write `arrays` to `path` atomically, so a killed build never leaves a partial shard."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def load_or_build(directory: pathlib.Path, fingerprint: str, examples: Sequence[batching.Example],
                  needed: Sequence[batching.Example], settings: CacheSettings, teacher: Llama,
                  teacher_params, pad_id: int, reference: tuple[Llama, Any] | None = None,
                  ) -> TeacherCache:
    """Read the cache in `directory` and score the `needed` examples it lacks.

    `examples` is the full list the fingerprint covers. New entries are written as one more
    shard (by process 0). `reference` is a (model, params) pair whose logits are compared with
    the teacher's on the first scored batch of a new cache. The KL error of the top-k
    approximation found there (see `top_k_kl_error`) is logged and stored in `cache.json`. The
    distill stage passes the student at initialisation, which is the base model.
    """
    cache = TeacherCache(examples, settings)
    manifest_path = directory / MANIFEST
    manifest = None
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("fingerprint") != fingerprint:
            raise ValueError(f"{directory} contains a teacher cache for another teacher or "
                             f"data set; delete {directory} to rebuild it")
        for path in sorted(directory.glob("shard-*.npz")):
            cache.add_shard(_read_shard(path, fingerprint))
    missing = cache.missing(needed)
    logging.info("teacher cache %s: %d of %d needed examples cached, %d to score (k=%d)",
                 directory, len(set(cache.index_of[e] for e in needed)) - len(missing),
                 len(set(cache.index_of[e] for e in needed)), len(missing), settings.top_k)
    if not missing:
        return cache

    started = time.perf_counter()
    shard, kl_error = _score_examples(cache, missing, teacher, teacher_params, pad_id,
                                      reference if manifest is None else None)
    cache.add_shard(shard)
    tokens = int(shard["offsets"][-1])
    logging.info("teacher cache: scored %d examples (%d positions) in %.1f s", len(missing),
                 tokens, time.perf_counter() - started)
    if kl_error is not None:
        logging.info("teacher cache: top-%d KL error on %d tokens against the reference: kd "
                     "dense %.5f, top-k %.5f, |difference| %.2e; per-token |error| mean %.2e, "
                     "max %.2e", settings.top_k, kl_error["tokens"], kl_error["kd_dense"],
                     kl_error["kd_top_k"], kl_error["kd_abs_error"],
                     kl_error["per_token_abs_error_mean"], kl_error["per_token_abs_error_max"])
    if distributed.is_primary():
        directory.mkdir(parents=True, exist_ok=True)
        number = len(list(directory.glob("shard-*.npz")))
        _write_npz(directory / f"shard-{number:05d}.npz", {**shard, "fingerprint": fingerprint})
        if manifest is None:
            manifest = {"fingerprint": fingerprint, "version": CACHE_VERSION,
                        **dataclasses.asdict(settings), "kl_error": kl_error}
            manifest.pop("batch_size")
            tmp = manifest_path.with_name(MANIFEST + ".tmp")
            tmp.write_text(json.dumps(manifest, indent=2) + "\n")
            os.replace(tmp, manifest_path)
    return cache


def _score_examples(cache: TeacherCache, missing: list[int], teacher: Llama, teacher_params,
                    pad_id: int, reference: tuple[Llama, Any] | None):
    """Run the teacher on the `missing` examples; return (shard arrays, KL error or None)."""
    settings = cache.settings

    @jax.jit
    def score(params, batch):
        logits, valid = _scored_logits(teacher, params, batch, settings.max_target_tokens)
        indices, log_probs = losses.teacher_top_k(logits, settings.top_k, settings.temperature)
        tail = losses.teacher_tail_log_mass(logits, indices, settings.temperature)
        return indices, log_probs, tail, valid

    # Sorted by length, so each forward pads little. The last batch is filled up with copies of
    # its last example, so every forward has as many rows and compiles once per length.
    order = sorted(missing, key=lambda i: len(cache.examples[i].input_ids))
    max_len = max(len(cache.examples[i].input_ids) for i in order)
    per_example: dict[int, tuple[np.ndarray, ...]] = {}
    kl_error = None
    for start in range(0, len(order), settings.batch_size):
        chosen = order[start:start + settings.batch_size]
        filled = chosen + [chosen[-1]] * (settings.batch_size - len(chosen))
        batch = batching.pad_batch([cache.examples[i] for i in filled], pad_id, PAD_MULTIPLE,
                                   max_seq_len=max_len + PAD_MULTIPLE)
        indices, log_probs, tail, valid = jax.device_get(score(teacher_params, batch))
        for row, index in enumerate(chosen):
            count = int(valid[row].sum())
            per_example[index] = (indices[row, :count], log_probs[row, :count], tail[row, :count])
        if reference is not None and kl_error is None:
            kl_error = _reference_kl_error(reference, teacher, teacher_params, batch, settings)
    counts = [len(per_example[i][2]) for i in missing]
    shard = {
        "example_indices": np.asarray(missing, np.int64),
        "offsets": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        "indices": np.concatenate([per_example[i][0] for i in missing]).astype(np.int32),
        "log_probs": np.concatenate([per_example[i][1] for i in missing]).astype(np.float32),
        "tail_log_mass": np.concatenate([per_example[i][2] for i in missing]).astype(np.float32),
    }
    return shard, kl_error


def _reference_kl_error(reference: tuple[Llama, Any], teacher: Llama, teacher_params, batch,
                        settings: CacheSettings) -> dict[str, float]:
    model, params = reference
    teacher_logits, valid = jax.jit(
        lambda p, b: _scored_logits(teacher, p, b, settings.max_target_tokens))(
            teacher_params, batch)
    student_logits, _ = jax.jit(
        lambda p, b: _scored_logits(model, p, b, settings.max_target_tokens))(params, batch)
    return top_k_kl_error(student_logits, teacher_logits, valid, settings.top_k,
                          settings.temperature)
