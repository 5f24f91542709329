"""Sync and async clients for a numoe server.

Completions and chat go through the official `openai` package (`client.openai`), which already
does request building, streaming and typed responses well; these classes add typed results for
the common calls and the endpoints only numoe has: /v1/cluster/plan, /v1/cluster/topology,
/v1/cluster/experts, /health, /ready, /tokenize, /detokenize. numoe's own HTTP calls (httpx)
retry a 503 (queue full, still loading) or 429 with exponential backoff, honouring Retry-After.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import openai

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
RETRY_STATUSES = (429, 503)
_sleep = time.sleep  # the sync client's wait between retries (a test records it)


class APIError(Exception):
    """A numoe server answered with an error (OpenAI error body: message, type, code)."""

    def __init__(self, status: int, message: str, error_type: str | None = None,
                 code: str | int | None = None) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message
        self.type = error_type
        self.code = code


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str | None
    usage: Usage | None
    model: str


@dataclass(frozen=True)
class WorkerSummary:
    rank: int
    host: str
    node_id: int
    device: str
    weight_bytes: int
    kv_bytes: int
    decode_bytes_per_token: int


@dataclass(frozen=True)
class PlanSummary:
    strategy: str
    architecture: str
    ctx: int
    predicted_decode_tok_s: float
    predicted_prompt_tok_s: float
    workers: tuple[WorkerSummary, ...]
    raw: dict[str, Any]  # the whole plan as the server sent it (cluster/plan.py's to_dict)


@dataclass(frozen=True)
class ExpertLoad:
    layer: int
    tokens: tuple[int, ...]  # tokens routed to each expert of the layer so far
    imbalance: float  # max / mean of `tokens` (1.0 = perfectly even)


def _plan_summary(data: dict[str, Any]) -> PlanSummary:
    workers = tuple(
        WorkerSummary(rank=int(w["rank"]), host=str(w["host"]), node_id=int(w["node_id"]),
                      device=str(w.get("device", "cpu")), weight_bytes=int(w["weight_bytes"]),
                      kv_bytes=int(w["kv_bytes"]),
                      decode_bytes_per_token=int(w["decode_bytes_per_token"]))
        for w in data.get("workers", []))
    return PlanSummary(strategy=str(data["strategy"]), architecture=str(data["architecture"]),
                       ctx=int(data["ctx"]),
                       predicted_decode_tok_s=float(data.get("predicted_decode_tok_s", 0.0)),
                       predicted_prompt_tok_s=float(data.get("predicted_prompt_tok_s", 0.0)),
                       workers=workers, raw=data)


def _expert_loads(data: dict[str, Any]) -> list[ExpertLoad]:
    return [ExpertLoad(layer=int(item["layer"]), tokens=tuple(int(t) for t in item["tokens"]),
                       imbalance=float(item["imbalance"])) for item in data.get("layers", [])]


def _completion(response: Any) -> Completion:
    choice = response.choices[0]
    text = choice.text if hasattr(choice, "text") else (choice.message.content or "")
    usage = response.usage
    return Completion(
        text=text, finish_reason=choice.finish_reason, model=response.model,
        usage=None if usage is None else Usage(usage.prompt_tokens, usage.completion_tokens,
                                               usage.total_tokens))


def _raise_for_error(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        error = response.json().get("error", {})
    except ValueError:
        error = {}
    raise APIError(response.status_code, str(error.get("message") or response.text[:200]),
                   error.get("type"), error.get("code"))


def _retry_delay(response: httpx.Response, attempt: int, backoff_s: float) -> float:
    """Retry-After (seconds) when the server gives one, else exponential backoff."""
    header = response.headers.get("retry-after")
    if header is not None:
        try:
            return max(0.0, float(header))
        except ValueError:
            pass
    return backoff_s * (2 ** attempt)


class Client:
    """A numoe server, synchronously. `openai` is the official client for the same server."""

    def __init__(self, base_url: str = DEFAULT_BASE_URL, api_key: str | None = None,
                 timeout_s: float = 600.0, max_retries: int = 4, backoff_s: float = 0.25) -> None:
        self.base_url = base_url.rstrip("/")
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout_s)
        self.openai = openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=api_key or "none",
                                    timeout=timeout_s, max_retries=max_retries)

    def close(self) -> None:
        self._http.close()
        self.openai.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(self.max_retries + 1):
            response = self._http.request(method, path, **kwargs)
            if response.status_code not in RETRY_STATUSES or attempt == self.max_retries:
                break
            _sleep(_retry_delay(response, attempt, self.backoff_s))
        _raise_for_error(response)
        return response

    # --- text ---------------------------------------------------------------------------------

    def _model(self, model: str | None) -> str:
        return model or self.models()[0]

    def complete(self, prompt: str, model: str | None = None, **params: Any) -> Completion:
        """One completion (params as in OpenAI's /v1/completions: max_tokens, temperature,
        stop, seed, ...)."""
        return _completion(self.openai.completions.create(model=self._model(model),
                                                          prompt=prompt, **params))

    def stream(self, prompt: str, model: str | None = None, **params: Any) -> Iterator[str]:
        """Text pieces of a streamed completion, as they arrive."""
        for chunk in self.openai.completions.create(model=self._model(model), prompt=prompt,
                                                    stream=True, **params):
            if chunk.choices and chunk.choices[0].text:
                yield chunk.choices[0].text

    def chat(self, messages: Sequence[dict[str, Any]], model: str | None = None,
             **params: Any) -> Completion:
        return _completion(self.openai.chat.completions.create(
            model=self._model(model), messages=list(messages), **params))

    def stream_chat(self, messages: Sequence[dict[str, Any]], model: str | None = None,
                    **params: Any) -> Iterator[str]:
        for chunk in self.openai.chat.completions.create(model=self._model(model),
                                                         messages=list(messages), stream=True,
                                                         **params):
            if chunk.choices and chunk.choices[0].delta.content:
                yield chunk.choices[0].delta.content

    def tokenize(self, text: str) -> list[int]:
        return list(self._request("POST", "/tokenize", json={"prompt": text}).json()["tokens"])

    def detokenize(self, tokens: Sequence[int]) -> str:
        return str(self._request("POST", "/detokenize",
                                 json={"tokens": [int(t) for t in tokens]}).json()["prompt"])

    # --- server and cluster ---------------------------------------------------------------------

    def models(self) -> list[str]:
        return [m["id"] for m in self._request("GET", "/v1/models").json()["data"]]

    def health(self) -> bool:
        return self._http.get("/health").status_code == 200

    def ready(self) -> bool:
        return self._http.get("/ready").status_code == 200

    def plan(self) -> PlanSummary:
        return _plan_summary(self._request("GET", "/v1/cluster/plan").json())

    def topology(self) -> dict[str, Any]:
        return dict(self._request("GET", "/v1/cluster/topology").json())

    def expert_load(self) -> list[ExpertLoad]:
        return _expert_loads(self._request("GET", "/v1/cluster/experts").json())


class AsyncClient:
    """The same calls for asyncio; `openai` is an openai.AsyncOpenAI for the same server."""

    def __init__(self, base_url: str = DEFAULT_BASE_URL, api_key: str | None = None,
                 timeout_s: float = 600.0, max_retries: int = 4, backoff_s: float = 0.25) -> None:
        self.base_url = base_url.rstrip("/")
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=headers,
                                       timeout=timeout_s)
        self.openai = openai.AsyncOpenAI(base_url=f"{self.base_url}/v1",
                                         api_key=api_key or "none", timeout=timeout_s,
                                         max_retries=max_retries)

    async def close(self) -> None:
        await self._http.aclose()
        await self.openai.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(self.max_retries + 1):
            response = await self._http.request(method, path, **kwargs)
            if response.status_code not in RETRY_STATUSES or attempt == self.max_retries:
                break
            await asyncio.sleep(_retry_delay(response, attempt, self.backoff_s))
        _raise_for_error(response)
        return response

    async def _model(self, model: str | None) -> str:
        return model or (await self.models())[0]

    async def complete(self, prompt: str, model: str | None = None,
                       **params: Any) -> Completion:
        return _completion(await self.openai.completions.create(
            model=await self._model(model), prompt=prompt, **params))

    async def stream(self, prompt: str, model: str | None = None,
                     **params: Any) -> AsyncIterator[str]:
        response = await self.openai.completions.create(model=await self._model(model),
                                                        prompt=prompt, stream=True, **params)
        async for chunk in response:
            if chunk.choices and chunk.choices[0].text:
                yield chunk.choices[0].text

    async def chat(self, messages: Sequence[dict[str, Any]], model: str | None = None,
                   **params: Any) -> Completion:
        return _completion(await self.openai.chat.completions.create(
            model=await self._model(model), messages=list(messages), **params))

    async def stream_chat(self, messages: Sequence[dict[str, Any]], model: str | None = None,
                          **params: Any) -> AsyncIterator[str]:
        response = await self.openai.chat.completions.create(
            model=await self._model(model), messages=list(messages), stream=True, **params)
        async for chunk in response:
            if chunk.choices and chunk.choices[0].delta.content:
                yield chunk.choices[0].delta.content

    async def tokenize(self, text: str) -> list[int]:
        response = await self._request("POST", "/tokenize", json={"prompt": text})
        return list(response.json()["tokens"])

    async def detokenize(self, tokens: Sequence[int]) -> str:
        response = await self._request("POST", "/detokenize",
                                       json={"tokens": [int(t) for t in tokens]})
        return str(response.json()["prompt"])

    async def models(self) -> list[str]:
        return [m["id"] for m in (await self._request("GET", "/v1/models")).json()["data"]]

    async def health(self) -> bool:
        return (await self._http.get("/health")).status_code == 200

    async def ready(self) -> bool:
        return (await self._http.get("/ready")).status_code == 200

    async def plan(self) -> PlanSummary:
        return _plan_summary((await self._request("GET", "/v1/cluster/plan")).json())

    async def topology(self) -> dict[str, Any]:
        return dict((await self._request("GET", "/v1/cluster/topology")).json())

    async def expert_load(self) -> list[ExpertLoad]:
        return _expert_loads((await self._request("GET", "/v1/cluster/experts")).json())
