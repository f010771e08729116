"""Instruction frames around training prompts."""

import numpy as np
import pytest

from ckt_jax.data import framing


def test_every_frame_keeps_prompt():
    for template in framing.FRAMES:
        assert template.count("{prompt}") == 1, template
        framed = template.replace("{prompt}", "What is the boiling point of water?")
        assert "What is the boiling point of water?" in framed


def test_frame_is_seeded():
    a = [framing.frame("Name three rivers.", np.random.default_rng(3)) for _ in range(2)]
    assert a[0] == a[1]
    drawn = {framing.frame("Name three rivers.", np.random.default_rng(seed)) for seed in range(40)}
    assert len(drawn) > 5
    assert all("Name three rivers." in text for text in drawn)


def _word_ngrams(text, n):
    words = text.lower().split()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


@pytest.mark.real
def test_frames_share_no_phrase_with_eval_templates():
    # The frames are written for this project, so no run of 5 words may come from a held-out
    # evaluation template, or the evaluation would measure memorised wrappers.
    from ckt_jax.data import templates
    frame_ngrams = set().union(*(_word_ngrams(t.replace("{prompt}", " "), 5)
                                 for t in framing.FRAMES))
    for template in templates.eval_templates():
        shared = frame_ngrams & _word_ngrams(template.text, 5)
        assert not shared, (template.name, shared)
