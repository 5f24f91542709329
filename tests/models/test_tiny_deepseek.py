"""DeepSeek-V3 (`deepseek2`) through numoe's forward pass against transformers and llama.cpp.

The tiny random DeepseekV3ForCausalLM (tests/reference/tiny_deepseek.py: MLA with q_lora and
kv_lora ranks, YaRN, a leading dense layer, 16 routed experts in 4 groups (2 used) with sigmoid
scores and a score-correction bias, one shared expert) is converted by llama.cpp's own
converter to F32, F16 and Q8_0, and rewritten into the older combined attn_kv_b form. Expected
logits and greedy tokens come from transformers in float64 and from llama.cpp on the same file;
nothing here was produced by numoe. Each check runs on the numpy reference backend (gguf-py
dequantisation, float64) and the native CPU backend (float32, C kernels).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from cluster.errors import NumoeError
from cluster.gguf import GGUFFile, open_gguf
from cluster.model import load_model_spec
from tests.models.metrics import greedy_decode, max_relative_error
from tests.reference import llamacpp
from tests.reference.tiny_deepseek import legacy_gguf
from tests.reference.tiny_models import TinyModel, reference_greedy, reference_logits
from worker.backends.base import Backend
from worker.backends.cpu import CpuBackend
from worker.backends.numpy_ref import NumpyRefBackend
from worker.layers.attention import LatentCache
from worker.model_runner import ModelRunner

N_CTX = 96
N_GREEDY = 32  # transformers' greedy steps numoe must reproduce
N_LLAMACPP = 16  # llama.cpp's greedy steps numoe must reproduce
ORDINARY_VOCAB = 151_643  # Qwen2 ids below this are ordinary (non-special) tokens

BACKENDS: dict[str, Callable[[], Backend]] = {
    "numpy": lambda: NumpyRefBackend(np.float64),
    "cpu": lambda: CpuBackend(n_threads=2),
}
_open_files: dict[str, GGUFFile] = {}


def prompt_ids(seed: int, length: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(i) for i in rng.integers(0, ORDINARY_VOCAB, length)]


def gguf_path(model: TinyModel, form: str) -> Path:
    """"f32", "f16", "q8_0" as converted; "f32-kvb" the same F32 file in the attn_kv_b form."""
    kind, _, layout = form.partition("-")
    return legacy_gguf(model, kind) if layout == "kvb" else model.gguf[kind]


def make_runner(model: TinyModel, form: str, backend: str, **options: object) -> ModelRunner:
    path = str(gguf_path(model, form))
    if path not in _open_files:
        _open_files[path] = open_gguf(path)
    gguf = _open_files[path]
    config, tensors = load_model_spec(gguf)
    return ModelRunner(config, tensors, gguf, BACKENDS[backend](), N_CTX, **options)  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("form", ["f32", "f32-kvb"])
def test_f32_logits_match_transformers(tiny_deepseek: TinyModel, form: str,
                                       backend: str) -> None:
    ids = prompt_ids(0, 32)
    expected = reference_logits(tiny_deepseek, ids)  # [T, vocab] float64
    ours = make_runner(tiny_deepseek, form, backend).forward(ids, 0, logits="all")
    assert ours.shape == expected.shape
    assert max_relative_error(expected, ours) <= 1e-4


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("form", ["f32", "f16"])
def test_greedy_matches_transformers(tiny_deepseek: TinyModel, form: str, backend: str) -> None:
    """32 greedy steps through the KV cache (prompt batch, then one token per call) pick
    exactly transformers' tokens; F16 weights too (its rounding moves no choice here)."""
    runner = make_runner(tiny_deepseek, form, backend)
    ids = prompt_ids(1, 8)
    assert greedy_decode(runner, ids, N_GREEDY) == reference_greedy(tiny_deepseek, ids, N_GREEDY)


