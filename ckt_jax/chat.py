"""Chat with a model: the chat template applied to a growing conversation, replies streamed.

``ChatSession`` keeps the messages of one conversation. Each ``reply`` renders the whole
conversation with the tokenizer's chat template, decodes the continuation with the KV cache
(``generate.stream_generate``) and passes text pieces to a callback as tokens arrive.
"""

from __future__ import annotations

from typing import Callable

import jax

from ckt_jax.generate import stream_generate
from ckt_jax.model import Llama
from ckt_jax.tokenizer import ChatTokenizer


class StreamDecoder:
    """Turns a growing list of token ids into new text pieces.

    A byte-level BPE token can end inside a multi-byte UTF-8 character, which decodes to U+FFFD
    until the next token completes it, so a piece that ends in U+FFFD is held back.
    """

    def __init__(self, tokenizer: ChatTokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def add(self, token_id: int) -> str:
        """Append one token and return the text it completes (possibly empty)."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece = text[len(self.text):]
        self.text = text
        return piece

    def flush(self) -> str:
        """Return whatever text is still held back (an incomplete character at the end)."""
        text = self.tokenizer.decode(self.ids)
        piece = text[len(self.text):]
        self.text = text
        return piece


class ChatSession:
    """One conversation with a model; ``reply`` appends the user turn and the model's reply."""

    def __init__(self, model: Llama, params, tokenizer: ChatTokenizer, *, system: str = "",
                 max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                 rng: jax.Array | None = None):
        self.model = model
        self.params = params
        self.tokenizer = tokenizer
        self.system = system
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.rng = jax.random.key(0) if rng is None else rng
        self.messages: list[dict] = []
        self.reset()

    def reset(self) -> None:
        """Forget the conversation; the system message, if any, stays."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def reply(self, user_text: str, on_text: Callable[[str], None] | None = None) -> str:
        """Generate the reply to ``user_text`` in context and return it; ``on_text`` gets each piece."""
        self.messages.append({"role": "user", "content": user_text})
        prompt = self.tokenizer.render_chat(self.messages, add_generation_prompt=True)
        prompt_ids = self.tokenizer.encode(prompt)
        self.rng, key = jax.random.split(self.rng)
        decoder = StreamDecoder(self.tokenizer)
        tokens = stream_generate(self.model, self.params, prompt_ids,
                                 max_new_tokens=self.max_new_tokens, eos_id=self.tokenizer.eos_id,
                                 rng=key, temperature=self.temperature, top_p=self.top_p)
        for token_id in tokens:
            piece = decoder.add(token_id)
            if piece and on_text is not None:
                on_text(piece)
        rest = decoder.flush()
        if rest and on_text is not None:
            on_text(rest)
        self.messages.append({"role": "assistant", "content": decoder.text})
        return decoder.text
