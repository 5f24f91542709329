"""Every error a client can cause: status code and OpenAI's error body."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import openai
import pytest

from cluster.engine import Engine
from cluster.server import ServeConfig
from tests.reference.tiny_models import TinyModel
from tests.server.conftest import RunningServer, running_server, tiny_path

pytestmark = pytest.mark.slow


def post(server: RunningServer, path: str, body: object, **kwargs: object) -> httpx.Response:
    kwargs.setdefault("timeout", 30)
    return httpx.post(server.base_url + path, json=body, **kwargs)  # type: ignore[arg-type]


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    return error


@pytest.mark.parametrize(("field", "value"), [
    ("temperature", -0.5), ("temperature", 3.0), ("top_p", 0.0), ("top_p", 1.5),
    ("max_tokens", 0), ("max_tokens", -3), ("n", 0), ("min_p", 2.0), ("top_k", -2),
    ("presence_penalty", 5.0), ("logprobs", 9)])
def test_invalid_parameters(qwen3moe_server: RunningServer, field: str, value: float) -> None:
    body = {"prompt": "Hello", "max_tokens": 4, field: value}
    error = error_of(post(qwen3moe_server, "/v1/completions", body), 400)
    assert error["param"] == field
    assert str(value) in error["message"]


def test_openai_client_raises_bad_request(qwen3moe_server: RunningServer) -> None:
    client = openai.OpenAI(base_url=qwen3moe_server.base_url + "/v1", api_key="x",
                           max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=qwen3moe_server.model_name, temperature=9,
                                       messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 400


def test_prompt_beyond_context(qwen3moe_server: RunningServer,
                               reference_engine: Engine) -> None:
    n_ctx = qwen3moe_server.engine.n_ctx
    prompt = "hello " * n_ctx
    n_prompt = len(reference_engine.tokenize(prompt))
    error = error_of(post(qwen3moe_server, "/v1/completions",
                          {"prompt": prompt, "max_tokens": 5}), 400)
    assert f"{n_prompt} tokens" in error["message"] and "max_tokens is 5" in error["message"]
    assert str(n_ctx) in error["message"]
    # A short prompt with too many tokens asked for.
    short = len(reference_engine.tokenize("Hi"))
    error = error_of(post(qwen3moe_server, "/v1/completions",
                          {"prompt": "Hi", "max_tokens": n_ctx}), 400)
    assert f"prompt has {short} tokens" in error["message"]
    assert f"max_tokens is {n_ctx}" in error["message"]


def test_unknown_model(qwen3moe_server: RunningServer) -> None:
    error = error_of(post(qwen3moe_server, "/v1/completions",
                          {"model": "gpt-17", "prompt": "Hi"}), 404)
    assert error["code"] == "model_not_found" and "gpt-17" in error["message"]


def test_bad_json_and_wrong_types(qwen3moe_server: RunningServer) -> None:
    response = httpx.post(qwen3moe_server.base_url + "/v1/completions", content=b"{not json",
                          headers={"content-type": "application/json"})
    assert "not valid JSON" in error_of(response, 400)["message"]
    error = error_of(post(qwen3moe_server, "/v1/completions", [1, 2]), 400)
    assert "JSON object" in error["message"]
    error = error_of(post(qwen3moe_server, "/v1/completions", {"max_tokens": 3}), 400)
    assert error["param"] == "prompt"
    error = error_of(post(qwen3moe_server, "/v1/completions", {"prompt": [10**9]}), 400)
    assert "outside the vocabulary" in error["message"]


def test_oversized_body(qwen3moe_server: RunningServer) -> None:
    body = {"prompt": "x" * (qwen3moe_server.state.config.max_body_bytes + 10)}
    error_of(post(qwen3moe_server, "/v1/completions", body), 413)
    # Without a Content-Length (chunked upload) the limit holds while reading.
    data = json.dumps(body).encode()
    response = httpx.post(qwen3moe_server.base_url + "/v1/completions",
                          content=iter([data[:1000], data[1000:]]))
    error_of(response, 413)


def test_chat_template_error(qwen3moe_server: RunningServer) -> None:
    error = error_of(post(qwen3moe_server, "/v1/chat/completions",
                          {"messages": [{"role": "user", "content": 5}]}), 400)
    assert error["param"] == "messages" and "content" in error["message"]
    error_of(post(qwen3moe_server, "/v1/chat/completions", {"messages": []}), 400)


@pytest.fixture(scope="module")
def keyed_server(tiny_qwen3moe: TinyModel) -> Iterator[RunningServer]:
    config = ServeConfig(model_path=tiny_path(tiny_qwen3moe), max_model_len=128,
                         max_num_seqs=1, threads=1, api_key="sesame")
    with running_server(config) as server:
        yield server


def test_api_key(keyed_server: RunningServer) -> None:
    body = {"prompt": "Hi", "max_tokens": 2}
    assert error_of(post(keyed_server, "/v1/completions", body), 401)["code"] == \
        "invalid_api_key"
    error_of(post(keyed_server, "/v1/completions", body,
                  headers={"Authorization": "Bearer wrong"}), 401)
    ok = post(keyed_server, "/v1/completions", body, headers={"Authorization": "Bearer sesame"})
    assert ok.status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed_server.base_url + "/v1", api_key="nope",
                      max_retries=0).models.list()
    # Probes stay open: load balancers carry no key.
    assert httpx.get(keyed_server.base_url + "/health").status_code == 200


@pytest.mark.parametrize("status", [503, 429])
def test_queue_full_then_cancel_frees_the_slot(tiny_qwen3moe: TinyModel, status: int) -> None:
    """One slot, no queue: while a long stream runs, a second request is refused with
    Retry-After; closing the stream cancels its sequence and the next request gets the slot."""
    config = ServeConfig(model_path=tiny_path(tiny_qwen3moe), max_model_len=4096,
                         max_num_seqs=1, max_queued_requests=0, threads=1,
                         queue_full_status=status)
    with running_server(config) as server:
        long_body = {"prompt": "Once", "max_tokens": 4000, "temperature": 0, "stream": True}
        with httpx.stream("POST", server.base_url + "/v1/completions", json=long_body,
                          timeout=60) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: ")  # the long request holds the slot
            refused = post(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
            error = error_of(refused, status)
            assert refused.headers["retry-after"] == "1"
            assert "busy" in error["message"]
        # The stream is closed: its sequence is dropped and the slot comes back.
        ok = post(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
        assert ok.status_code == 200, ok.text
        assert server.state.stats.request_success_total.get("abort", 0) == 1


def test_ready_while_loading_and_health_when_engine_dead(tiny_qwen3moe: TinyModel) -> None:
    config = ServeConfig(model_path=tiny_path(tiny_qwen3moe), max_model_len=64,
                         max_num_seqs=1, threads=1)
    with running_server(config, load=False) as server:
        assert error_of(httpx.get(server.base_url + "/ready"), 503)
        assert httpx.get(server.base_url + "/health").status_code == 200
        error_of(post(server, "/v1/completions", {"prompt": "Hi"}), 503)
    with running_server(replace(config)) as server:
        assert httpx.get(server.base_url + "/ready").status_code == 200
        assert server.state.scheduler is not None
        server.state.scheduler.stop()  # the engine thread ends: the server cannot serve
        assert "engine thread" in error_of(httpx.get(server.base_url + "/health"),
                                           503)["message"]


def test_disconnect_of_a_non_streamed_request_cancels_it(tiny_qwen3moe: TinyModel) -> None:
    config = ServeConfig(model_path=tiny_path(tiny_qwen3moe), max_model_len=4096,
                         max_num_seqs=1, max_queued_requests=0, threads=1)
    with running_server(config) as server:
        stats = server.state.stats
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the socket
            post(server, "/v1/completions", {"prompt": "Once", "max_tokens": 4000,
                                             "temperature": 0}, timeout=0.5)
        with server.state.scheduler.lock:  # type: ignore[union-attr]
            assert stats.request_success_total.get("length", 0) == 0
        # The engine notices within a step or two; then the slot is free again.
        deadline = time.monotonic() + 20
        while stats.request_success_total.get("abort", 0) == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stats.request_success_total.get("abort", 0) == 1
        ok = post(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
        assert ok.status_code == 200, ok.text


def test_model_without_chat_template(gemma3_path: Path) -> None:
    """Gemma 3 270M's GGUF ships no template: chat is a 400 naming the fix, completions work;
    a template passed at startup (--chat-template) makes chat work."""
    config = ServeConfig(model_path=str(gemma3_path), max_model_len=64, max_num_seqs=1,
                         threads=2)
    messages = [{"role": "user", "content": "Hi"}]
    with running_server(config) as server:
        error = error_of(post(server, "/v1/chat/completions", {"messages": messages}), 400)
        assert "no chat template" in error["message"]
        assert post(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 2}).status_code \
            == 200
    template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    with running_server(replace(config, chat_template=template)) as server:
        tokens = post(server, "/tokenize", {"messages": messages}).json()["tokens"]
        assert tokens == server.engine.tokenizer.encode("Hi", add_special=False)
        ok = post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 2})
        assert ok.status_code == 200, ok.text
