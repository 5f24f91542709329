"""The KV-cache storage dtype, a parameter of the runner: float16 (llama.cpp's default cache
type) on the native backend against the numpy reference keeping a float16 cache too, and
against transformers' float64 logits (tests/reference/tiny_models.py) on the tiny Qwen3 model.

A float16 cache rounds keys and values to 11 significant bits (relative error <= 2^-11); on
these tiny models the logits move by about that much, far less than a quantized weight type.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from numpy.typing import DTypeLike

from cluster.errors import NumoeError
from cluster.gguf import GGUFFile, open_gguf
from cluster.model import load_model_spec
from tests.models.metrics import max_relative_error
from tests.reference.tiny_models import TinyModel, reference_logits
from worker.backends.base import Backend
from worker.backends.cpu import CpuBackend
from worker.backends.numpy_ref import NumpyRefBackend
from worker.model_runner import ModelRunner

N_CTX = 64
PROMPT = [151, 9001, 42, 777, 31337, 5, 1234, 99999, 12, 640, 2048, 7, 150000, 88, 3, 4096]


@pytest.fixture(scope="module")
def gguf(tiny_qwen3: TinyModel) -> Iterator[GGUFFile]:
    # Open for the whole module: the runners' weights are views into its mapping.
    yield open_gguf(str(tiny_qwen3.gguf["f32"]))


def run_steps(gguf: GGUFFile, backend: Backend, kv_cache_dtype: DTypeLike) -> np.ndarray:
    """Logits [T, vocab] of PROMPT, as a batch of 10 then single decode steps."""
    config, tensors = load_model_spec(gguf)
    runner = ModelRunner(config, tensors, gguf, backend, N_CTX, kv_cache_dtype)
    assert runner.cache.keys.dtype == np.dtype(kv_cache_dtype)
    steps = [runner.forward(PROMPT[:10], 0, logits="all")]
    steps += [runner.forward([token], 10 + i, logits="all")
              for i, token in enumerate(PROMPT[10:])]
    return np.concatenate(steps).astype(np.float64)  # [T, vocab]


def test_float16_cache_native_matches_numpy_reference(tiny_qwen3: TinyModel,
                                                      gguf: GGUFFile) -> None:
    reference = reference_logits(tiny_qwen3, PROMPT)  # [T, vocab]
    native = run_steps(gguf, CpuBackend(n_threads=2), np.float16)
    numpy_f16 = run_steps(gguf, NumpyRefBackend(np.float64), np.float16)
    native_f32 = run_steps(gguf, CpuBackend(n_threads=2), np.float32)
    # Same rounding of the cache on both backends: they agree as closely as with float32 ...
    assert max_relative_error(numpy_f16, native) <= 1e-4  # measured 2e-5
    # ... and the rounding is really there: float16 moves the logits, within its 2^-11 step.
    assert not np.array_equal(native, native_f32)
    assert max_relative_error(reference, native) <= 2e-3  # measured 5e-4
    assert max_relative_error(reference, native_f32) <= 1e-4


def test_unsupported_cache_dtype_is_a_user_error(gguf: GGUFFile) -> None:
    config, tensors = load_model_spec(gguf)
    with pytest.raises(NumoeError, match="KV cache"):
        ModelRunner(config, tensors, gguf, CpuBackend(), N_CTX, np.int8)
