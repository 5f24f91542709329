"""Forward pass vs Hugging Face transformers on tiny random Qwen3-MoE and Qwen3 models.

The GGUF files come from llama.cpp's converter (F32, F16, Q8_0) and the expected logits from
transformers in float64 (tests/reference/tiny_models.py), so neither side's layout or metadata
comes from numoe. Each test runs on both backends: the numpy reference (gguf-py dequantization,
float64) and the native CPU kernels (quantized weights and 8-bit activations, float32).

F16 and Q8_0 files hold rounded weights while transformers runs the exact ones, and the tiny
models' 151936-way softmax has near-ties (top-1 leads by < 0.01 logits at some positions), so
for those types greedy tokens are compared by teacher forcing on the reference's greedy
continuation: every step where the reference's top-1 leads by more than twice the largest logit
error the type produces (measured: F16 <= 0.06, Q8_0 <= 0.16) must agree, and at least 90% of
all steps.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from cluster.gguf import GGUFFile, open_gguf
from cluster.model import load_model_spec
from tests.models.metrics import greedy_decode, kl_divergence, max_relative_error, top1_margin
from tests.reference.tiny_models import TinyModel, reference_greedy, reference_logits
from worker.backends.base import Backend
from worker.backends.cpu import CpuBackend
from worker.backends.numpy_ref import NumpyRefBackend
from worker.model_runner import ModelRunner

N_CTX = 128
PROMPT_LEN = 32
N_GREEDY = 32
# Ordinary (non-special) Qwen2 ids start below 151643.
ORDINARY_VOCAB = 151_643

BACKENDS: dict[str, Callable[[], Backend]] = {
    "numpy": lambda: NumpyRefBackend(np.float64),
    "cpu": lambda: CpuBackend(n_threads=2),
}
# Per quantized type: (max |diff| / max |ref|, mean KL(ref || ours), clear-lead margin in logits)
QUANTIZED_BOUNDS = {"f16": (0.05, 1e-4, 0.12), "q8_0": (0.1, 2e-3, 0.32)}
# Share of the reference's greedy steps where our top-1 is the same token (measured: F16 >= 0.98,
# Q8_0 >= 0.95; the misses are all near-ties).
MIN_GREEDY_AGREEMENT = 0.9


def prompt_ids(seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(i) for i in rng.integers(0, ORDINARY_VOCAB, PROMPT_LEN)]


@pytest.fixture(scope="module", params=["qwen3moe", "qwen3"])
def tiny(request: pytest.FixtureRequest) -> TinyModel:
    return request.getfixturevalue(f"tiny_{request.param}")


_open_files: dict[str, GGUFFile] = {}


def make_runner(model: TinyModel, kind: str, backend: str) -> ModelRunner:
    path = str(model.gguf[kind])
    if path not in _open_files:
        _open_files[path] = open_gguf(path)
    gguf = _open_files[path]
    config, tensors = load_model_spec(gguf)
    return ModelRunner(config, tensors, gguf, BACKENDS[backend](), N_CTX)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_f32_logits_match_transformers(tiny: TinyModel, backend: str) -> None:
    ids = prompt_ids(0)
    expected = reference_logits(tiny, ids)  # [T, vocab]
    ours = make_runner(tiny, "f32", backend).forward(ids, 0, logits="all")  # [T, vocab]
    assert ours.shape == expected.shape
    assert max_relative_error(expected, ours) <= 1e-4


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_f32_greedy_matches_transformers(tiny: TinyModel, backend: str) -> None:
    runner = make_runner(tiny, "f32", backend)
    for seed in (1, 2):
        ids = prompt_ids(seed)[:8]
        assert greedy_decode(runner, ids, N_GREEDY) == reference_greedy(tiny, ids, N_GREEDY)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_decode_steps_match_one_batch(tiny: TinyModel, backend: str) -> None:
    """The KV-cache path (prompt batch, then single tokens) gives the logits of one batch."""
    ids = prompt_ids(3)
    whole = make_runner(tiny, "f32", backend).forward(ids, 0, logits="all")
    runner = make_runner(tiny, "f32", backend)
    steps = [runner.forward(ids[:20], 0, logits="all")]
    steps += [runner.forward([token], 20 + i, logits="all") for i, token in enumerate(ids[20:])]
    assert max_relative_error(whole, np.concatenate(steps)) <= 1e-5


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("kind", list(QUANTIZED_BOUNDS))
def test_quantized_close_to_transformers(tiny: TinyModel, kind: str, backend: str) -> None:
    max_error, max_mean_kl, clear_margin = QUANTIZED_BOUNDS[kind]
    runner = make_runner(tiny, kind, backend)
    agreements = []
    for seed in (4, 5):
        prompt = prompt_ids(seed)
        # Teacher forcing on the reference's greedy continuation: every position of it is a
        # greedy step of the reference model.
        sequence = prompt + reference_greedy(tiny, prompt, N_GREEDY)
        expected = reference_logits(tiny, sequence[:-1])  # [T, vocab]
        ours = runner.forward(sequence[:-1], 0, logits="all")  # [T, vocab]
        assert max_relative_error(expected, ours) <= max_error
        assert kl_divergence(expected, ours).mean() <= max_mean_kl
        same_top1 = ours.argmax(-1) == expected.argmax(-1)  # [T]
        clear = top1_margin(expected) > clear_margin  # [T]
        assert same_top1[clear].all(), "a clear greedy choice of the reference differs"
        agreements.append(same_top1[len(prompt) - 1 :].mean())  # the greedy steps
    assert np.mean(agreements) >= MIN_GREEDY_AGREEMENT
