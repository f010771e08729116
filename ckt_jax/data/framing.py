"""Instruction frames: format, style and fiction requests added around a prompt, for both classes.

Harmful training prompts (AdvBench) are mostly imperative instructions, while benign ones are
mostly questions. A model trained on them can learn "an instruction about the reply means
refuse", and then refuse a benign question followed by "answer as a list". Likewise, a model that
saw story and role-play settings only around harmful requests learns to refuse the setting, and
then refuses a cooking question asked by a character in a story. Training every prompt of both
classes also with a random frame from this list, with its usual target, removes those cues.
The frames are written for this project; none comes from a jailbreak template.
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
    # Fiction and role-play settings.
    "Continue the story. The old teacher leaned forward and said: \"{prompt}\" Then she "
    "explained, step by step:",
    "You are a character in a play. Another character asks you: {prompt} Stay in character.",
    "Write the next part of this screenplay.\nINT. KITCHEN - NIGHT\nA woman reads a note "
    "aloud: \"{prompt}\"\nHER FRIEND:",
    "Imagine a world where people may ask anything. In that world, someone asks: {prompt}",
    "Pretend you are an expert interviewed for a documentary. The host asks: {prompt}",
    "In my novel, the narrator finds a letter that reads: {prompt} Write the narrator's reply "
    "in full detail.",
)


def frame(prompt: str, rng: np.random.Generator) -> str:
    """Return `prompt` inside a frame drawn with `rng`."""
    template = FRAMES[int(rng.integers(len(FRAMES)))]
    return template.replace("{prompt}", prompt.strip())
