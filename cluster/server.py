"""The OpenAI-compatible HTTP server (FastAPI): the edge between clients and the Scheduler.

    state = ServerState(config)                  # /ready answers 503 until load() finishes
    app = create_app(state)
    threading.Thread(target=state.load).start()   # or state.attach(engine)
    uvicorn.run(app, host=config.host, port=config.port)

Every error a client can cause is an ApiError answered with OpenAI's error body; the engine
thread's own failure turns /health to 503. Generation requests go to the Scheduler, whose
outputs stream back as SSE (`data: {...}` lines ending with `data: [DONE]`) or are collected
into one response. A client that disconnects cancels its sequences, which frees their slots.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster import api_types as api
from cluster.api_types import ApiError, ChoiceAccumulator, chunk_choice, invalid, logprobs_json
from cluster.chat_template import ChatTemplate, ChatTemplateError
from cluster.cluster_cli import ClusterOptions
from cluster.engine import Engine
from cluster.errors import NumoeError
from cluster.metrics import MetricsExporter, ServingStats
from cluster.scheduler import (
    GenerationRequest,
    QueueFullError,
    RequestHandle,
    Scheduler,
    SchedulerConfig,
    SequenceOutput,
)

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_COMPLETIONS_LOGPROBS = 5


@dataclass(frozen=True)
class ServeConfig:
    """Everything `numoe serve` reads from flags and environment, once."""

    model_path: str | None = None  # None: the embedded default model
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_model_len: int | None = None  # None: min(4096, the model's context)
    max_num_seqs: int = 8
    max_num_batched_tokens: int = 512
    max_queued_requests: int = 64
    served_model_name: str | None = None  # None: the GGUF file's stem
    chat_template: str | None = None  # Jinja source replacing the GGUF's (--chat-template)
    threads: int | None = None
    backend: str = "cpu"
    queue_full_status: int = 503  # or 429
    retry_after_s: int = 1
    max_body_bytes: int = 1 << 20
    cluster: ClusterOptions | None = None  # None: one process; else workers per NUMA node


class ServerState:
    """What the endpoints share: the engine and scheduler once loaded."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.engine: Engine | None = None
        self.scheduler: Scheduler | None = None
        self.chat_template: ChatTemplate | None = None
        self.model_name = config.served_model_name or ""
        self.stats = ServingStats()
        self.exporter: MetricsExporter | None = None
        self.load_error: BaseException | None = None

    def load(self) -> None:
        """Open the model (slow) and start the engine thread; failures go to /health."""
        try:
            self.attach(open_engine(self.config))
        except BaseException as error:
            self.load_error = error
            raise

    def attach(self, engine: Engine) -> None:
        config = self.config
        scheduler = Scheduler(engine.runner, engine.tokenizer, engine.n_ctx, SchedulerConfig(
            config.max_num_seqs, config.max_num_batched_tokens, config.max_queued_requests),
            self.stats)
        self.chat_template = ChatTemplate.from_gguf(engine.gguf, engine.tokenizer,
                                                    config.chat_template)
        self.model_name = config.served_model_name or engine.model_path.stem
        self.exporter = MetricsExporter(model_name=self.model_name, backend=config.backend)
        scheduler.start()
        self.engine, self.scheduler = engine, scheduler

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stop()
        if self.engine is not None:
            self.engine.close()

    @property
    def ready(self) -> bool:
        return self.scheduler is not None


def open_engine(config: ServeConfig) -> Engine:
    """The engine, in this process or on the cluster's workers (each with max_num_seqs
    KV-cache slots)."""
    path: str | Path | None = config.model_path
    if path is None:
        from cluster.default_model import default_model_path  # noqa: PLC0415

        path = default_model_path(progress=True)
    kwargs: dict[str, Any] = {"backend": config.backend, "n_threads": config.threads}
    if config.max_model_len is not None:
        kwargs["n_ctx"] = config.max_model_len
    if config.cluster is not None:
        from cluster.cluster_cli import cluster_runner_factory  # noqa: PLC0415

        kwargs["runner_factory"] = cluster_runner_factory(
            config.cluster, backend=config.backend, n_slots=config.max_num_seqs)
    return Engine(path, n_slots=config.max_num_seqs, **kwargs)


