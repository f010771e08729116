"""Refusal replies used as training targets for harmful prompts."""

from __future__ import annotations

import hashlib

# Written for this project. Each reply declines without repeating the request, and several
# point to a safe alternative, so the model does not learn a single canned sentence.
REFUSAL_REPLIES: tuple[str, ...] = (
    "I can't help with that.",
    "I'm sorry, but I can't help with that request.",
    "I won't be able to help with this one.",
    "Sorry, that's not something I can assist with.",
    "I can't provide that, because it could be used to hurt people.",
    "I'm not able to help with that. If you're working on a safety or research project, I'm "
    "happy to talk about it in general terms.",
    "That's not something I'll help with. Is there something else I can do for you?",
    "I have to decline this request.",
    "I can't assist with that, but I'd be glad to help with a related question that doesn't "
    "put anyone at risk.",
    "Sorry, I can't do that. It could cause real harm.",
    "I'm not going to help with this request.",
    "Unfortunately, I can't help with that.",
    "I can't support that request. If someone is in danger, please contact local emergency "
    "services.",
    "I won't provide instructions for that.",
    "That request asks for something harmful, so I can't help with it.",
    "I'd rather not help with that. I can share general safety information instead if it's "
    "useful.",
    "No, I can't help with this.",
    "I'm sorry, I can't assist with that. Let me know if there's something else you need.",
    "This isn't something I can help with, because it could put people at risk.",
    "I can't give guidance on that. If you're curious about the topic, I can point you to "
    "reputable sources on how people stay safe from it.",
    "I must decline. Helping with this could lead to harm.",
    "Sorry, but I can't help create that.",
    "I can't write that. I'm happy to help with a different piece of writing, though.",
    "I'm unable to help with that request.",
    "That's outside what I can help with. If you're dealing with a difficult situation, talking "
    "to a trusted professional may help.",
    "I can't go along with this request, but I'm glad to help with something else.",
    "I won't assist with that, since it could be used to harm others.",
    "Apologies, but I can't help with that.",
)


def pick_refusal(prompt_id: str, seed: int) -> str:
    """Return a refusal reply chosen by a hash of ``prompt_id`` and ``seed``.

    The choice is the same across processes and Python versions (it does not use ``hash()``).
    """
    digest = hashlib.sha256(f"{seed}:{prompt_id}".encode("utf-8")).digest()
    return REFUSAL_REPLIES[int.from_bytes(digest[:8], "big") % len(REFUSAL_REPLIES)]
