"""Chat templates from GGUF metadata, rendered the way transformers' apply_chat_template does.

A GGUF file carries the model's Jinja2 chat template in `tokenizer.chat_template` (plus named
variants such as `tokenizer.chat_template.tool_use`). Templates are untrusted code from the model
download, so they run in jinja2's ImmutableSandboxedEnvironment with transformers' exact settings
(trim_blocks, lstrip_blocks, loopcontrols) and helpers (raise_exception, strftime_now, a
non-HTML-escaping tojson), so a prompt renders byte-for-byte as transformers / vLLM render it.

Every failure caused by the request or the template is a ChatTemplateError (a NumoeError), which
the server turns into an HTTP 400.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from cluster.errors import NumoeError
from cluster.gguf import GGUFFile
from cluster.tokenizer import Tokenizer

TEMPLATE_KEY = "tokenizer.chat_template"
# Names a message's reasoning may arrive under; templates (Qwen3, gpt-oss) read the first two.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(NumoeError):
    """A conversation cannot be rendered: bad messages, no template, or the template refused."""


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` renders its body unchanged.

    transformers uses the tag to mark assistant tokens for training masks; templates that carry it
    must still parse here, and at inference the mark has no effect.
    """

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(
            lineno
        )

    def _render_body(self, caller: Any) -> str:
        return caller()


class _TemplateDict:
    """`dict(...)` for templates without exposing the dict type itself (no type-hackery)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """jinja2's namespace() refusing underscore names, as transformers does: a dunder attribute
    stored on a namespace is a step toward CPython internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 — jinja2's own signature trick
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed names on a namespace ({name!r})"
            )


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"the chat template rejected the conversation: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # jinja2's own tojson HTML-escapes <, >, & and ' which would change the prompt text.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


def _plain(value: Any, where: str) -> Any:
    """A copy of value built only from JSON types: templates never see objects with methods."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ChatTemplateError(f"{where} has a non-string key {key!r}; use string keys")
            out[key] = _plain(item, f"{where}.{key}")
        return out
    if isinstance(value, list | tuple):
        return [_plain(item, f"{where}[{i}]") for i, item in enumerate(value)]
    raise ChatTemplateError(
        f"{where} is a {type(value).__name__}; chat messages may hold only JSON values "
        "(strings, numbers, booleans, null, lists, objects)"
    )


def _check_content(content: Any, where: str) -> None:
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise ChatTemplateError(
            f"{where}.content is a {type(content).__name__}; it must be a string or a list of "
            'content parts such as {"type": "text", "text": "..."}'
        )
    for j, part in enumerate(content):
        part_where = f"{where}.content[{j}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise ChatTemplateError(
                f'{part_where} must be an object with a string "type", e.g. '
                '{"type": "text", "text": "..."}'
            )
        if part["type"] == "text" and not isinstance(part.get("text"), str):
            raise ChatTemplateError(f'{part_where} has type "text" but no string "text" field')


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Checked, plain-JSON copy of an OpenAI-style message list, ready for a template.

    Keys whose value is null are dropped (OpenAI clients send content=null beside tool_calls, and
    templates handle a missing key but print a null as "None"), as transformers does.
    """
    if not isinstance(messages, list):
        raise ChatTemplateError(
            f"messages is a {type(messages).__name__}; it must be a list of "
            '{"role": ..., "content": ...} objects'
        )
    if not messages:
        raise ChatTemplateError("messages is empty; send at least one message")
    checked = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ChatTemplateError(
                f'{where} is a {type(message).__name__}; it must be an object with "role" and '
                '"content"'
            )
        message = {key: value for key, value in _plain(message, where).items()
                   if value is not None}
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ChatTemplateError(
                f'{where} has no string "role"; use "system", "user", "assistant" or "tool"'
            )
        if "content" in message:
            _check_content(message["content"], where)
        elif not (role == "assistant" and "tool_calls" in message):
            raise ChatTemplateError(
                f'{where} ({role}) has no "content"; only an assistant message with "tool_calls" '
                "may omit it"
            )
        reasoning = next((message[key] for key in _REASONING_FIELDS if key in message), None)
        if reasoning is not None:  # templates read different names for the same thing
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        checked.append(message)
    return checked