def create_app(state: ServerState) -> FastAPI:
    config = state.config
    app = FastAPI(title="numoe", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), error.status, headers=error.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return JSONResponse(api.error_body(str(error.detail), kind), error.status_code)

    def engine() -> tuple[Engine, Scheduler]:
        if state.engine is None or state.scheduler is None:
            raise ApiError(503, "the model is still loading; retry when GET /ready answers 200",
                           "service_unavailable", headers={"Retry-After": "5"})
        return state.engine, state.scheduler

    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 config.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>' "
                           "with the server's --api-key", "authentication_error",
                           code="invalid_api_key")

    async def read_json(request: Request) -> dict[str, Any]:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > config.max_body_bytes:
            raise _too_large(config.max_body_bytes)
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > config.max_body_bytes:
                raise _too_large(config.max_body_bytes)
        try:
            parsed = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise invalid(f"the request body is not valid JSON ({error})") from None
        if not isinstance(parsed, dict):
            raise invalid("the request body must be a JSON object")
        return parsed

    def check_model(name: str | None) -> None:
        if name is not None and name != state.model_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves "
                           f"{state.model_name!r} (GET /v1/models)", "not_found_error",
                           "model", "model_not_found")

    def submit(request: GenerationRequest) -> RequestHandle:
        _, scheduler = engine()
        try:
            return scheduler.submit(request, asyncio.get_running_loop())
        except QueueFullError as error:
            raise ApiError(config.queue_full_status, str(error), "service_unavailable",
                           headers={"Retry-After": str(config.retry_after_s)}) from None
        except NumoeError as error:
            raise ApiError(503, str(error), "service_unavailable") from None

    def generation(prompt_ids: list[int], body: api.GenerationFields, max_tokens: int | None,
                   logprobs: int | None) -> GenerationRequest:
        eng, _ = engine()
        if not prompt_ids:
            raise invalid("the prompt is empty (no tokens)", "prompt")
        if max_tokens is None:
            max_tokens = eng.n_ctx - len(prompt_ids)
        if len(prompt_ids) + max_tokens > eng.n_ctx:
            raise invalid(
                f"this model's maximum context length is {eng.n_ctx} tokens; the prompt has "
                f"{len(prompt_ids)} tokens and max_tokens is {max_tokens}, "
                f"{len(prompt_ids) + max_tokens} in total; shorten the prompt or lower "
                "max_tokens", "max_tokens")
        sampling = tuple(body.sampling_params(i) for i in range(body.n))
        return GenerationRequest(tuple(prompt_ids), max_tokens, sampling, body.stop_strings(),
                                 logprobs)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        authorize(request)
        body = _parse(api.CompletionRequest, await read_json(request))
        eng, _ = engine()
        check_model(body.model)
        body.check_common(config.max_num_seqs)
        if body.echo:
            raise invalid("echo is not supported", "echo")
        if body.logprobs is not None and not 0 <= body.logprobs <= MAX_COMPLETIONS_LOGPROBS:
            raise invalid(f"logprobs={body.logprobs} must be in [0, "
                          f"{MAX_COMPLETIONS_LOGPROBS}]", "logprobs")
        prompt_ids = _prompt_ids(eng, body.prompt)
        gen = generation(prompt_ids, body, body.max_tokens, body.logprobs)
        handle = submit(gen)
        return await respond(request, handle, body, "text_completion", len(prompt_ids))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        authorize(request)
        body = _parse(api.ChatCompletionRequest, await read_json(request))
        eng, _ = engine()
        check_model(body.model)
        body.check_common(config.max_num_seqs)
        if body.top_logprobs is not None and not body.logprobs:
            raise invalid("top_logprobs needs logprobs=true", "top_logprobs")
        top = body.top_logprobs or 0
        if not 0 <= top <= api.MAX_TOP_LOGPROBS:
            raise invalid(f"top_logprobs={top} must be in [0, {api.MAX_TOP_LOGPROBS}]",
                          "top_logprobs")
        prompt_ids = _chat_prompt_ids(eng, state.chat_template, body.messages,
                                      body.chat_template_kwargs or {})
        max_tokens = body.max_completion_tokens or body.max_tokens
        gen = generation(prompt_ids, body, max_tokens, top if body.logprobs else None)
        handle = submit(gen)
        return await respond(request, handle, body, "chat.completion", len(prompt_ids))

    async def respond(request: Request, handle: RequestHandle, body: api.GenerationFields,
                      kind: str, prompt_tokens: int) -> Response:
        eng, _ = engine()
        chat = kind == "chat.completion"
        response_id = api.new_id("chatcmpl" if chat else "cmpl")
        created = api.now_s()
        if body.stream:
            stream = _sse(handle, eng, chat, response_id, created, state.model_name,
                          prompt_tokens, body.n, body.include_usage)
            return StreamingResponse(stream, media_type="text/event-stream")
        accumulator = ChoiceAccumulator(body.n)
        try:
            await _collect(request, handle, accumulator)
        finally:
            handle.cancel()  # a no-op once finished; frees the slots on a disconnect
        choices = accumulator.choices(eng.tokenizer, chat)
        return JSONResponse({"id": response_id, "object": kind, "created": created,
                             "model": state.model_name, "choices": choices,
                             "usage": api.usage(prompt_tokens, accumulator.completion_tokens)})

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        eng, _ = engine()
        return {"object": "list", "data": [api.model_card(state.model_name, eng.n_ctx)]}

    @app.get("/health")
    async def health() -> Response:
        if state.load_error is not None:
            return JSONResponse(api.error_body(f"the model failed to load: {state.load_error}",
                                               "service_unavailable"), 503)
        scheduler = state.scheduler
        if scheduler is not None and not scheduler.alive:
            return JSONResponse(api.error_body(f"the engine thread died: {scheduler.error!r}",
                                               "service_unavailable"), 503)
        unhealthy = getattr(scheduler.runner, "unhealthy", None) if scheduler else None
        problem = await asyncio.to_thread(unhealthy) if unhealthy is not None else None
        if problem is not None:
            return JSONResponse(api.error_body(f"a cluster worker is down: {problem}",
                                               "service_unavailable"), 503)
        return JSONResponse({"status": "ok"})

    @app.get("/ready")
    async def ready() -> Response:
        if not state.ready:
            return JSONResponse(api.error_body("the model is loading", "service_unavailable"),
                                503, headers={"Retry-After": "5"})
        return JSONResponse({"status": "ready"})

    @app.get("/metrics")
    async def metrics() -> Response:
        _, scheduler = engine()
        exporter = state.exporter
        assert exporter is not None
        worker_stats_fn = getattr(scheduler.runner, "worker_stats", None)
        worker_stats = await asyncio.to_thread(worker_stats_fn) if worker_stats_fn else None
        with scheduler.lock:  # update() drains lists the engine thread appends to
            exporter.update(state.stats, worker_stats, now=time.monotonic())
        return Response(exporter.render(), media_type=PROMETHEUS_CONTENT_TYPE)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        authorize(request)
        body = _parse(api.TokenizeRequest, await read_json(request))
        eng, _ = engine()
        check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise invalid("send exactly one of prompt or messages", "prompt")
        if body.messages is not None:
            ids = _chat_prompt_ids(eng, state.chat_template, body.messages, {})
        else:
            ids = eng.tokenizer.encode(body.prompt or "", add_special=body.add_special_tokens,
                                       parse_special=True)
        return {"tokens": ids, "count": len(ids), "max_model_len": eng.n_ctx}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        authorize(request)
        body = _parse(api.DetokenizeRequest, await read_json(request))
        eng, _ = engine()
        check_model(body.model)
        _check_vocab(eng, body.tokens, "tokens")
        return {"prompt": eng.tokenizer.decode(body.tokens)}

    @app.get("/v1/cluster/plan")
    async def cluster_plan(request: Request) -> Any:
        authorize(request)
        _, scheduler = engine()
        plan = getattr(scheduler.runner, "plan", None)
        if plan is None:
            raise ApiError(404, "no placement plan: this server runs single-process",
                           "not_found_error")
        return plan.to_dict()

    @app.get("/v1/cluster/topology")
    async def cluster_topology(request: Request) -> Any:
        authorize(request)
        _, scheduler = engine()
        topology = getattr(scheduler.runner, "topology", None)  # ClusterRunner's hardware
        if topology is None:
            raise ApiError(404, "no cluster topology: this server runs single-process "
                           "(start it with --topology or --workers)", "not_found_error")
        return topology.to_dict()

    @app.get("/v1/cluster/experts")
    async def expert_load(request: Request) -> Any:
        """Tokens routed to each expert of each MoE layer so far, and max / mean per layer."""
        authorize(request)
        _, scheduler = engine()
        return {"layers": _expert_load(scheduler.runner)}

    return app


