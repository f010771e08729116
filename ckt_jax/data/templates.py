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
# Outside raw blocks: a raw tag, an expression that is a quoted string literal or a bare
# variable name, or the start of any other Jinja construct (which render() rejects).
_TOKEN = re.compile(r"""\{%-?\s*raw\s*-?%\}"""
                    r"""|\{\{-?\s*(?:'([^']*)'|"([^"]*)"|([A-Za-z_]\w*))\s*-?\}\}"""
                    r"""|\{\{|\{%|\{#""")
_END_RAW = re.compile(r"\{%-?\s*endraw\s*-?%\}")

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
    rendered = []
    slots = 0
    position = 0
    while True:
        match = _TOKEN.search(value, position)
        if match is None:
            rendered.append(value[position:])
            break
        rendered.append(value[position:match.start()])
        token = match.group(0)
        if token.startswith("{%") and len(token) > 2:
            # Jinja ends a raw block at the first endraw tag, even one inside quotes.
            end = _END_RAW.search(value, match.end())
            if end is None:
                raise ValueError("template has a raw block without an endraw tag")
            rendered.append(value[match.end():end.start()])
            position = end.end()
            continue
        literal = match.group(1) if match.group(1) is not None else match.group(2)
        if literal is not None:
            rendered.append(literal)
        elif match.group(3) == "prompt":
            rendered.append(SLOT)
            slots += 1
        else:
            snippet = value[match.start():match.start() + 40]
            raise ValueError(f"unsupported Jinja syntax {snippet!r} in template")
        position = match.end()
    if not slots:
        raise ValueError("template has no {{ prompt }} slot outside raw blocks")
    return "".join(rendered)


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
