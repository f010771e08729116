"""Chat tokenizer built on the ``tokenizers`` library and the model's own Jinja chat template.

A GGUF file carries its tokenizer in its metadata. ``ChatTokenizer.from_gguf`` builds it once
with ``tokenizers`` and caches ``tokenizer.json`` plus the template in a directory. Neither
transformers nor torch is needed at any point.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import shutil

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers
import tokenizers.decoders
import tokenizers.models
import tokenizers.pre_tokenizers

from ckt_jax.workdir import error_summary

logger = logging.getLogger(__name__)

DEFAULT_CACHE_ROOT = pathlib.Path("~/.cache/ckt_jax/tokenizers")
# The tokenizer and template live in the GGUF metadata at the start of the file, well inside
# the first 8 MiB for SmolLM2 (its metadata ends at 1.7 MiB). Hashing this prefix keys the cache.
_HASHED_PREFIX_BYTES = 8 << 20
# Bump when build_gguf_tokenizer changes what it writes, so that old caches are not reused.
_CACHE_FORMAT = b"ckt_jax-gguf-tokenizer-v1"


def _gguf_cache_key(gguf_path: pathlib.Path) -> str:
    digest = hashlib.sha256(_CACHE_FORMAT)
    with open(gguf_path, "rb") as handle:
        digest.update(handle.read(_HASHED_PREFIX_BYTES))
    return digest.hexdigest()[:16]


def _token_content(value) -> str | None:
    """Read a special token from tokenizer_config.json, where it is a string or a dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _raise_template_exception(message):
    raise jinja2.exceptions.TemplateError(message)