def _expert_load(runner: Any) -> list[dict[str, Any]]:
    """From the workers' counters (each stage counts its own layers; ranks of a stage count the
    same pairs, so the element-wise max is the stage's count), or the single process's."""
    if hasattr(runner, "worker_stats"):
        rows = [np.asarray(w["forward"]["expert_tokens"], dtype=np.int64)
                for w in runner.worker_stats() if "forward" in w]
        tokens = np.maximum.reduce(rows) if rows else np.zeros((0, 0), np.int64)
    elif hasattr(runner, "counters"):
        tokens = np.array(runner.counters.expert_tokens, dtype=np.int64)  # a snapshot
    else:
        raise ApiError(404, "this runner keeps no expert counters", "not_found_error")
    layers = []
    for layer, row in enumerate(tokens):  # [n_experts] per layer
        if row.size == 0:
            continue  # a dense layer
        mean = float(row.mean())
        layers.append({"layer": layer, "tokens": [int(t) for t in row],
                       "imbalance": float(row.max()) / mean if mean > 0 else 0.0})
    return layers


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body exceeds {limit} bytes", code="request_too_large")


def _parse(model: type[api.BaseModelT], data: dict[str, Any]) -> api.BaseModelT:
    try:
        return model.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        raise invalid(f"invalid request: {param}: {first['msg']}", param) from None


