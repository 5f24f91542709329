"""Serving throughput: numoe serve against llama.cpp's llama-server, same model, same workload.

For 1, 4 and 16 concurrent streaming clients, each engine gets the same prompts, max_tokens and
greedy decoding for a fixed window; we report aggregate generation tok/s (tokens of all
completed requests / wall time until the last one finishes) and time-to-first-token p50/p99,
then the ratios numoe / llama-server. Both servers use the same compute threads;
llama-server runs with --parallel 16 and a context of 16 x the per-request context, so each of
its slots holds as much as one numoe sequence. Prompt caching is off in llama-server
(cache_prompt: false), because numoe has none and both should do the same prefill work.

    python bench/serve_throughput.py [--model FILE] [--threads 2] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from tests.reference.llamacpp import llamacpp_dir  # noqa: E402
from tests.reference.server_process import ServerProcessError, server_process  # noqa: E402
from tests.server.conftest import free_port  # noqa: E402

PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "Q: What is the largest planet in the solar system?\nA:",
    "Explain, step by step and in plain words, how a refrigerator keeps food cold:",
    "def fibonacci(n):",
    "In 1969, the first humans",
    "A short story about a robot who learns to paint:",
    "The history of the printing press began",
)


@dataclass(frozen=True)
class Engine:
    name: str
    command: list[str]
    ready_path: str  # 200 once the model has loaded
    extra_body: dict[str, object]


@dataclass(frozen=True)
class LevelResult:
    concurrency: int
    requests: int
    tokens: int
    tokens_per_s: float
    ttft_p50_s: float
    ttft_p99_s: float


def llama_server() -> Path:
    """The llama-server binary; the build script adds it to an older cache (a few minutes)."""
    subprocess.run(["bash", str(REPO_ROOT / "bench" / "build_llamacpp.sh")], check=True)
    return llamacpp_dir() / "build" / "bin" / "llama-server"


@contextmanager
def serving(engine: Engine, port: int, log_path: Path) -> Iterator[str]:
    """The engine's server on `port` until the block ends; its output goes to `log_path`."""
    base_url = f"http://127.0.0.1:{port}"
    try:
        with server_process(engine.command, base_url + engine.ready_path, log_path,
                            engine.name, timeout_s=300, cwd=REPO_ROOT):
            yield base_url
    except ServerProcessError as error:
        raise SystemExit(f"{error}\n(log: {log_path})") from None