@pytest.mark.parametrize("form", ["f32", "f16", "f32-kvb"])
def test_greedy_matches_llamacpp(tiny_deepseek: TinyModel, form: str) -> None:
    """llama.cpp loads the very GGUF numoe reads and picks the same 16 greedy tokens."""
    ids = prompt_ids(2, 8)
    expected = llamacpp.greedy(gguf_path(tiny_deepseek, form), ids, N_LLAMACPP)
    runner = make_runner(tiny_deepseek, form, "cpu")
    assert greedy_decode(runner, ids, N_LLAMACPP) == expected


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("kv_cache_dtype", [None, "float16"])
def test_absorbed_equals_expanded(tiny_deepseek: TinyModel, backend: str,
                                  kv_cache_dtype: str | None) -> None:
    """The latent (absorbed) path and the decompressed per-head keys and values give the same
    logits, for the prompt and for each decode step after it, over the same cache."""
    ids = prompt_ids(3, 24)
    results = []
    for absorbed in (True, False):
        runner = make_runner(tiny_deepseek, "f32", backend, kv_cache_dtype=kv_cache_dtype)
        runner.shard.mla.absorbed = absorbed  # type: ignore[union-attr]
        steps = [runner.forward(ids[:16], 0, logits="all")]
        steps += [runner.forward([token], 16 + i) for i, token in enumerate(ids[16:])]
        results.append(np.concatenate(steps))  # [T, vocab]
    absorbed_logits, expanded_logits = results
    assert max_relative_error(expanded_logits, absorbed_logits) <= 1e-4


def test_latent_cache_holds_kv_lora_plus_rope_per_token(tiny_deepseek: TinyModel) -> None:
    runner = make_runner(tiny_deepseek, "f32", "cpu", kv_cache_dtype="float16")
    config = runner.config
    cache = runner.cache
    assert isinstance(cache, LatentCache)
    width = config.kv_lora_rank + config.qk_rope_head_dim  # 32 + 16 for the tiny model
    assert config.kv_cache_width == width
    assert cache.latents.shape == (config.n_layers, N_CTX, width)
    assert cache.n_bytes == config.n_layers * N_CTX * width * 2
    # What a cache of full keys and values per head would take instead:
    per_head = config.n_heads * (config.head_dim + config.value_head_dim)
    assert per_head > 5 * width


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_decode_steps_match_one_batch(tiny_deepseek: TinyModel, backend: str) -> None:
    ids = prompt_ids(4, 28)
    whole = make_runner(tiny_deepseek, "f32", backend).forward(ids, 0, logits="all")
    runner = make_runner(tiny_deepseek, "f32", backend)
    steps = [runner.forward(ids[:20], 0, logits="all")]
    steps += [runner.forward([token], 20 + i, logits="all") for i, token in enumerate(ids[20:])]
    assert max_relative_error(whole, np.concatenate(steps)) <= 1e-5


def test_q8_0_matches_llamacpp(tiny_deepseek: TinyModel) -> None:
    """Q8_0 weights: numoe and llama.cpp quantize activations alike, so their logits agree far
    more closely than either agrees with the float model (measured: 0.016 against 0.063)."""
    ids = prompt_ids(5, 16)
    path = gguf_path(tiny_deepseek, "q8_0")
    theirs = llamacpp.logits(path, ids)  # [T, vocab]
    ours = make_runner(tiny_deepseek, "q8_0", "cpu").forward(ids, 0, logits="all")
    exact = reference_logits(tiny_deepseek, ids)
    between = max_relative_error(theirs, ours)
    assert between <= 0.5 * max_relative_error(exact, theirs), between


class _NoMlaBackend(NumpyRefBackend):
    """A backend that runs every other architecture (as the CUDA backend does today)."""

    attention_latent = Backend.attention_latent


def test_backend_without_mla_is_refused_at_load(tiny_deepseek: TinyModel) -> None:
    with open_gguf(str(tiny_deepseek.gguf["f32"])) as gguf:
        config, tensors = load_model_spec(gguf)
        with pytest.raises(NumoeError, match="cannot run multi-head latent attention.*cpu"):
            ModelRunner(config, tensors, gguf, _NoMlaBackend(), N_CTX)
