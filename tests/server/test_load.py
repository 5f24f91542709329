"""Load test: 32 concurrent streaming clients for 60 s against `numoe serve` on Gemma 3 270M.

The server runs as its own process (`python -m cluster.cli serve`), so its RSS is read from
/proc and a leak in the engine, scheduler or HTTP stack shows up. Every client loops streaming
/v1/completions requests with varied prompts, lengths and sampling. What must hold:

* no errors at all, apart from the 503s that --max-queued-requests deliberately causes;
* RSS at the 60 s mark within 10% of RSS at the 20 s mark (warm by then);
* every request's tokens accounted for: per stream, the tokens streamed (one logprobs entry per
  token) equal usage.completion_tokens, and usage.prompt_tokens equals the prompt's length; over
  the whole run, the usage sums equal the server's /metrics counter deltas.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.reference.server_process import server_process as start_server_process
from tests.server.conftest import free_port

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
CLIENTS = 32
DURATION_S = 60.0
RSS_EARLY_S = 20.0
RSS_TOLERANCE = 0.10
MAX_NUM_SEQS = 8
# 8 running + 8 waiting < 32 clients, so some requests get 503; a short queue also keeps the
# drain after the 60 s mark short.
MAX_QUEUED_REQUESTS = 8
PREFILL_CHUNK_TOKENS = 32  # small, so the longer prompts are prefilled in several chunks
MAX_MODEL_LEN = 256
GREEDY_MAX_TOKENS = (16, 32, 48)  # few values, so identical greedy requests recur

PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):",
    "List three colours of the rainbow:",
    "Water boils at",
    "The quick brown fox",
    "Q: What is the largest planet in the solar system?\nA:",
    "In 1969, the first humans",
    "Translate to French: Good morning, how are you?",
    "A haiku about autumn leaves:",
    "The history of the printing press began in the fifteenth century, when Johannes "
    "Gutenberg combined movable metal type, oil-based ink and a screw press adapted from "
    "wine making. Within fifty years presses had spread to more than two hundred cities "
    "across Europe, and the number of books in circulation grew by orders of magnitude. "
    "Historians still debate which consequence mattered most, but",
    "Explain, step by step and in plain words, how a refrigerator keeps food cold, starting "
    "from the compressor and ending with the thermostat:",
)


@dataclass
class StreamResult:
    prompt_index: int
    as_token_ids: bool
    greedy: bool
    max_tokens: int
    expected_prompt_tokens: int
    text: str = ""
    streamed_tokens: int | None = None  # counted from per-token logprobs, when requested
    text_chunks: int = 0
    finish_reasons: list[str] = field(default_factory=list)
    usage: dict[str, int] | None = None
    done: bool = False


@dataclass
class LoadResults:
    completed: list[StreamResult] = field(default_factory=list)
    rejected_503: int = 0
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _vm_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024  # reported in kB
    raise AssertionError(f"no VmRSS for pid {pid}")


def _metrics(base_url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def _total(metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
           **labels: str) -> float:
    """Sum of a series over the labels not given (0 before the series exists)."""
    return sum(value for (sample, sample_labels), value in metrics.items()
               if sample == name and set(labels.items()) <= set(sample_labels))


@pytest.fixture(scope="module")
def server_process(gemma3_path: Path, tmp_path_factory: pytest.TempPathFactory
                   ) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    command = [sys.executable, "-m", "cluster.cli", "serve", str(gemma3_path),
               "--port", str(port), "--threads", "2", "--max-model-len", str(MAX_MODEL_LEN),
               "--max-num-seqs", str(MAX_NUM_SEQS),
               "--max-queued-requests", str(MAX_QUEUED_REQUESTS),
               "--max-num-batched-tokens", str(PREFILL_CHUNK_TOKENS)]
    base_url = f"http://127.0.0.1:{port}"
    with start_server_process(command, f"{base_url}/ready", log_path, "numoe serve",
                              timeout_s=180, cwd=REPO_ROOT) as process:
        yield process, base_url


def _prompt_token_ids(base_url: str) -> list[list[int]]:
    """Each prompt's ids as the server tokenizes a string prompt (BOS included)."""
    ids = []
    for prompt in PROMPTS:
        reply = httpx.post(f"{base_url}/tokenize", json={"prompt": prompt}, timeout=30)
        reply.raise_for_status()
        ids.append(reply.json()["tokens"])
    return ids


