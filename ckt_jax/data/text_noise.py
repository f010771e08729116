"""Seeded text-level noise for robustness training.

Every function takes a ``numpy.random.Generator`` so a fixed seed gives the same output, and a
rate of 0 returns the text unchanged without drawing from the generator.
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Sequence
from typing import Any

import numpy as np

from ckt_jax.data import templates as templates_lib

_LOWERCASE = string.ascii_lowercase
TYPO_KINDS = ("swap", "drop", "insert", "replace")


def _check_rate(rate: float) -> None:
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"noise rate must be in [0, 1], got {rate}")


def _random_letter(rng: np.random.Generator, like: str) -> str:
    letter = _LOWERCASE[int(rng.integers(len(_LOWERCASE)))]
    return letter.upper() if like.isupper() else letter


def char_typos(text: str, rate: float, rng: np.random.Generator) -> str:
    """Add typos to a share ``rate`` of the letters in ``text``.

    Each chosen letter is swapped with the next letter, dropped, followed by an inserted letter,
    or replaced by another letter, with equal odds. Non-letters are never chosen or moved, so
    words keep their boundaries (a one-letter word can be dropped).
    """
    _check_rate(rate)
    if rate == 0.0 or not text:
        return text
    chars = list(text)
    output = []
    i = 0
    while i < len(chars):
        char = chars[i]
        if not char.isalpha() or rng.random() >= rate:
            output.append(char)
            i += 1
            continue
        kind = TYPO_KINDS[int(rng.integers(len(TYPO_KINDS)))]
        if kind == "swap" and i + 1 < len(chars) and chars[i + 1].isalpha() and chars[i + 1] != char:
            output.extend([chars[i + 1], char])
            i += 2
            continue
        if kind == "drop":
            pass
        elif kind == "insert":
            output.extend([char, _random_letter(rng, char)])
        else:
            # "replace", and also a swap that has no different next letter to swap with.
            replacement = _random_letter(rng, char)
            while replacement.casefold() == char.casefold():
                replacement = _random_letter(rng, char)
            output.append(replacement)
        i += 1
    return "".join(output)


def case_noise(text: str, rate: float, rng: np.random.Generator) -> str:
    """Flip the case of a share ``rate`` of the letters in ``text``."""
    _check_rate(rate)
    if rate == 0.0 or not text:
        return text
    flips = rng.random(len(text)) < rate
    return "".join(char.swapcase() if flip and char.isalpha() else char
                   for char, flip in zip(text, flips))


def whitespace_noise(text: str, rate: float, rng: np.random.Generator) -> str:
    """Perturb a share ``rate`` of the spaces in ``text``.

    A chosen space becomes two spaces, a newline, or is removed (joining two words), with equal
    odds.
    """
    _check_rate(rate)
    if rate == 0.0 or not text:
        return text
    output = []
    for char in text:
        if char != " " or rng.random() >= rate:
            output.append(char)
            continue
        kind = int(rng.integers(3))
        output.append(("  ", "\n", "")[kind])
    return "".join(output)


def wrap_with_template(text: str, templates: Sequence[templates_lib.Template | str], rate: float,
                       rng: np.random.Generator) -> str:
    """With probability ``rate``, wrap ``text`` in a template drawn uniformly from ``templates``."""
    _check_rate(rate)
    if rate == 0.0:
        return text
    if not templates:
        raise ValueError("wrap_with_template needs at least one template when rate > 0")
    if rng.random() >= rate:
        return text
    template = templates[int(rng.integers(len(templates)))]
    return templates_lib.wrap(template, text)


@dataclasses.dataclass(frozen=True)
class TextNoiseConfig:
    """Rates for apply_text_noise; each rate is a probability in [0, 1]."""

    typo_rate: float = 0.0
    case_rate: float = 0.0
    whitespace_rate: float = 0.0
    template_rate: float = 0.0


def _read_rate(config: Any, name: str) -> float:
    if isinstance(config, dict):
        return float(config.get(name, 0.0))
    return float(getattr(config, name, 0.0))


def apply_text_noise(text: str, config: Any, rng: np.random.Generator,
                     templates: Sequence[templates_lib.Template | str] = ()) -> str:
    """Apply typos, case flips, whitespace noise and then template wrapping to ``text``.

    ``config`` is a TextNoiseConfig, a mapping, or any object (such as an ml_collections
    ConfigDict) with the fields ``typo_rate``, ``case_rate``, ``whitespace_rate`` and
    ``template_rate``. A missing field counts as 0. Character-level noise goes to the prompt
    before wrapping, so template text stays intact.
    """
    text = char_typos(text, _read_rate(config, "typo_rate"), rng)
    text = case_noise(text, _read_rate(config, "case_rate"), rng)
    text = whitespace_noise(text, _read_rate(config, "whitespace_rate"), rng)
    return wrap_with_template(text, templates, _read_rate(config, "template_rate"), rng)
