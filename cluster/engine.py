"""Single-sequence generation engine: GGUF + tokenizer + forward pass + sampler -> text stream.

    engine = Engine("model.gguf", backend="cpu", n_threads=2, n_ctx=2048)
    generation = engine.generate("Once upon a time", max_tokens=64, sampling=SamplingParams(0))
    for piece in generation:      # text pieces as they decode
        print(piece, end="")
    generation.stats              # prompt / generation token counts and seconds

The prompt is one forward batch; each new token is one decode step. Generation stops at the
tokenizer's end-of-generation ids (not emitted) or after max_tokens.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from cluster.errors import NumoeError
from cluster.gguf import open_gguf
from cluster.model import ModelConfig, TensorMap, load_model_spec
from cluster.sampling import Sampler, SamplingParams
from cluster.tokenizer import Tokenizer
from worker.backends.base import Backend
from worker.model_runner import ModelRunner

BackendName = Literal["cpu", "numpy"]
BACKENDS: tuple[str, ...] = ("cpu", "numpy")
DEFAULT_CTX = 4096
# Repetition penalties look at this many most recent tokens (llama.cpp's repeat_last_n).
PENALTY_LAST_N = 64


class Runner(Protocol):
    """What Generation needs of a forward pass: ModelRunner, or cluster.coordinator's
    ClusterRunner (which may also have close())."""

    def forward(self, token_ids: list[int] | np.ndarray, start: int,
                logits: Literal["last", "all"] = "last") -> np.ndarray: ...


# (model path, config, tensor index, n_ctx) -> a Runner; the engine reads only metadata itself.
RunnerFactory = Callable[[Path, ModelConfig, TensorMap, int], Runner]


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0  # the prompt's forward pass
    generated_tokens: int = 0  # sampled tokens, the end-of-generation token included
    decode_steps: int = 0  # single-token forward passes (generated_tokens - 1 at most)
    generation_seconds: float = 0.0  # from the end of the prompt pass to the last token
    stop_reason: str = ""  # "end_of_generation" | "max_tokens"

    @property
    def prompt_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def generation_tokens_per_s(self) -> float:
        """Decode speed: single-token forward passes per second (llama.cpp's "eval" rate)."""
        if self.generation_seconds <= 0:
            return 0.0
        return max(self.decode_steps, 1) / self.generation_seconds


def make_backend(name: str, n_threads: int | None = None, isa: str | None = None) -> Backend:
    if name == "cpu":
        from worker.backends.cpu import CpuBackend  # noqa: PLC0415 — loads the native module

        return CpuBackend(n_threads=n_threads, isa=isa)
    if name == "numpy":
        from worker.backends.numpy_ref import NumpyRefBackend  # noqa: PLC0415

        # float32 halves the memory of the dequantized weights; tests use float64 directly.
        return NumpyRefBackend(np.float32)
    raise NumoeError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")


class Engine:
    """One model, one sequence at a time. Not thread-safe."""

    def __init__(self, model_path: str | os.PathLike, backend: BackendName = "cpu",
                 n_threads: int | None = None, n_ctx: int = DEFAULT_CTX,
                 isa: str | None = None, kv_cache_dtype: str | None = None,
                 runner_factory: RunnerFactory | None = None, n_slots: int = 1) -> None:
        """kv_cache_dtype: "float32" or "float16" (llama.cpp's default cache type); None keeps
        the backend's activation dtype (float32 on the CPU backend). runner_factory: build the
        forward pass elsewhere (e.g. NUMA workers); backend, n_threads, isa and kv_cache_dtype
        are then the factory's business and the engine touches no weights. n_slots: KV-cache
        slots of the runner, sequences it can run at once (runner.forward_batch)."""
        if n_ctx <= 0:
            raise NumoeError(f"context size {n_ctx} must be a positive number of tokens")
        started = time.perf_counter()
        self.model_path = Path(model_path)
        self.gguf = open_gguf(self.model_path)
        try:
            self.config: ModelConfig
            self.config, tensors = load_model_spec(self.gguf)
            self.tokenizer = Tokenizer.from_gguf(self.gguf)
            # More context than the model was trained for only wastes KV-cache memory.
            self.n_ctx = min(n_ctx, self.config.context_length)
            self.runner: Runner
            if runner_factory is None:
                self.backend = make_backend(backend, n_threads, isa)
                self.runner = ModelRunner(self.config, tensors, self.gguf, self.backend,
                                          self.n_ctx, kv_cache_dtype, n_slots)
            else:
                self.runner = runner_factory(self.model_path, self.config, tensors, self.n_ctx)
        except BaseException:
            self.gguf.close()
            raise
        self.load_seconds = time.perf_counter() - started

    def close(self) -> None:
        close_runner = getattr(self.runner, "close", None)
        if close_runner is not None:
            close_runner()
        self.gguf.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def tokenize(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special=True, parse_special=True)
        return [int(token_id) for token_id in prompt]

    def generate(self, prompt: str | Sequence[int], max_tokens: int = 64,
                 sampling: SamplingParams | None = None) -> Generation:
        """Start generating; iterate the result for text pieces. `prompt` is text (tokenized
        with BOS as the model asks) or token ids. Checks sizes now, before any compute."""
        prompt_ids = self.tokenize(prompt)
        if not prompt_ids:
            raise NumoeError("the prompt is empty (no tokens); pass some text with -p/--prompt")
        if max_tokens < 0:
            raise NumoeError(f"max_tokens {max_tokens} must be >= 0")
        if len(prompt_ids) + max_tokens > self.n_ctx:
            raise NumoeError(
                f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) is "
                f"{len(prompt_ids) + max_tokens} tokens, more than the context size "
                f"({self.n_ctx}); shorten the prompt, lower -n/--n-predict or raise "
                f"-c/--ctx-size (the model allows up to {self.config.context_length})"
            )
        vocab = self.config.vocab_size
        bad = [i for i in prompt_ids if not 0 <= i < vocab]
        if bad:
            raise NumoeError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        return Generation(self, prompt_ids, max_tokens, sampling or SamplingParams(temperature=0))


