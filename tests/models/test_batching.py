"""Continuous batching is invisible in the results: with greedy decoding, sequences run
together through forward_batch give bit-identical logits (and so the same tokens) at every
step as each gives alone (issue 4).

The reference is the same model run one sequence at a time through forward_batch (slot 0 of
its own runner): a prompt in one call, then one decode step per call. The batched run mixes
sequences that arrive and finish at different steps, prompts and decode steps in one call,
more sequences than slots (a finished sequence's slot goes to a new one, which overwrites it
from position 0), and prompt lengths on both sides of the kernels' GEMM thresholds (4, 8 and
12 tokens: native/src/gemm.h), which forward_batch must not cross. Its prompts, computed row
by row, also stay close to `forward`'s prompt GEMM.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import pytest

from cluster.errors import NumoeError
from cluster.gguf import GGUFFile, open_gguf
from cluster.model import load_model_spec
from tests.reference.tiny_models import TinyModel
from worker.backends.base import Backend
from worker.backends.cpu import CpuBackend
from worker.backends.numpy_ref import NumpyRefBackend
from worker.batch import SequenceChunk
from worker.model_runner import ModelRunner

N_CTX = 48
N_SLOTS = 5  # fewer than the sequences: slots are reused


class Runner(Protocol):
    n_slots: int

    def forward_batch(self, chunks: Sequence[SequenceChunk]) -> np.ndarray: ...


@dataclass(frozen=True)
class Request:
    prompt: tuple[int, ...]
    n_decode: int  # decode steps after the prompt
    arrival: int  # first tick at which it may be admitted


@dataclass
class _Live:
    request: int
    slot: int
    position: int  # tokens in the slot so far
    logits: list[np.ndarray] = field(default_factory=list)


def make_requests(n: int, vocab: int, seed: int = 0, per_tick: int = 2) -> list[Request]:
    """n requests with prompts of 1 to 20 tokens, 3 to 8 decode steps, `per_tick` arriving
    at each tick."""
    rng = np.random.default_rng(seed)
    lengths = [3, 13, 1, 9, 20, 5, 12, 7, 16, 2]
    return [Request(tuple(int(t) for t in rng.integers(0, vocab, lengths[i % len(lengths)])),
                    n_decode=int(rng.integers(3, 9)), arrival=i // per_tick)
            for i in range(n)]


def run_alone(runner: Runner, request: Request) -> list[np.ndarray]:
    """Logits [vocab] of the prompt's last token and of every greedy decode step, float32 as
    forward_batch returns them (the numpy backend computes in float64)."""
    out = [runner.forward_batch([SequenceChunk(0, 0, request.prompt)])[0]]
    position = len(request.prompt)
    for _ in range(request.n_decode):
        step = SequenceChunk(0, position, (int(np.argmax(out[-1])),))
        out.append(runner.forward_batch([step])[0])
        position += 1
    return out


def run_batched(runner: Runner, requests: Sequence[Request],
                mixed: Callable[[int], bool] = lambda tick: tick % 2 == 0
                ) -> list[list[np.ndarray]]:
    """Every request through forward_batch: each tick, one call with a decode step of every
    live sequence and, on ticks where mixed(tick), the prompts of newly admitted ones (else
    each prompt in a call of its own first). Returns the logits per request, as run_alone."""
    results: list[list[np.ndarray]] = [[] for _ in requests]
    live: list[_Live] = []
    waiting = list(range(len(requests)))
    tick = 0
    while waiting or live:
        free = sorted(set(range(runner.n_slots)) - {s.slot for s in live})
        admitted = []
        for index in [i for i in waiting if requests[i].arrival <= tick][:len(free)]:
            waiting.remove(index)
            admitted.append(_Live(index, free.pop(0), 0))
        chunks: list[SequenceChunk] = []
        owners: list[_Live] = []
        for seq in live:  # one decode step each: the greedy token of its last logits
            chunks.append(SequenceChunk(seq.slot, seq.position, (int(np.argmax(seq.logits[-1])),)))
            owners.append(seq)
        for seq in admitted:
            chunk = SequenceChunk(seq.slot, 0, requests[seq.request].prompt)
            if mixed(tick):
                chunks.append(chunk)
                owners.append(seq)
            else:
                seq.logits.append(runner.forward_batch([chunk])[0])
                seq.position = len(chunk.token_ids)
        if chunks:
            logits = runner.forward_batch(chunks)  # [len(chunks), vocab]
            assert logits.shape[0] == len(chunks)
            for seq, chunk, row in zip(owners, chunks, logits, strict=True):
                seq.logits.append(row)
                seq.position = chunk.start + len(chunk.token_ids)
        live += admitted
        for seq in list(live):
            if len(seq.logits) == requests[seq.request].n_decode + 1:
                results[seq.request] = seq.logits
                live.remove(seq)
        tick += 1
    return results


def assert_same(alone: list[list[np.ndarray]], batched: list[list[np.ndarray]]) -> None:
    for index, (want, got) in enumerate(zip(alone, batched, strict=True)):
        assert len(got) == len(want), f"request {index}: {len(got)} steps, want {len(want)}"
        for step, (a, b) in enumerate(zip(want, got, strict=True)):
            assert np.array_equal(a, b), (
                f"request {index} step {step}: batched logits differ from alone by up to "
                f"{np.max(np.abs(a - b))}")
            assert int(np.argmax(a)) == int(np.argmax(b))


def check_model(gguf: GGUFFile, make_backend: Callable[[], Backend], n_requests: int = 8,
                n_slots: int = N_SLOTS, per_tick: int = 2) -> None:
    config, tensors = load_model_spec(gguf)
    requests = make_requests(n_requests, config.vocab_size, per_tick=per_tick)
    alone_runner = ModelRunner(config, tensors, gguf, make_backend(), N_CTX)
    alone = [run_alone(alone_runner, r) for r in requests]
    batched_runner = ModelRunner(config, tensors, gguf, make_backend(), N_CTX, n_slots=n_slots)
    assert_same(alone, run_batched(batched_runner, requests))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["q8_0", "f32"])
def test_tiny_qwen3moe_batched_equals_alone(tiny_qwen3moe: TinyModel, dtype: str) -> None:
    # Up to 14 decode rows a call: past every type's GEMM threshold (12 tokens at most).
    with open_gguf(str(tiny_qwen3moe.gguf[dtype])) as gguf:
        check_model(gguf, lambda: CpuBackend(n_threads=2), n_requests=16, n_slots=14,
                    per_tick=6)


@pytest.mark.slow
def test_tiny_qwen3moe_numpy_backend(tiny_qwen3moe: TinyModel) -> None:
    with open_gguf(str(tiny_qwen3moe.gguf["q8_0"])) as gguf:
        check_model(gguf, lambda: NumpyRefBackend(np.float64), n_requests=6)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["q8_0", "f32"])
def test_tiny_deepseek_batched_equals_alone(tiny_deepseek: TinyModel, dtype: str) -> None:
    # MLA: the per-head products (k_b, v_b) and the latent attention take rows one by one too.
    with open_gguf(str(tiny_deepseek.gguf[dtype])) as gguf:
        check_model(gguf, lambda: CpuBackend(n_threads=2), n_requests=12, n_slots=10,
                    per_tick=5)


@pytest.mark.slow
def test_tiny_deepseek_numpy_backend(tiny_deepseek: TinyModel) -> None:
    with open_gguf(str(tiny_deepseek.gguf["q8_0"])) as gguf:
        check_model(gguf, lambda: NumpyRefBackend(np.float64), n_requests=6)


@pytest.mark.slow
def test_gemma3_batched_equals_alone(gemma3_path) -> None:  # noqa: ANN001
    # 16 requests in 14 slots, 6 arriving per tick: calls of 12 and more decode rows, where a
    # plain product of Q4_K / Q6_K weights would switch to the GEMM.
    with open_gguf(str(gemma3_path)) as gguf:
        check_model(gguf, lambda: CpuBackend(n_threads=2), n_requests=16, n_slots=14,
                    per_tick=6)


def test_batched_prompts_stay_close_to_the_prompt_gemm(tiny_qwen3moe: TinyModel) -> None:
    """forward_batch computes prompts row by row (8-bit activations for integer weights);
    `forward` multiplies them in the float GEMM. Same model, same tokens: F32 weights agree
    to float rounding, Q8_0 within the activation rounding, and the argmax is the same."""
    for dtype, rtol in (("f32", 1e-4), ("q8_0", 0.05)):
        with open_gguf(str(tiny_qwen3moe.gguf[dtype])) as gguf:
            config, tensors = load_model_spec(gguf)
            runner = ModelRunner(config, tensors, gguf, CpuBackend(n_threads=2), N_CTX,
                                 n_slots=2)
            prompt = tuple(range(3, 40))  # 37 tokens: the prompt GEMM for every type
            gemm = runner.forward(list(prompt), 0)[-1]  # [vocab]
            rows = runner.forward_batch([SequenceChunk(1, 0, prompt)])[0]  # [vocab]
            error = np.max(np.abs(rows - gemm)) / np.max(np.abs(gemm))
            assert 0 < error <= rtol, f"{dtype}: relative error {error}"
            assert int(np.argmax(rows)) == int(np.argmax(gemm))


def test_rows_alone_differs_from_plain_matmul() -> None:
    """The guard the batched path needs: 8 float32 rows in one plain call take the GEMM and
    differ from each row alone, while the rows_alone call matches them bit for bit."""
    from native import kernels  # noqa: PLC0415

    rng = np.random.default_rng(1)
    weight = rng.standard_normal((96, 256)).astype(np.float32)  # [n_out, n_in]
    x = rng.standard_normal((8, 256)).astype(np.float32)  # [T, n_in]
    view = kernels.WeightView(0, weight.shape, weight.view(np.uint8).ravel(), "w")
    alone = np.concatenate([kernels.matmul_view(view, x[t : t + 1]) for t in range(8)])
    assert np.array_equal(kernels.matmul_view(view, x, rows_alone=True), alone)
    assert not np.array_equal(kernels.matmul_view(view, x), alone)


def test_bad_chunks_are_refused(tiny_qwen3moe: TinyModel) -> None:
    with open_gguf(str(tiny_qwen3moe.gguf["f32"])) as gguf:
        config, tensors = load_model_spec(gguf)
        runner = ModelRunner(config, tensors, gguf, CpuBackend(n_threads=2), 16, n_slots=2)
        cases = [
            ([SequenceChunk(2, 0, (1,))], "outside \\[0, 2\\)"),
            ([SequenceChunk(0, 0, (1,)), SequenceChunk(0, 1, (2,))], "appears twice"),
            ([SequenceChunk(1, 10, tuple(range(7)))], "exceed the context of 16"),
            ([SequenceChunk(0, 0, ())], "no tokens"),
            ([], "at least one"),
            ([SequenceChunk(0, 0, (config.vocab_size,))], "outside the vocabulary"),
        ]
        for chunks, message in cases:
            with pytest.raises(NumoeError, match=message):
                runner.forward_batch(chunks)
