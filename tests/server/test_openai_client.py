"""The real `openai` client against a real server: completions and chat, streamed and not,
compared with the single-process engine generating alone."""

from __future__ import annotations

import httpx
import numpy as np
import openai
import pytest

from cluster.chat_template import ChatTemplate
from cluster.engine import Engine
from cluster.sampling import SamplingParams
from tests.server.conftest import RunningServer

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"
MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name three colours."}]


def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


def alone(engine: Engine, prompt: str | list[int], max_tokens: int) -> tuple[str, int]:
    """Greedy text and generated token count (end-of-generation token included)."""
    generation = engine.generate(prompt, max_tokens, SamplingParams(temperature=0))
    return generation.text(), len(generation.token_ids)


def chat_ids(engine: Engine) -> list[int]:
    text = ChatTemplate.from_gguf(engine.gguf, engine.tokenizer).render(MESSAGES)
    return engine.tokenizer.encode(text, add_special=False, parse_special=True)


def test_completion_matches_engine(qwen3moe_server: RunningServer,
                                   reference_engine: Engine) -> None:
    expected, n_tokens = alone(reference_engine, PROMPT, 12)
    result = client(qwen3moe_server).completions.create(
        model=qwen3moe_server.model_name, prompt=PROMPT, max_tokens=12, temperature=0)
    assert result.choices[0].text == expected
    assert result.usage is not None
    assert result.usage.prompt_tokens == len(reference_engine.tokenize(PROMPT))
    assert result.usage.completion_tokens == n_tokens
    assert result.choices[0].finish_reason == ("length" if n_tokens == 12 else "stop")


def test_completion_stream_with_usage(qwen3moe_server: RunningServer,
                                      reference_engine: Engine) -> None:
    expected, n_tokens = alone(reference_engine, PROMPT, 10)
    chunks = list(client(qwen3moe_server).completions.create(
        model=qwen3moe_server.model_name, prompt=PROMPT, max_tokens=10, temperature=0,
        stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == n_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] is not None


def test_chat_matches_engine(qwen3moe_server: RunningServer, reference_engine: Engine) -> None:
    expected, n_tokens = alone(reference_engine, chat_ids(reference_engine), 12)
    result = client(qwen3moe_server).chat.completions.create(
        model=qwen3moe_server.model_name, messages=MESSAGES, max_tokens=12, temperature=0)
    assert result.choices[0].message.role == "assistant"
    assert result.choices[0].message.content == expected
    assert result.usage is not None
    assert result.usage.prompt_tokens == len(chat_ids(reference_engine))
    assert result.usage.completion_tokens == n_tokens


def test_chat_stream(qwen3moe_server: RunningServer, reference_engine: Engine) -> None:
    expected, _ = alone(reference_engine, chat_ids(reference_engine), 12)
    stream = client(qwen3moe_server).chat.completions.create(
        model=qwen3moe_server.model_name, messages=MESSAGES, max_tokens=12, temperature=0,
        stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_stop_string_cuts_the_text(qwen3moe_server: RunningServer,
                                   reference_engine: Engine) -> None:
    full, _ = alone(reference_engine, PROMPT, 16)
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert stop, "the reference text is too short to pick a stop string"
    expected = full[:full.find(stop)]
    for stream in (False, True):
        response = client(qwen3moe_server).completions.create(
            model=qwen3moe_server.model_name, prompt=PROMPT, max_tokens=16, temperature=0,
            stop=[stop], stream=stream)
        if stream:
            chunks = [c.choices[0] for c in response]
            text, reason = "".join(c.text for c in chunks), chunks[-1].finish_reason
        else:
            text, reason = response.choices[0].text, response.choices[0].finish_reason
        assert (text, reason) == (expected, "stop")


def test_logprobs_match_the_model(qwen3moe_server: RunningServer,
                                  reference_engine: Engine) -> None:
    result = client(qwen3moe_server).completions.create(
        model=qwen3moe_server.model_name, prompt=PROMPT, max_tokens=1, temperature=0,
        logprobs=3)
    ids = reference_engine.tokenize(PROMPT)
    logits = reference_engine.runner.forward(ids, 0)[0].astype(np.float64)  # [vocab]
    log_probs = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
    best = int(np.argmax(logits))
    logprobs = result.choices[0].logprobs
    assert logprobs is not None and logprobs.token_logprobs is not None
    assert logprobs.token_logprobs[0] == pytest.approx(log_probs[best], abs=1e-6)
    assert logprobs.top_logprobs is not None
    top = sorted(logprobs.top_logprobs[0].values(), reverse=True)
    assert top == pytest.approx(sorted(np.sort(log_probs)[-3:], reverse=True), abs=1e-6)


def test_n_seeded_samples_repeat(qwen3moe_server: RunningServer) -> None:
    def sample() -> list[str]:
        result = client(qwen3moe_server).completions.create(
            model=qwen3moe_server.model_name, prompt=PROMPT, max_tokens=8, temperature=1.0,
            n=2, seed=7)
        return [c.text for c in sorted(result.choices, key=lambda c: c.index)]

    first = sample()
    assert len(first) == 2
    assert sample() == first


def test_models_health_ready_tokenize(qwen3moe_server: RunningServer,
                                      reference_engine: Engine) -> None:
    models = client(qwen3moe_server).models.list().data
    assert [m.id for m in models] == [qwen3moe_server.model_name]
    base = qwen3moe_server.base_url
    assert httpx.get(base + "/health").status_code == 200
    assert httpx.get(base + "/ready").status_code == 200
    tokens = httpx.post(base + "/tokenize", json={"prompt": PROMPT}).json()
    assert tokens["tokens"] == reference_engine.tokenizer.encode(PROMPT)
    text = httpx.post(base + "/detokenize", json={"tokens": tokens["tokens"]}).json()
    assert text["prompt"] == reference_engine.tokenizer.decode(tokens["tokens"])


def test_metrics_after_a_request(qwen3moe_server: RunningServer) -> None:
    client(qwen3moe_server).completions.create(
        model=qwen3moe_server.model_name, prompt=PROMPT, max_tokens=3, temperature=0)
    response = httpx.get(qwen3moe_server.base_url + "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {line.split("{")[0]: line for line in response.text.splitlines()
               if line.startswith("numoe:")}
    for name in ("numoe:prompt_tokens_total", "numoe:generation_tokens_total",
                 "numoe:time_to_first_token_seconds_count", "numoe:request_success_total"):
        assert name in samples
    assert float(samples["numoe:generation_tokens_total"].split()[-1]) >= 3


def test_cluster_plan_and_topology(qwen3moe_server: RunningServer) -> None:
    base = qwen3moe_server.base_url
    plan = httpx.get(base + "/v1/cluster/plan")
    assert plan.status_code == 200
    runner = qwen3moe_server.engine.runner
    assert plan.json() == runner.plan.to_dict()  # type: ignore[attr-defined]
    topology = httpx.get(base + "/v1/cluster/topology")
    assert topology.status_code == 404
    assert topology.json()["error"]["type"] == "not_found_error"