async def one_request(client: httpx.AsyncClient, base_url: str, engine: Engine, prompt: str,
                      max_tokens: int) -> tuple[float, int]:
    """Stream one greedy completion; (seconds to the first token, tokens generated)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}, **engine.extra_body}
    start = time.perf_counter()
    first_token_s = None
    chunks = 0
    usage_tokens = None
    async with client.stream("POST", f"{base_url}/v1/completions", json=body) as reply:
        if reply.status_code != 200:
            raise RuntimeError(f"{engine.name}: HTTP {reply.status_code}: "
                               f"{(await reply.aread()).decode()}")
        async for line in reply.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line.removeprefix("data: "))
            if event.get("usage"):
                usage_tokens = event["usage"]["completion_tokens"]
            for choice in event.get("choices", []):
                if choice.get("text"):
                    chunks += 1
                    if first_token_s is None:
                        first_token_s = time.perf_counter() - start
    if first_token_s is None:
        first_token_s = time.perf_counter() - start
    return first_token_s, usage_tokens if usage_tokens is not None else chunks


async def run_level(base_url: str, engine: Engine, concurrency: int, seconds: float,
                    max_tokens: int) -> LevelResult:
    """`concurrency` clients loop requests until `seconds` have passed; all then finish."""
    ttfts: list[float] = []
    tokens = 0
    requests = 0
    # A fresh connection per request for both engines: llama-server closes a streamed
    # response's connection, and a reused stale one fails with "Server disconnected".
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()

        async def client_loop(worker: int) -> None:
            nonlocal tokens, requests
            index = worker
            while time.perf_counter() - start < seconds:
                ttft, generated = await one_request(client, base_url, engine,
                                                    PROMPTS[index % len(PROMPTS)], max_tokens)
                ttfts.append(ttft)
                tokens += generated
                requests += 1
                index += concurrency

        await asyncio.gather(*(client_loop(w) for w in range(concurrency)))
        elapsed = time.perf_counter() - start
    return LevelResult(concurrency, requests, tokens, tokens / elapsed,
                       float(np.percentile(ttfts, 50)), float(np.percentile(ttfts, 99)))


async def warm_up(base_url: str, engine: Engine) -> None:
    """One short request, not measured: first-call costs (page faults, thread start)."""
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await one_request(client, base_url, engine, PROMPTS[0], 8)


def bench_engine(engine: Engine, port: int, levels: list[int], seconds: float,
                 max_tokens: int) -> list[LevelResult]:
    results = []
    log_path = Path(tempfile.gettempdir()) / f"serve_throughput-{engine.name}.log"
    with serving(engine, port, log_path) as base_url:
        asyncio.run(warm_up(base_url, engine))
        for concurrency in levels:
            result = asyncio.run(run_level(base_url, engine, concurrency, seconds, max_tokens))
            print(f"{engine.name:>12} x{concurrency:<3} {result.tokens_per_s:8.1f} tok/s  "
                  f"TTFT p50 {result.ttft_p50_s * 1e3:7.0f} ms  p99 "
                  f"{result.ttft_p99_s * 1e3:7.0f} ms  ({result.requests} requests)",
                  file=sys.stderr, flush=True)
            results.append(result)
    return results


def default_model() -> str:
    from cluster.default_model import default_model_path  # noqa: PLC0415

    return str(default_model_path())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="GGUF file (default: embedded Gemma 3)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=20.0, help="window per level")
    parser.add_argument("--levels", default="1,4,16", help="concurrent streams")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--ctx-per-request", type=int, default=256)
    args = parser.parse_args()
    model = args.model or default_model()
    levels = [int(level) for level in args.levels.split(",")]
    slots = max(levels)
    numoe = Engine("numoe", [
        sys.executable, "-m", "cluster.cli", "serve", model, "--port", "{port}",
        "--threads", str(args.threads), "--max-num-seqs", str(slots),
        "--max-model-len", str(args.ctx_per_request), "--max-queued-requests", "64"],
        "/ready", {})
    llama = Engine("llama-server", [
        str(llama_server()), "-m", model, "--host", "127.0.0.1", "--port", "{port}",
        "-t", str(args.threads), "-tb", str(args.threads), "--parallel", str(slots),
        "-c", str(slots * args.ctx_per_request), "--no-webui"],
        "/health", {"cache_prompt": False})
    results = {}
    for engine in (numoe, llama):
        port = free_port()
        engine = Engine(engine.name, [part.replace("{port}", str(port))
                                      for part in engine.command],
                        engine.ready_path, engine.extra_body)
        results[engine.name] = (engine, bench_engine(engine, port, levels, args.seconds,
                                                     args.max_tokens))

    print(f"`python bench/serve_throughput.py {shlex.join(sys.argv[1:])}`: "
          f"{Path(model).name}, {args.threads} threads, greedy, max_tokens {args.max_tokens}, "
          f"{args.seconds:.0f} s per level\n")
    for name, (engine, _) in results.items():
        print(f"- {name}: `{shlex.join(engine.command)}`")
    print("\n| streams | numoe tok/s | llama-server tok/s | ratio | numoe TTFT p50 / p99 (ms) "
          "| llama-server TTFT p50 / p99 (ms) | TTFT p50 ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for ours, theirs in zip(results["numoe"][1], results["llama-server"][1], strict=True):
        print(f"| {ours.concurrency} | {ours.tokens_per_s:.1f} | {theirs.tokens_per_s:.1f} | "
              f"{ours.tokens_per_s / theirs.tokens_per_s:.2f}x | "
              f"{ours.ttft_p50_s * 1e3:.0f} / {ours.ttft_p99_s * 1e3:.0f} | "
              f"{theirs.ttft_p50_s * 1e3:.0f} / {theirs.ttft_p99_s * 1e3:.0f} | "
              f"{ours.ttft_p50_s / theirs.ttft_p50_s:.2f}x |")


if __name__ == "__main__":
    main()
