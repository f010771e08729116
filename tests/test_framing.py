"""Instruction frames around training prompts."""

import numpy as np

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
