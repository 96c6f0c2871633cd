"""Chat templates: a model's Jinja2 template rendered over a conversation, as HF `apply_chat_template` does.

Templates come with downloaded models, so they are untrusted code: they run in Jinja2's immutable
sandbox. The environment matches what templates are written against: `trim_blocks`/`lstrip_blocks`,
the loop-control extension, a `{% generation %}` block (a no-op here), `raise_exception`,
`strftime_now`, and a `tojson` that keeps non-ASCII text and does not HTML-escape.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from kvengine.errors import ModelLoadError, RequestError


class _GenerationBlock(jinja2.ext.Extension):
    """Accepts `{% generation %}...{% endgeneration %}` (marks assistant text for training masks) and
    renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    return env


@lru_cache(maxsize=32)
def compile_chat_template(template: str) -> jinja2.Template:
    """The compiled template (cached by its text). A template that does not parse is a ModelLoadError."""
    try:
        return _environment().from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ModelLoadError(f"the model's chat template does not parse (line {e.lineno}): {e.message}"
                             ) from None


@lru_cache(maxsize=32)
def template_variables(template: str) -> frozenset[str]:
    """The names a template reads from its caller (messages, tools, add_generation_prompt, ...)."""
    try:
        return frozenset(jinja2.meta.find_undeclared_variables(_environment().parse(template)))
    except jinja2.exceptions.TemplateSyntaxError:
        return frozenset()


def render_chat_template(template: str, messages: Sequence[Mapping[str, Any]], *,
                         add_generation_prompt: bool = True, **variables: Any) -> str:
    """The prompt text for `messages`. `variables` reach the template as globals (bos_token, eos_token,
    tools, ...). A template that rejects the conversation (raise_exception, a bad field) is a RequestError."""
    compiled = compile_chat_template(template)
    try:
        return compiled.render(messages=[dict(m) for m in messages],
                               add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.exceptions.TemplateError as e:
        raise RequestError(f"the chat template rejected these messages: {e.message or type(e).__name__}",
                           param="messages") from None
    except (TypeError, KeyError, AttributeError, IndexError, ValueError) as e:
        raise RequestError(f"the chat template could not render these messages: {type(e).__name__}: {e}",
                           param="messages") from None