class ChatTokenizer:
    """Byte-level BPE tokenizer plus a chat template, with special-token ids."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, chat_template: str, eos_token: str,
                 pad_token: str | None = None, bos_token: str | None = None):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.eos_token = eos_token
        self.bos_token = bos_token
        self.pad_token = pad_token if pad_token is not None else eos_token
        self.eos_id = self._special_id(eos_token, "eos_token")
        self.pad_id = self._special_id(self.pad_token, "pad_token")
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        # Sandboxed like transformers' apply_chat_template, with trim_blocks/lstrip_blocks,
        # so templates written for Hugging Face render the same text.
        environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        environment.globals["raise_exception"] = _raise_template_exception
        environment.filters["tojson"] = lambda value, indent=None: json.dumps(
            value, ensure_ascii=False, indent=indent)
        self._template = environment.from_string(chat_template)

    def _special_id(self, token: str, role: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{role} {token!r} is not in the tokenizer vocabulary; check "
                             "tokenizer_config.json")
        return token_id

    @classmethod
    def from_hf_directory(cls, directory) -> "ChatTokenizer":
        """Load ``tokenizer.json`` and the chat template from a Hugging Face directory.

        The template is read from ``chat_template.jinja`` (transformers 5 writes it there) or
        else from ``tokenizer_config.json``'s ``chat_template`` key.
        """
        directory = pathlib.Path(directory)
        tokenizer_path = directory / "tokenizer.json"
        config_path = directory / "tokenizer_config.json"
        for required in (tokenizer_path, config_path):
            if not required.is_file():
                raise FileNotFoundError(f"{required} not found; pass a directory written by a "
                                        "Hugging Face tokenizer's save_pretrained")
        tokenizer_config = json.loads(config_path.read_text())
        template_path = directory / "chat_template.jinja"
        if template_path.is_file():
            chat_template = template_path.read_text()
        else:
            chat_template = tokenizer_config.get("chat_template")
        if not isinstance(chat_template, str):
            raise ValueError(f"{directory} has no chat template (neither chat_template.jinja nor "
                             "a string chat_template in tokenizer_config.json)")
        eos_token = _token_content(tokenizer_config.get("eos_token"))
        if eos_token is None:
            raise ValueError(f"{config_path} has no eos_token")
        return cls(tokenizers.Tokenizer.from_file(str(tokenizer_path)), chat_template, eos_token,
                   pad_token=_token_content(tokenizer_config.get("pad_token")),
                   bos_token=_token_content(tokenizer_config.get("bos_token")))

    @classmethod
    def from_gguf(cls, gguf_path, cache_dir=None) -> "ChatTokenizer":
        """Load the tokenizer stored in a GGUF file's metadata.

        On first use it is built from the metadata and saved to ``cache_dir``
        (default ``~/.cache/ckt_jax/tokenizers/<sha256 of the file's first 8 MiB>``).
        Later calls read only the cache.
        """
        gguf_path = pathlib.Path(gguf_path)
        if not gguf_path.is_file():
            raise FileNotFoundError(f"GGUF file {gguf_path} not found")
        if cache_dir is None:
            cache_dir = DEFAULT_CACHE_ROOT.expanduser() / _gguf_cache_key(gguf_path)
        cache_dir = pathlib.Path(cache_dir)
        if not (cache_dir / "tokenizer.json").is_file():
            _convert_gguf_tokenizer(gguf_path, cache_dir)
        try:
            return cls.from_hf_directory(cache_dir)
        except Exception as err:  # noqa: BLE001 - the tokenizers library raises plain Exception.
            # The cache holds only what the GGUF file rebuilds, so a damaged one is replaced.
            logger.warning("tokenizer cache %s is unreadable (%s); building it again",
                           cache_dir, error_summary(err))
            for name in ("tokenizer.json", "tokenizer_config.json"):
                (cache_dir / name).unlink(missing_ok=True)
            if not any(cache_dir.iterdir()):
                cache_dir.rmdir()
            _convert_gguf_tokenizer(gguf_path, cache_dir)
            return cls.from_hf_directory(cache_dir)

    def save_pretrained(self, directory) -> None:
        """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``chat_template.jinja``.

        transformers 5.25's ``AutoTokenizer`` and ``from_hf_directory`` both read the result.
        ``tokenizer_class`` names the generic class that uses ``tokenizer.json`` as is, because
        a model-specific class (for example the Llama one) may rebuild the pre-tokenizer.
        """
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(directory / "tokenizer.json"))
        tokenizer_config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "bos_token": self.bos_token,
            "clean_up_tokenization_spaces": False,
            # Older transformers versions read the template from here, 5.x from the .jinja file.
            "chat_template": self.chat_template,
        }
        (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2)
                                                         + "\n")
        (directory / "chat_template.jinja").write_text(self.chat_template)

    def encode(self, text: str) -> list[int]:
        """Tokenize ``text`` without adding special tokens."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([int(i) for i in ids],
                                     skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """Render ``messages`` (dicts with ``role`` and ``content``) with the chat template."""
        return self._template.render(messages=messages,
                                     add_generation_prompt=add_generation_prompt,
                                     eos_token=self.eos_token, bos_token=self.bos_token,
                                     pad_token=self.pad_token)

    def encode_chat(self, prompt: str, reply: str | None = None,
                    system: str | None = None) -> tuple[list[int], list[int]]:
        """Tokenize a one-turn chat and mark the reply tokens for the loss.

        Returns ``(input_ids, loss_mask)``. Without ``reply``: the rendered prompt with the
        generation prompt, all mask 0. With ``reply``: the ids of the whole rendered
        conversation, where mask 1 marks exactly the reply's tokens and the end-of-turn token
        (eos) that follows it. Whatever the template appends after that (a newline) gets 0.
        """
        messages = []
        if system is not None:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": prompt})
        prompt_text = self.render_chat(messages, add_generation_prompt=True)
        if reply is None:
            ids = self.encode(prompt_text)
            return ids, [0] * len(ids)

        full_text = self.render_chat(messages + [{"role": "assistant", "content": reply}],
                                     add_generation_prompt=False)
        reply_start = len(prompt_text)
        reply_end = reply_start + len(reply)
        if not full_text.startswith(prompt_text) or full_text[reply_start:reply_end] != reply:
            raise ValueError("the chat template does not render the conversation as the "
                             "generation prompt followed by the reply text, so the reply's "
                             "tokens cannot be located")
        if not full_text.startswith(self.eos_token, reply_end):
            raise ValueError(f"the chat template does not put {self.eos_token!r} right after "
                             "the reply; cannot mark the end-of-turn token")
        target_end = reply_end + len(self.eos_token)

        encoding = self.tokenizer.encode(full_text, add_special_tokens=False)
        # A token is a reply token when its characters lie inside [reply_start, target_end).
        # A token that straddles reply_start (whitespace merged across the boundary) counts as
        # prompt, because it would be given to the model, not predicted.
        loss_mask = [int(start >= reply_start and end <= target_end and end > start)
                     for start, end in encoding.offsets]
        return encoding.ids, loss_mask


_GGUF_CONTROL_TOKEN = 3  # llama.cpp token type for special tokens such as <|im_end|>


def _gguf_metadata(reader, key, gguf_path):
    field = reader.fields.get(key)
    if field is None:
        raise ValueError(f"GGUF file {gguf_path} has no {key!r} metadata, so its tokenizer "
                         "cannot be built")
    return field.contents()


def build_gguf_tokenizer(gguf_path) -> tuple[tokenizers.Tokenizer, dict]:
    """Build a byte-level BPE tokenizer from GGUF metadata (``tokenizer.ggml.model == 'gpt2'``).

    Returns the tokenizer and a tokenizer_config dict with the chat template and the special
    tokens. The structure matches what transformers 5.25's GGUF converter produces for
    SmolLM2 (a test compares the ids), but this needs neither transformers nor torch, which
    transformers' GGUF reader imports.
    """
    import gguf

    reader = gguf.GGUFReader(gguf_path)
    model_type = _gguf_metadata(reader, "tokenizer.ggml.model", gguf_path)
    if model_type != "gpt2":
        raise ValueError(f"GGUF file {gguf_path} has tokenizer model {model_type!r}; only "
                         "'gpt2' (byte-level BPE) is supported")
    tokens = _gguf_metadata(reader, "tokenizer.ggml.tokens", gguf_path)
    token_types = _gguf_metadata(reader, "tokenizer.ggml.token_type", gguf_path)
    merges = [tuple(merge.split(" ", 1))
              for merge in _gguf_metadata(reader, "tokenizer.ggml.merges", gguf_path)]

    bpe = tokenizers.models.BPE(vocab={token: i for i, token in enumerate(tokens)},
                                merges=merges, continuing_subword_prefix="",
                                end_of_word_suffix="", fuse_unk=False, byte_fallback=False)
    tokenizer = tokenizers.Tokenizer(bpe)
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                  use_regex=True)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    tokenizer.add_special_tokens([
        tokenizers.AddedToken(token, special=True, normalized=False)
        for token, token_type in zip(tokens, token_types) if token_type == _GGUF_CONTROL_TOKEN])

    def special_token(role):
        field = reader.fields.get(f"tokenizer.ggml.{role}_token_id")
        return None if field is None else tokens[int(field.contents())]

    tokenizer_config = {
        "chat_template": _gguf_metadata(reader, "tokenizer.chat_template", gguf_path),
        "eos_token": special_token("eos"),
        "pad_token": special_token("padding"),
        "bos_token": special_token("bos"),
    }
    return tokenizer, tokenizer_config


def _convert_gguf_tokenizer(gguf_path: pathlib.Path, cache_dir: pathlib.Path) -> None:
    """Build the GGUF file's tokenizer and save it into ``cache_dir``."""
    logger.info("building the tokenizer of %s into %s", gguf_path, cache_dir)
    tokenizer, tokenizer_config = build_gguf_tokenizer(gguf_path)
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    # Write into a temporary sibling, then rename, so an interrupted run leaves no partial cache.
    partial_dir = cache_dir.with_name(f"{cache_dir.name}.partial-{os.getpid()}")
    partial_dir.mkdir(exist_ok=True)
    tokenizer.save(str(partial_dir / "tokenizer.json"))
    (partial_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    try:
        partial_dir.rename(cache_dir)
    except OSError:
        # Another process may have finished first, and its copy is equivalent.
        if not (cache_dir / "tokenizer.json").is_file():
            raise
        shutil.rmtree(partial_dir, ignore_errors=True)
