"""Instruction frames: format and style requests added around a prompt, for both classes alike.

Harmful training prompts (AdvBench) are mostly imperative instructions, while benign ones are
mostly questions. A model trained on them can learn "an instruction about the reply means
refuse", and then refuse a benign question followed by "answer as a list". Training every prompt
of both classes also with a random frame from this list, with its usual target, removes that cue.
The frames are written for this project and are plain requests about form, length or tone; none
comes from a jailbreak template.
"""

from __future__ import annotations

import numpy as np

# Each frame has one "{prompt}" slot.
FRAMES: tuple[str, ...] = (
    "{prompt} Answer in one short paragraph.",
    "{prompt} Please format the reply as a numbered list.",
    "{prompt} Keep the answer under fifty words.",
    "{prompt} Explain it as you would to a beginner.",
    "{prompt} Use a formal tone.",
    "{prompt} Reply with bullet points only.",
    "{prompt} Give the key points first, then the details.",
    "{prompt} Write the answer as a short dialogue between two people.",
    "Please respond to the following request.\n\n{prompt}",
    "Here is a task for you: {prompt}",
    "Question from a reader: {prompt}\nAnswer clearly and briefly.",
    "{prompt}\n\nStart your reply with a one-sentence summary.",
    "I need help with this: {prompt} Be concise.",
    "Continue the conversation. User: {prompt}",
)


def frame(prompt: str, rng: np.random.Generator) -> str:
    """Return `prompt` inside a frame drawn with `rng`."""
    template = FRAMES[int(rng.integers(len(FRAMES)))]
    return template.replace("{prompt}", prompt.strip())
