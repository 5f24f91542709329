"""Continuous batching must not change results: 8 concurrent requests give exactly what each
gives alone, with sequences joining and leaving the batch and long prompts prefilled in
chunks between decode steps."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from cluster.server import ServeConfig
from tests.reference.tiny_models import TinyModel
from tests.server.conftest import RunningServer, running_server, tiny_path

pytestmark = pytest.mark.slow

# Different lengths (some several 16-token chunks long) and different max_tokens, so requests
# join and leave the running batch at different steps.
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a land far away, there lived a king who had three daughters and "
    "a very old dog named Biscuit, who",
    "1, 2, 3, 4, 5,",
    "def fibonacci(n):",
    "Water boils at",
    "The quick brown fox jumps over the lazy dog. " * 6,
    "In 1492,",
    "Dear Sir or Madam, I am writing to complain about the noise from the construction "
    "site next to my flat, which starts every morning at six",
]
MAX_TOKENS = [24, 9, 30, 17, 12, 20, 28, 15]


@pytest.fixture(scope="module")
def batching_server(tiny_qwen3moe: TinyModel) -> Iterator[RunningServer]:
    config = ServeConfig(model_path=tiny_path(tiny_qwen3moe), max_model_len=512,
                         max_num_seqs=8, max_num_batched_tokens=16, threads=2)
    with running_server(config) as server:
        yield server


def complete(server: RunningServer, index: int, stream: bool, seed: int | None = None) -> str:
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
    kwargs = {"temperature": 0.0} if seed is None else {"temperature": 0.9, "seed": seed}
    response = client.completions.create(model=server.model_name, prompt=PROMPTS[index],
                                         max_tokens=MAX_TOKENS[index], stream=stream, **kwargs)
    if stream:
        return "".join(chunk.choices[0].text for chunk in response if chunk.choices)
    return response.choices[0].text


def run_all(server: RunningServer, concurrent: bool) -> list[str]:
    # Even indices stream, odd ones do not; the last one samples with a seed.
    jobs = [(i, i % 2 == 0, 11 if i == len(PROMPTS) - 1 else None) for i in range(len(PROMPTS))]
    if not concurrent:
        return [complete(server, *job) for job in jobs]
    start = threading.Barrier(len(jobs))

    def job(args: tuple[int, bool, int | None]) -> str:
        start.wait()
        return complete(server, *args)

    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(job, jobs))


def test_concurrent_equals_alone(batching_server: RunningServer) -> None:
    alone = run_all(batching_server, concurrent=False)
    assert all(alone), "every request should produce some text"
    running_peak = 0
    stats = batching_server.state.stats
    stop = threading.Event()

    def watch() -> None:  # evidence that requests really shared the batch
        nonlocal running_peak
        while not stop.wait(0.001):
            running_peak = max(running_peak, stats.num_requests_running)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        together = run_all(batching_server, concurrent=True)
    finally:
        stop.set()
        watcher.join()
    assert together == alone
    assert running_peak > 1
