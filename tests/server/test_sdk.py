"""numoe's client SDK (numoe/client.py) against a real server: typed results equal what the
single-process engine generates alone, the numoe-only endpoints, async use, and retries on 503
(a real server still loading)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

import numoe
from cluster.engine import Engine
from cluster.sampling import SamplingParams
from cluster.server import ServeConfig
from tests.reference.tiny_models import TinyModel
from tests.server.conftest import RunningServer, running_server, tiny_path

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"


def alone(engine: Engine, prompt: str, max_tokens: int) -> str:
    return engine.generate(prompt, max_tokens, SamplingParams(temperature=0)).text()


def test_complete_and_stream_match_engine(qwen3moe_server: RunningServer,
                                          reference_engine: Engine) -> None:
    expected = alone(reference_engine, PROMPT, 12)
    with numoe.Client(qwen3moe_server.base_url) as client:
        result = client.complete(PROMPT, max_tokens=12, temperature=0)
        assert isinstance(result, numoe.Completion) and result.text == expected
        assert result.usage is not None
        assert result.usage.prompt_tokens == len(reference_engine.tokenize(PROMPT))
        assert result.model == qwen3moe_server.model_name
        assert "".join(client.stream(PROMPT, max_tokens=12, temperature=0)) == expected


def test_chat_and_stream_chat_agree(qwen3moe_server: RunningServer) -> None:
    messages = [{"role": "user", "content": "Name three colours."}]
    with numoe.Client(qwen3moe_server.base_url) as client:
        whole = client.chat(messages, max_tokens=10, temperature=0)
        streamed = "".join(client.stream_chat(messages, max_tokens=10, temperature=0))
    assert whole.text == streamed and whole.finish_reason in ("stop", "length")


def test_tokenize_round_trip(qwen3moe_server: RunningServer, reference_engine: Engine) -> None:
    with numoe.Client(qwen3moe_server.base_url) as client:
        ids = client.tokenize(PROMPT)
        assert ids == reference_engine.tokenize(PROMPT)
        assert client.detokenize(ids) == reference_engine.tokenizer.decode(ids)
        assert client.health() and client.ready()
        assert client.models() == [qwen3moe_server.model_name]


def test_cluster_calls(qwen3moe_server: RunningServer, reference_engine: Engine) -> None:
    """Single process: a one-worker plan, no topology (404 as an APIError); expert load from
    the runner's counters: every layer routed the same tokens x top-k, imbalance = max / mean."""
    with numoe.Client(qwen3moe_server.base_url) as client:
        client.complete(PROMPT, max_tokens=4, temperature=0)
        plan = client.plan()
        with pytest.raises(numoe.APIError) as error:
            client.topology()
        loads = client.expert_load()
    assert error.value.status == 404 and "single-process" in error.value.message
    assert len(plan.workers) == 1 and plan.architecture == "qwen3moe"
    assert plan.workers[0].weight_bytes == sum(
        t.n_bytes for t in reference_engine.gguf.tensors.values())
    config = reference_engine.config
    assert [load.layer for load in loads] == list(range(config.n_layers))
    sums = {sum(load.tokens) for load in loads}
    assert len(sums) == 1 and sums.pop() % config.n_experts_used == 0
    for load in loads:
        tokens = np.array(load.tokens)
        assert len(tokens) == config.n_experts
        assert load.imbalance == pytest.approx(tokens.max() / tokens.mean())


def test_async_client(qwen3moe_server: RunningServer, reference_engine: Engine) -> None:
    expected = alone(reference_engine, PROMPT, 8)

    async def run() -> tuple[str, str, list[int]]:
        async with numoe.AsyncClient(qwen3moe_server.base_url) as client:
            whole = await client.complete(PROMPT, max_tokens=8, temperature=0)
            pieces = [p async for p in client.stream(PROMPT, max_tokens=8, temperature=0)]
            return whole.text, "".join(pieces), await client.tokenize(PROMPT)

    whole, streamed, ids = asyncio.run(run())
    assert whole == streamed == expected
    assert ids == reference_engine.tokenize(PROMPT)


def test_retries_503_with_backoff(tiny_qwen3moe: TinyModel,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that has not loaded its model answers 503: the client retries max_retries
    times, sleeping the backoff (or the server's Retry-After), then raises the 503."""
    slept: list[float] = []
    monkeypatch.setattr("numoe.client._sleep", slept.append)
    config = ServeConfig(model_path=tiny_path(tiny_qwen3moe), max_model_len=64)
    with running_server(config, load=False) as server:
        with numoe.Client(server.base_url, max_retries=3, backoff_s=0.1) as client:
            assert not client.ready()
            with pytest.raises(numoe.APIError) as error:
                client.models()
    assert error.value.status == 503
    assert len(slept) == 3
    assert all(delay >= 0 for delay in slept)
    assert slept == sorted(slept)  # Retry-After, or a backoff that grows