def _stream_once(client: httpx.Client, base_url: str, rng: random.Random,
                 prompt_ids: list[list[int]], results: LoadResults) -> None:
    index = rng.randrange(len(PROMPTS))
    greedy = rng.random() < 0.5
    as_token_ids = rng.random() < 0.5
    with_logprobs = rng.random() < 0.5
    max_tokens = rng.choice(GREEDY_MAX_TOKENS) if greedy else rng.randint(16, 48)
    body: dict[str, object] = {
        "prompt": prompt_ids[index] if as_token_ids else PROMPTS[index],
        "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True},
        "temperature": 0.0 if greedy else 0.8, "top_p": 0.95}
    if with_logprobs:
        body["logprobs"] = 1
    result = StreamResult(index, as_token_ids, greedy, max_tokens, len(prompt_ids[index]),
                          streamed_tokens=0 if with_logprobs else None)
    with client.stream("POST", f"{base_url}/v1/completions", json=body) as reply:
        if reply.status_code == 503:
            reply.read()
            with results.lock:
                results.rejected_503 += 1
            time.sleep(float(reply.headers.get("Retry-After", "1")) * rng.uniform(0.2, 1.0))
            return
        if reply.status_code != 200:
            raise AssertionError(f"HTTP {reply.status_code}: {reply.read().decode()}")
        for line in reply.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                result.done = True
                continue
            event = json.loads(data)
            if "error" in event:
                raise AssertionError(f"error event: {event}")
            if event.get("usage"):
                result.usage = event["usage"]
            for choice in event["choices"]:
                result.text += choice["text"]
                result.text_chunks += bool(choice["text"])
                if choice["finish_reason"] is not None:
                    result.finish_reasons.append(choice["finish_reason"])
                if result.streamed_tokens is not None and choice["logprobs"]:
                    result.streamed_tokens += len(choice["logprobs"]["tokens"])
    with results.lock:
        results.completed.append(result)


def _client(seed: int, base_url: str, prompt_ids: list[list[int]], stop_at: float,
            results: LoadResults) -> None:
    rng = random.Random(seed)
    with httpx.Client(timeout=120) as client:
        while time.monotonic() < stop_at:
            try:
                _stream_once(client, base_url, rng, prompt_ids, results)
            except Exception as error:  # noqa: BLE001 — every failure is a finding to report
                with results.lock:
                    results.errors.append(f"client {seed}: {type(error).__name__}: {error}")


def test_32_streaming_clients_for_60_s(
        server_process: tuple[subprocess.Popen[bytes], str]) -> None:
    process, base_url = server_process
    prompt_ids = _prompt_token_ids(base_url)
    before = _metrics(base_url)
    results = LoadResults()
    start = time.monotonic()
    stop_at = start + DURATION_S
    threads = [threading.Thread(target=_client, args=(seed, base_url, prompt_ids, stop_at,
                                                      results), daemon=True)
               for seed in range(CLIENTS)]
    for thread in threads:
        thread.start()
    time.sleep(max(0.0, start + RSS_EARLY_S - time.monotonic()))
    rss_early = _vm_rss_bytes(process.pid)
    time.sleep(max(0.0, stop_at - time.monotonic()))
    rss_late = _vm_rss_bytes(process.pid)
    for thread in threads:
        thread.join(timeout=180)
    assert not any(thread.is_alive() for thread in threads), "a client hung"
    after = _metrics(base_url)

    assert results.errors == [], f"{len(results.errors)} errors, e.g. {results.errors[:5]}"
    completed = results.completed
    # The batch must have turned over: at least twice as many streams as slots completed.
    assert len(completed) >= 2 * MAX_NUM_SEQS, f"only {len(completed)} streams completed"
    assert process.poll() is None, "the server died"

    growth = (rss_late - rss_early) / rss_early
    assert abs(growth) <= RSS_TOLERANCE, \
        f"server RSS {rss_early / 2**20:.0f} MiB at 20 s, {rss_late / 2**20:.0f} MiB at 60 s"

    for r in completed:
        assert r.done, f"stream without data: [DONE]: {r}"
        assert r.usage is not None, f"stream without a usage chunk: {r}"
        assert len(r.finish_reasons) == 1 and r.finish_reasons[0] in ("stop", "length"), r
        assert r.usage["prompt_tokens"] == r.expected_prompt_tokens, r
        generated = r.usage["completion_tokens"]
        assert r.usage["total_tokens"] == r.usage["prompt_tokens"] + generated, r
        assert 1 <= generated <= r.max_tokens, r
        if r.finish_reasons[0] == "length":  # the context (256) never binds here
            assert generated == r.max_tokens, r
        if r.streamed_tokens is not None:
            assert r.streamed_tokens == generated, r
        else:  # a token can end mid-character and stream nothing, never two chunks
            assert r.text_chunks <= generated, r

    # Greedy decoding must not depend on what else is in the batch.
    greedy_texts: dict[tuple[int, int], set[str]] = defaultdict(set)
    for r in completed:
        if r.greedy:
            greedy_texts[(r.prompt_index, r.max_tokens)].add(r.text)
    differing = {key: texts for key, texts in greedy_texts.items() if len(texts) > 1}
    assert not differing, f"greedy results changed under load: {differing}"

    generated_total = sum(r.usage["completion_tokens"] for r in completed if r.usage)
    prompt_total = sum(r.usage["prompt_tokens"] for r in completed if r.usage)
    assert (_total(after, "numoe:generation_tokens_total")
            - _total(before, "numoe:generation_tokens_total")) == generated_total
    assert (_total(after, "numoe:prompt_tokens_total")
            - _total(before, "numoe:prompt_tokens_total")) == prompt_total
    finished = Counter(r.finish_reasons[0] for r in completed)
    for reason in ("stop", "length"):
        delta = (_total(after, "numoe:request_success_total", finished_reason=reason)
                 - _total(before, "numoe:request_success_total", finished_reason=reason))
        assert delta == finished[reason], f"request_success_total{{{reason}}}"
    print(f"\n{len(completed)} streams, {results.rejected_503} deliberate 503s, "
          f"{generated_total} tokens generated, RSS {rss_early / 2**20:.0f} -> "
          f"{rss_late / 2**20:.0f} MiB")
