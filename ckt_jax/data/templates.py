"""pyrit jailbreak templates: loading, the fixed evaluation set and the training pool.

pyrit 1.1.0 stores each template as YAML whose ``value`` is a Jinja2 template with a
``{{ prompt }}`` slot. Most wrap their literal text in ``{% raw %}`` ... ``{% endraw %}``, and a
few write literal braces as ``{{ '{{' }}``. This module renders that small subset itself instead
of depending on Jinja2.
"""

from __future__ import annotations

import dataclasses
import functools
import random
import re

import yaml

from ckt_jax.data import sources

# The canonical slot in Template.text; wrap() also accepts spacing variants such as {{prompt}}.
SLOT = "{{ prompt }}"
_SLOT_PATTERN = re.compile(r"\{\{-?\s*prompt\s*-?\}\}")
_RAW_TAG = re.compile(r"\{%-?\s*(raw|endraw)\s*-?%\}")
_STRING_LITERAL = re.compile(r"\{\{-?\s*'([^']*)'\s*-?\}\}")
_OTHER_EXPRESSION = re.compile(r"\{\{.*?\}\}|\{%.*?%\}", re.DOTALL)

EVAL_TEMPLATE_COUNT = 5
EVAL_TEMPLATE_SEED = 20240611
# Evaluation prompts are generated on CPU, so evaluation templates stay short.
EVAL_TEMPLATE_MAX_CHARS = 2000
TRAIN_TEMPLATE_FOLDER = "in_the_wild"


@dataclasses.dataclass(frozen=True)
class Template:
    """A rendered jailbreak template.

    ``name`` is the path below pyrit's templates folder without ``.yaml`` (``aim`` or
    ``in_the_wild/trustairlab_...``), ``title`` the YAML ``name`` field, and ``text`` the
    template with every prompt slot written as SLOT.
    """

    name: str
    title: str
    text: str

    @property
    def folder(self) -> str:
        """Subfolder below pyrit's templates folder, "" for a top-level template."""
        return self.name.rpartition("/")[0]


def render(value: str) -> str:
    """Render a pyrit template value with the prompt slot kept as SLOT.

    Text between ``{% raw %}`` and ``{% endraw %}`` is kept literally. Outside raw blocks, string
    literals such as ``{{ '{{' }}`` become their text and prompt slots become SLOT. Raises
    ValueError on any other Jinja expression, because only single-parameter templates are supported.
    """
    pieces = []
    in_raw = False
    position = 0
    for match in _RAW_TAG.finditer(value):
        pieces.append((in_raw, value[position:match.start()]))
        in_raw = match.group(1) == "raw"
        position = match.end()
    pieces.append((in_raw, value[position:]))

    rendered = []
    for is_raw, piece in pieces:
        if is_raw:
            rendered.append(piece)
            continue
        piece = _SLOT_PATTERN.sub(lambda _: SLOT, piece)
        piece = _STRING_LITERAL.sub(lambda m: m.group(1), piece)
        leftover = [m.group(0) for m in _OTHER_EXPRESSION.finditer(piece) if m.group(0) != SLOT]
        if leftover:
            raise ValueError(f"unsupported Jinja expression {leftover[0]!r} in template")
        rendered.append(piece)
    text = "".join(rendered)
    if SLOT not in text:
        raise ValueError("template has no {{ prompt }} slot outside raw blocks")
    return text


def wrap(template: Template | str, prompt: str) -> str:
    """Return ``template`` with every prompt slot replaced by ``prompt``.

    ``template`` is a Template or a rendered text; slot spacing variants such as ``{{prompt}}``
    are accepted.
    """
    text = template.text if isinstance(template, Template) else template
    if not _SLOT_PATTERN.search(text):
        raise ValueError("template has no {{ prompt }} slot")
    return _SLOT_PATTERN.sub(lambda _: prompt, text)


@functools.cache
def load_templates() -> tuple[Template, ...]:
    """Load every single-parameter pyrit jailbreak template, sorted by name.

    Templates with parameters besides ``prompt`` (three files in pyrit's ``multi_parameter/``
    folder, including the many-shot template) are skipped, so the many-shot example file is never
    read.
    """
    root = sources.jailbreak_templates_root()
    loaded = []
    for path in sources.jailbreak_template_files():
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(document, dict) or document.get("parameters") != ["prompt"]:
            continue
        name = path.relative_to(root).with_suffix("").as_posix()
        try:
            text = render(document["value"])
        except ValueError as error:
            raise ValueError(f"invalid jailbreak template {path}: {error}") from error
        loaded.append(Template(name=name, title=str(document.get("name", name)), text=text))
    return tuple(sorted(loaded, key=lambda template: template.name))


def _template_key(template: Template) -> str:
    return sources.normalize_text(template.text)


@functools.cache
def eval_templates() -> tuple[Template, ...]:
    """Return the fixed evaluation templates.

    EVAL_TEMPLATE_COUNT top-level templates of at most EVAL_TEMPLATE_MAX_CHARS characters, drawn
    with ``random.Random(EVAL_TEMPLATE_SEED)`` from the name-sorted candidates. The choice changes
    only if pyrit's template set changes.
    """
    candidates = [template for template in load_templates()
                  if template.folder == "" and len(template.text) <= EVAL_TEMPLATE_MAX_CHARS]
    if len(candidates) < EVAL_TEMPLATE_COUNT:
        raise ValueError(f"only {len(candidates)} top-level templates of at most "
                         f"{EVAL_TEMPLATE_MAX_CHARS} characters; need {EVAL_TEMPLATE_COUNT}")
    chosen = random.Random(EVAL_TEMPLATE_SEED).sample(candidates, EVAL_TEMPLATE_COUNT)
    return tuple(sorted(chosen, key=lambda template: template.name))


def train_templates(max_chars: int = 4000) -> list[Template]:
    """Return the training templates: ``in_the_wild/`` templates of at most ``max_chars`` characters.

    A template is left out when its title or normalized text matches an evaluation template, and
    when its normalized text repeats an earlier training template.
    """
    held_out = eval_templates()
    held_out_titles = {template.title.casefold() for template in held_out}
    seen = {_template_key(template) for template in held_out}
    chosen = []
    for template in load_templates():
        if template.folder != TRAIN_TEMPLATE_FOLDER or len(template.text) > max_chars:
            continue
        key = _template_key(template)
        if template.title.casefold() in held_out_titles or key in seen:
            continue
        seen.add(key)
        chosen.append(template)
    return chosen