@dataclass(frozen=True)
class ChatTemplate:
    """A model's chat templates and the special-token texts they may print.

    templates maps a name to Jinja source: "default" is `tokenizer.chat_template`, others come
    from `tokenizer.chat_template.<name>`. It is empty for a model that ships no template.
    """

    templates: Mapping[str, str]
    bos_token: str
    eos_token: str
    _compiled: dict[str, jinja2.Template] = field(default_factory=dict, repr=False,
                                                  compare=False)

    @classmethod
    def from_gguf(cls, gguf: GGUFFile, tokenizer: Tokenizer,
                  template: str | None = None) -> ChatTemplate:
        """Templates from the file's metadata; template (e.g. from --chat-template) replaces the
        default one, for models that ship none or a broken one."""
        templates = {}
        for key, value in gguf.metadata.items():
            if key == TEMPLATE_KEY and isinstance(value, str):
                templates["default"] = value
            elif key.startswith(TEMPLATE_KEY + ".") and isinstance(value, str):
                templates[key[len(TEMPLATE_KEY) + 1:]] = value
        if template is not None:
            templates["default"] = template
        return cls(templates, _token_text(tokenizer, tokenizer.bos_id),
                   _token_text(tokenizer, tokenizer.eos_id))

    @property
    def available(self) -> bool:
        return "default" in self.templates

    @cached_property
    def _env(self) -> ImmutableSandboxedEnvironment:
        return _environment()

    def _template(self, name: str) -> jinja2.Template:
        compiled = self._compiled.get(name)
        if compiled is not None:
            return compiled
        source = self.templates.get(name)
        if source is None:
            if name == "default":
                raise ChatTemplateError(
                    "this model has no chat template (no tokenizer.chat_template in its GGUF "
                    "metadata); pass one with --chat-template, or send raw prompts to "
                    "/v1/completions"
                )
            known = ", ".join(sorted(self.templates)) or "none"
            raise ChatTemplateError(f"no chat template named {name!r}; this model has: {known}")
        try:
            compiled = self._env.from_string(source)
        except jinja2.TemplateSyntaxError as error:
            raise ChatTemplateError(
                f"chat template {name!r} is not valid Jinja (line {error.lineno}: {error.message});"
                " fix it or pass a working one with --chat-template"
            ) from error
        self._compiled[name] = compiled
        return compiled

    def render(self, messages: list[dict], add_generation_prompt: bool = True,
               tools: list[dict] | None = None, template_name: str = "default",
               **kwargs: Any) -> str:
        """The prompt text for messages. kwargs become template variables (e.g. enable_thinking).

        bos_token is printed only where the template prints it; encode the result with
        add_special=False if the template already starts with it.
        """
        chat = validate_messages(messages)
        if tools is not None and (not isinstance(tools, list)
                                  or not all(isinstance(tool, dict) for tool in tools)):
            raise ChatTemplateError("tools must be a list of JSON-schema objects")
        variables = {"bos_token": self.bos_token, "eos_token": self.eos_token,
                     **_plain(kwargs, "template argument")}
        template = self._template(template_name)
        try:
            return template.render(messages=chat, tools=_plain(tools, "tools"),
                                   add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.exceptions.SecurityError as error:
            raise ChatTemplateError(
                f"chat template {template_name!r} tried an unsafe operation and was stopped "
                f"({error}); use a trusted template"
            ) from error
        except (jinja2.TemplateError, TypeError, ValueError, LookupError, ArithmeticError) as error:
            # The template is data from the model file: its failures are input errors, not bugs.
            raise ChatTemplateError(
                f"chat template {template_name!r} failed on these messages "
                f"({type(error).__name__}: {error})"
            ) from error


def _token_text(tokenizer: Tokenizer, token_id: int | None) -> str:
    """Text of a special token as templates print it ("<bos>", "<|endoftext|>")."""
    if token_id is None:
        return ""
    return tokenizer.piece(token_id).decode("utf-8", errors="replace")