class Generation:
    """An in-progress generation: iterate for text pieces; `token_ids` and `stats` fill as it
    runs."""

    def __init__(self, engine: Engine, prompt_ids: list[int], max_tokens: int,
                 sampling: SamplingParams) -> None:
        self.engine = engine
        self.prompt_ids = prompt_ids
        self.max_tokens = max_tokens
        self.sampling = sampling
        self.token_ids: list[int] = []  # generated ids, end-of-generation id included
        self.stats = GenerationStats(prompt_tokens=len(prompt_ids))

    def __iter__(self) -> Iterator[str]:
        engine = self.engine
        runner = engine.runner
        stop_ids = engine.tokenizer.end_of_generation_ids
        sampler = Sampler(self.sampling)
        decoder = engine.tokenizer.stream_decoder()
        stats = self.stats
        history = list(self.prompt_ids)  # what repetition penalties look at

        position = len(self.prompt_ids)
        if self.max_tokens == 0:
            stats.stop_reason = "max_tokens"
            return
        started = time.perf_counter()
        logits = runner.forward(self.prompt_ids, 0, logits="last")[0]  # [vocab]
        stats.prompt_seconds = time.perf_counter() - started

        # Only compute is timed: the consumer's time between pieces (printing) is not.
        while True:
            step_started = time.perf_counter()
            token_id = sampler.sample(logits, history[-PENALTY_LAST_N:])
            self.token_ids.append(token_id)
            history.append(token_id)
            stats.generated_tokens += 1
            finished = token_id in stop_ids
            piece = "" if finished else decoder.feed(token_id)
            stats.generation_seconds += time.perf_counter() - step_started
            if finished:
                stats.stop_reason = "end_of_generation"
                break
            if piece:
                yield piece
            if stats.generated_tokens >= self.max_tokens:
                stats.stop_reason = "max_tokens"
                break
            step_started = time.perf_counter()
            logits = runner.forward([token_id], position, logits="last")[0]  # [vocab]
            stats.generation_seconds += time.perf_counter() - step_started
            stats.decode_steps += 1
            position += 1
        tail = decoder.flush()
        if tail:
            yield tail

    def text(self) -> str:
        """Run to the end and return the whole text."""
        return "".join(self)
