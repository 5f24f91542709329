"""The HTTP API's request and response shapes: OpenAI's, as its official client sends them.

Requests are pydantic models (unknown fields are ignored, as OpenAI-compatible servers do);
range checks that need a message naming the parameter live in `sampling_params()` and the
server, so every invalid value becomes a 400 with OpenAI's error body:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "top_p", "code": null}}

Responses are plain dicts built by the helpers at the bottom: they go straight to JSON.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from cluster.errors import NumoeError
from cluster.sampling import SamplingParams
from cluster.scheduler import SequenceOutput, TokenLogprob
from cluster.tokenizer import Tokenizer

# OpenAI accepts up to 4 stop strings and 20 top logprobs (5 for the legacy completions API).
MAX_STOP_STRINGS = 4
MAX_TOP_LOGPROBS = 20


class ApiError(NumoeError):
    """An error the server answers with OpenAI's error body and `status`."""

    def __init__(self, status: int, message: str, error_type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, self.param, self.code)


def error_body(message: str, error_type: str = "invalid_request_error",
               param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class GenerationFields(BaseModel):
    """Fields shared by both generation endpoints."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None  # None = 1.0, OpenAI's default
    top_p: float | None = None
    top_k: int | None = None  # vLLM's extension; -1 or 0 = off
    min_p: float | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    def sampling_params(self, index: int) -> SamplingParams:
        """Sampling for the index-th of the n sequences: a seeded request gives each its own
        seed (seed + index), so n > 1 does not draw n identical samples."""
        top_k = self.top_k if self.top_k is not None else 0
        if top_k == -1:  # vLLM's "off"
            top_k = 0
        checks = (("temperature", self.temperature, lambda v: 0 <= v <= 2, "in [0, 2]"),
                  ("top_p", self.top_p, lambda v: 0 < v <= 1, "in (0, 1]"),
                  ("min_p", self.min_p, lambda v: 0 <= v <= 1, "in [0, 1]"),
                  ("presence_penalty", self.presence_penalty, lambda v: -2 <= v <= 2,
                   "in [-2, 2]"),
                  ("frequency_penalty", self.frequency_penalty, lambda v: -2 <= v <= 2,
                   "in [-2, 2]"),
                  ("repetition_penalty", self.repetition_penalty, lambda v: 0 < v <= 10,
                   "in (0, 10]"),
                  ("top_k", top_k, lambda v: v >= 0, ">= 0, or -1 for off"),
                  ("seed", self.seed, lambda v: v >= 0, ">= 0"))
        for name, value, ok, allowed in checks:
            if value is not None and not ok(value):
                raise invalid(f"{name}={value} is out of range: it must be {allowed}", name)
        seed = None if self.seed is None else self.seed + index
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_k=top_k, top_p=1.0 if self.top_p is None else self.top_p,
            min_p=self.min_p or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None
            else self.repetition_penalty,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0, seed=seed)

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise invalid(f"stop has {len(stops)} strings; at most {MAX_STOP_STRINGS} are "
                          "allowed", "stop")
        if any(not s for s in stops):
            raise invalid("stop strings must not be empty", "stop")
        return tuple(stops)

    def check_common(self, max_n: int) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise invalid(f"max_tokens={self.max_tokens} must be at least 1", "max_tokens")
        if not 1 <= self.n <= max_n:
            raise invalid(f"n={self.n} must be between 1 and {max_n} (the server's "
                          "--max-num-seqs)", "n")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(GenerationFields):
    prompt: str | list[int] | list[str]
    max_tokens: int | None = 16  # OpenAI's default for the legacy completions API
    logprobs: int | None = None  # top logprobs per token, 0..5
    echo: bool = False


class ChatCompletionRequest(GenerationFields):
    messages: list[Any]
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's extension (enable_thinking)


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str | None = None
    messages: list[Any] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    tokens: list[int] = Field(default_factory=list)


# --- responses -----------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now_s() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def model_card(name: str, max_model_len: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": now_s(), "owned_by": "numoe",
            "max_model_len": max_model_len}


BaseModelT = TypeVar("BaseModelT", bound=BaseModel)


def _token_text(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.piece(token_id).decode("utf-8", errors="replace")


def logprobs_json(tokenizer: Tokenizer, entries: Sequence[TokenLogprob], chat: bool,
                  first_offset: int = 0) -> dict[str, Any]:
    """OpenAI's logprobs object: chat's {"content": [...]} or completions' parallel lists."""
    if chat:
        content = []
        for entry in entries:
            text = _token_text(tokenizer, entry.token_id)
            content.append({
                "token": text, "logprob": entry.logprob, "bytes": list(text.encode()),
                "top_logprobs": [{"token": (t := _token_text(tokenizer, i)), "logprob": lp,
                                  "bytes": list(t.encode())} for i, lp in entry.top]})
        return {"content": content}
    tokens = [_token_text(tokenizer, entry.token_id) for entry in entries]
    offsets, offset = [], first_offset
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": [entry.logprob for entry in entries],
            "top_logprobs": [{_token_text(tokenizer, i): lp for i, lp in entry.top}
                             for entry in entries],
            "text_offset": offsets}


def chunk_choice(output: SequenceOutput, chat: bool,
                 logprobs: dict[str, Any] | None) -> dict[str, Any]:
    """One streamed choice for an output delta."""
    if chat:
        delta = {"content": output.text} if output.text else {}
        return {"index": output.index, "delta": delta, "logprobs": logprobs,
                "finish_reason": output.finish_reason}
    return {"index": output.index, "text": output.text, "logprobs": logprobs,
            "finish_reason": output.finish_reason}


class ChoiceAccumulator:
    """Collects the n sequences' outputs into the choices of one non-streamed response."""

    def __init__(self, n: int) -> None:
        self.texts = [""] * n
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]
        self.finish_reasons: list[str | None] = [None] * n
        self.tokens = [0] * n

    def add(self, output: SequenceOutput) -> None:
        i = output.index
        self.texts[i] += output.text
        self.logprobs[i].extend(output.logprobs)
        self.tokens[i] = output.completion_tokens
        if output.finish_reason is not None:
            self.finish_reasons[i] = output.finish_reason

    @property
    def done(self) -> bool:
        return all(reason is not None for reason in self.finish_reasons)

    @property
    def completion_tokens(self) -> int:
        return sum(self.tokens)

    def choices(self, tokenizer: Tokenizer, chat: bool) -> list[dict[str, Any]]:
        out = []
        for i, text in enumerate(self.texts):
            entries = self.logprobs[i]
            logprobs = logprobs_json(tokenizer, entries, chat) if entries else None
            if chat:
                out.append({"index": i, "message": {"role": "assistant", "content": text},
                            "logprobs": logprobs, "finish_reason": self.finish_reasons[i]})
            else:
                out.append({"index": i, "text": text, "logprobs": logprobs,
                            "finish_reason": self.finish_reasons[i]})
        return out
