"""Chat templates: numoe's sandboxed renderer against transformers' apply_chat_template.

transformers is the reference: for the same template string and conversation, the prompt text
must be identical. Templates come from the GGUF files (the tiny Qwen models carry one) and from
the real model templates that llama.cpp ships under models/templates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import tokenizers
from gguf import GGUFWriter
from tokenizers import models
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from cluster.chat_template import ChatTemplate, ChatTemplateError
from cluster.gguf import open_gguf
from cluster.tokenizer import Tokenizer
from tests.reference import llamacpp
from tests.reference.tiny_models import TinyModel

SYSTEM_USER = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a prime. Ünïcödé & <tags> too."},
]
MULTI_TURN = [
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello. How can I help?"},
    {"role": "user", "content": "What is 2+2?"},
]
TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city, in °C",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]},
    },
}]
TOOL_TURNS = [
    {"role": "user", "content": "Weather in Zürich?"},
    {"role": "assistant", "content": "", "reasoning_content": "Need the tool.",
     "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                      "arguments": {"city": "Zürich"}}}]},
    {"role": "tool", "content": '{"temp": 21}'},
]


def _template_file(name: str) -> str:
    return (llamacpp.source_dir() / "models" / "templates" / name).read_text()


def _qwen_case(model: TinyModel) -> tuple[ChatTemplate, Any, str]:
    gguf = open_gguf(model.gguf["f32"])
    chat = ChatTemplate.from_gguf(gguf, Tokenizer.from_gguf(gguf))
    return chat, AutoTokenizer.from_pretrained(model.hf_dir), gguf.metadata[
        "tokenizer.chat_template"]


@pytest.fixture(scope="module", params=["qwen3", "qwen3moe"])
def qwen(request: pytest.FixtureRequest) -> tuple[ChatTemplate, Any, str]:
    return _qwen_case(request.getfixturevalue(f"tiny_{request.param}"))


@pytest.fixture(scope="module")
def gemma(gemma3_path: Path) -> tuple[Any, ChatTemplate]:
    gguf = open_gguf(gemma3_path)
    return gguf, Tokenizer.from_gguf(gguf)


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("conversation", [SYSTEM_USER, MULTI_TURN])
def test_gguf_template_matches_transformers(
    qwen: tuple[ChatTemplate, Any, str], conversation: list[dict], add_generation_prompt: bool
) -> None:
    chat, hf, source = qwen
    expected = hf.apply_chat_template(conversation, tokenize=False, chat_template=source,
                                      add_generation_prompt=add_generation_prompt)
    assert chat.render(conversation, add_generation_prompt=add_generation_prompt) == expected


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("conversation", [SYSTEM_USER, MULTI_TURN, MULTI_TURN[:1] + TOOL_TURNS])
@pytest.mark.parametrize("enable_thinking", [None, False])
def test_real_qwen3_template_with_tools_matches_transformers(
    qwen: tuple[ChatTemplate, Any, str], conversation: list[dict], add_generation_prompt: bool,
    enable_thinking: bool | None,
) -> None:
    chat, hf, _ = qwen
    source = _template_file("Qwen-Qwen3-0.6B.jinja")
    chat = ChatTemplate({"default": source}, chat.bos_token, chat.eos_token)
    extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    expected = hf.apply_chat_template(conversation, tokenize=False, chat_template=source,
                                      tools=TOOLS, add_generation_prompt=add_generation_prompt,
                                      **extra)
    got = chat.render(conversation, add_generation_prompt=add_generation_prompt, tools=TOOLS,
                      **extra)
    assert got == expected
    assert '"description": "Weather for a city, in °C"' in got  # tojson keeps non-ASCII


def test_bos_eos_text_from_tokenizer(gemma: tuple[Any, Tokenizer],
                                     qwen: tuple[ChatTemplate, Any, str]) -> None:
    chat, hf, _ = qwen
    assert (chat.bos_token, chat.eos_token) == (hf.bos_token, hf.eos_token)
    gguf, tokenizer = gemma
    gemma_chat = ChatTemplate.from_gguf(gguf, tokenizer)
    tokens = gguf.metadata["tokenizer.ggml.tokens"]
    assert gemma_chat.bos_token == tokens[gguf.metadata["tokenizer.ggml.bos_token_id"]]
    assert gemma_chat.eos_token == tokens[gguf.metadata["tokenizer.ggml.eos_token_id"]]


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_gemma_with_supplied_template_matches_transformers(
    gemma: tuple[Any, Tokenizer], add_generation_prompt: bool
) -> None:
    gguf, tokenizer = gemma
    source = _template_file("google-gemma-2-2b-it.jinja")
    chat = ChatTemplate.from_gguf(gguf, tokenizer, template=source)
    # The reference needs only bos/eos text from a tokenizer, so a one-word vocabulary will do.
    vocab = {chat.bos_token: 0, chat.eos_token: 1, "[UNK]": 2}
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")),
        bos_token=chat.bos_token, eos_token=chat.eos_token,
    )
    expected = hf.apply_chat_template(MULTI_TURN, tokenize=False, chat_template=source,
                                      add_generation_prompt=add_generation_prompt)
    got = chat.render(MULTI_TURN, add_generation_prompt=add_generation_prompt)
    assert got == expected
    assert got.startswith("<bos><start_of_turn>user\n")
    # Gemma's template calls raise_exception for a system role: that must be a clean error.
    with pytest.raises(ChatTemplateError, match="System role not supported"):
        chat.render(SYSTEM_USER)


def test_missing_template_says_how_to_fix(gemma: tuple[Any, Tokenizer]) -> None:
    gguf, tokenizer = gemma
    assert "tokenizer.chat_template" not in gguf.metadata
    chat = ChatTemplate.from_gguf(gguf, tokenizer)
    assert not chat.available
    with pytest.raises(ChatTemplateError, match=r"no chat template.*/v1/completions"):
        chat.render(MULTI_TURN)


@pytest.mark.parametrize(("messages", "match"), [
    ({"role": "user", "content": "hi"}, "messages is a dict"),
    ([], "messages is empty"),
    (["hi"], r"messages\[0\] is a str"),
    ([{"content": "hi"}], r'messages\[0\] has no string "role"'),
    ([{"role": 3, "content": "hi"}], r'messages\[0\] has no string "role"'),
    ([{"role": "user"}], r'messages\[0\] \(user\) has no "content"'),
    ([{"role": "user", "content": 5}], r"messages\[0\]\.content is a int"),
    ([{"role": "user", "content": [{"text": "hi"}]}], r'content\[0\] must be .* "type"'),
    ([{"role": "user", "content": [{"type": "text", "text": 1}]}], 'no string "text"'),
    ([{"role": "user", "content": "hi", "extra": object()}], "only JSON values"),
])
def test_bad_messages_are_rejected(qwen: tuple[ChatTemplate, Any, str], messages: Any,
                                   match: str) -> None:
    chat, _, _ = qwen
    with pytest.raises(ChatTemplateError, match=match):
        chat.render(messages)


PARTS_TEMPLATE = (  # trim_blocks eats the newline after each block tag, as in transformers
    "{% for m in messages %}<{{ m.role }}>{% if m.content is string %}{{ m.content }}"
    "{% else %}{% for p in m.content %}{% if p.type == 'text' %}{{ p.text }}"
    "{% else %}[{{ p.type }}]{% endif %}{% endfor %}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def test_content_parts_render_as_transformers(qwen: tuple[ChatTemplate, Any, str]) -> None:
    chat, hf, _ = qwen
    messages = [{"role": "user", "content": [{"type": "text", "text": "part one "},
                                             {"type": "image_url", "image_url": {"url": "x"}},
                                             {"type": "text", "text": "part two"}]}]
    expected = hf.apply_chat_template(messages, tokenize=False, chat_template=PARTS_TEMPLATE,
                                      add_generation_prompt=True)
    chat = ChatTemplate({"default": PARTS_TEMPLATE}, chat.bos_token, chat.eos_token)
    assert chat.render(messages) == expected == "<user>part one [image_url]part two<assistant>"
    # Qwen3's template expects string content; the failure must be a clean error, not a crash.
    qwen3 = ChatTemplate({"default": _template_file("Qwen-Qwen3-0.6B.jinja")}, "", "")
    with pytest.raises(ChatTemplateError, match="failed on these messages"):
        qwen3.render(messages)


def test_named_variants_from_gguf(tmp_path: Path, tiny_qwen3: TinyModel) -> None:
    # gguf-py's writer (the converter's) lays out named templates; numoe must find every one.
    path = tmp_path / "templates.gguf"
    writer = GGUFWriter(path, "qwen3")
    writer.add_chat_template([{"name": "default", "template": "D{{ messages[0].content }}"},
                              {"name": "tool_use", "template": "T{{ tools[0].type }}"}])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tokenizer = Tokenizer.from_gguf(open_gguf(tiny_qwen3.gguf["f32"]))
    chat = ChatTemplate.from_gguf(open_gguf(path), tokenizer)
    user = [{"role": "user", "content": "x"}]
    assert chat.render(user) == "Dx"
    assert chat.render(user, tools=TOOLS, template_name="tool_use") == "Tfunction"
    override = ChatTemplate.from_gguf(open_gguf(path), tokenizer, template="O")
    assert override.render(user) == "O"
    assert override.render(user, tools=TOOLS, template_name="tool_use") == "Tfunction"


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__base__.__subclasses__()[0] }}",
    "{{ raise_exception.__globals__['__builtins__']['open']('/etc/passwd').read() }}",
    "{% set ns = namespace() %}{% set ns.__dict__ = 1 %}",
    "{{ cycler.__init__.__globals__.os.system('touch /tmp/pwned') }}",
    "{% for m in messages %}{{ m.update({'role': 'x'}) }}{% endfor %}",  # immutable sandbox
])
def test_sandbox_escape_is_stopped(source: str) -> None:
    chat = ChatTemplate({"default": source}, "<s>", "</s>")
    with pytest.raises(ChatTemplateError, match="unsafe operation"):
        chat.render([{"role": "user", "content": "hi"}])


def test_template_errors_are_clean() -> None:
    chat = ChatTemplate({"default": "{{ raise_exception('only user turns, please') }}",
                         "broken": "{% if %}", "typo": "{{ messages[0]['content'] + 1 }}"},
                        "<s>", "</s>")
    user = [{"role": "user", "content": "hi"}]
    with pytest.raises(ChatTemplateError, match="rejected the conversation: only user turns"):
        chat.render(user)
    with pytest.raises(ChatTemplateError, match="'broken' is not valid Jinja"):
        chat.render(user, template_name="broken")
    with pytest.raises(ChatTemplateError, match="'typo' failed on these messages"):
        chat.render(user, template_name="typo")
    with pytest.raises(ChatTemplateError, match="no chat template named 'tool_use'"):
        chat.render(user, template_name="tool_use")