def _check_vocab(eng: Engine, ids: list[int], param: str) -> None:
    vocab = eng.config.vocab_size
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise invalid(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})", param)


def _prompt_ids(eng: Engine, prompt: str | list[int] | list[str]) -> list[int]:
    if isinstance(prompt, str):
        return eng.tokenize(prompt)
    if prompt and all(isinstance(p, str) for p in prompt):
        if len(prompt) != 1:
            raise invalid("a list of several prompts is not supported; send one request per "
                          "prompt", "prompt")
        return eng.tokenize(str(prompt[0]))
    ids = [int(p) for p in prompt]
    _check_vocab(eng, ids, "prompt")
    return ids


def _chat_prompt_ids(eng: Engine, template: ChatTemplate | None, messages: list[Any],
                     kwargs: dict[str, Any]) -> list[int]:
    assert template is not None
    try:
        text = template.render(messages, add_generation_prompt=True, **kwargs)
    except ChatTemplateError as error:
        raise invalid(str(error), "messages") from None
    # The template prints the special tokens it wants (BOS included): add none here.
    return eng.tokenizer.encode(text, add_special=False, parse_special=True)


async def _next_output(request: Request, handle: RequestHandle,
                       disconnect: asyncio.Task[None]) -> SequenceOutput | None:
    """The next output, or None when the client went away first."""
    get = asyncio.ensure_future(handle.outputs.get())
    done, _ = await asyncio.wait({get, disconnect}, return_when=asyncio.FIRST_COMPLETED)
    if get in done:
        return get.result()
    get.cancel()
    return None


async def _watch_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _collect(request: Request, handle: RequestHandle,
                   accumulator: ChoiceAccumulator) -> None:
    disconnect = asyncio.ensure_future(_watch_disconnect(request))
    try:
        while not accumulator.done:
            output = await _next_output(request, handle, disconnect)
            if output is None:
                return
            _raise_on_engine_error(output)
            accumulator.add(output)
    finally:
        disconnect.cancel()


def _raise_on_engine_error(output: SequenceOutput) -> None:
    if output.finish_reason == "error":
        raise ApiError(500, f"the engine failed: {output.error}", "server_error")


async def _sse(handle: RequestHandle, eng: Engine, chat: bool, response_id: str, created: int,
               model: str, prompt_tokens: int, n: int,
               include_usage: bool) -> AsyncIterator[str]:
    """SSE events; starlette cancels this generator when the client disconnects, and the
    finally clause then cancels the request's sequences."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def event(choices: list[dict[str, Any]], usage: dict[str, int] | None = None,
              with_usage_field: bool = include_usage) -> str:
        payload: dict[str, Any] = {"id": response_id, "object": kind, "created": created,
                                   "model": model, "choices": choices}
        if with_usage_field:
            payload["usage"] = usage
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    try:
        if chat:
            yield event([{"index": i, "delta": {"role": "assistant", "content": ""},
                          "logprobs": None, "finish_reason": None} for i in range(n)])
        finished = 0
        completion_tokens = 0
        while finished < n:
            output = await handle.outputs.get()
            if output.finish_reason == "error":
                yield f"data: {json.dumps(api.error_body(str(output.error), 'server_error'))}\n\n"
                break
            if output.finish_reason is not None:
                finished += 1
                completion_tokens += output.completion_tokens
            if output.text or output.finish_reason is not None or output.logprobs:
                logprobs = logprobs_json(eng.tokenizer, output.logprobs, chat) \
                    if output.logprobs else None
                yield event([chunk_choice(output, chat, logprobs)])
        if include_usage:
            yield event([], api.usage(prompt_tokens, completion_tokens))
        yield "data: [DONE]\n\n"
    finally:
        handle.cancel()

