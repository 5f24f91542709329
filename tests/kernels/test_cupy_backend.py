"""CupyBackend (worker/backends/cupy_gpu.py) against gguf-py and the numpy reference backend.

Every test runs on two devices: "host", the CUDA kernels' device code built for the CPU
(HostKernels; it runs wherever g++ does and checks the block layouts, the rounding and all of the
backend's Python), and "cuda", the real kernels on a GPU, skipped with its reason when CuPy or a
CUDA device is missing. References are independent of the kernels: gguf-py's dequantization,
float64 numpy products, NumpyRefBackend(float64) forward passes. The random weights, synthetic
models and measures are bench/gpu_backend.py's, the script that runs the same checks on a bare
GPU machine.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QType

from bench.gpu_backend import (
    ALL_TYPES,
    F16_CACHE_LOGIT_BOUND,
    LOGIT_BOUND,
    PRODUCT_BOUND,
    SYNTHETIC,
    dequantize_mismatches,
    ffn_error,
    forward_errors,
    matmul_error,
    random_weight,
    weight_data,
    write_synthetic_model,
)
from cluster.errors import NumoeError
from cluster.gguf import open_gguf
from cluster.model import load_model_spec
from tests.models.metrics import kl_divergence, max_relative_error
from tests.reference.tiny_models import TinyModel
from worker.backends.cuda_kernels import HostKernels
from worker.backends.cupy_gpu import CudaKernels, CupyBackend, Kernels
from worker.backends.numpy_ref import NumpyRefBackend
from worker.model_runner import ModelRunner


def _cuda_unavailable() -> str | None:
    """Why the GPU tests cannot run here, or None when they can."""
    if importlib.util.find_spec("cupy") is None:
        return "CuPy is not installed (pip install cupy-cuda12x)"
    import cupy  # noqa: PLC0415 — optional: only where it is installed

    try:
        n_devices = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError as error:
        return f"no usable CUDA device ({error})"
    return None if n_devices > 0 else "no CUDA device"


CUDA_UNAVAILABLE = _cuda_unavailable()
DEVICES = ["host", pytest.param("cuda", marks=pytest.mark.skipif(
    CUDA_UNAVAILABLE is not None, reason=str(CUDA_UNAVAILABLE)))]


@pytest.fixture(scope="module", params=DEVICES)
def kernels(request: pytest.FixtureRequest) -> Kernels:
    if request.param == "cuda":
        return CudaKernels()
    try:
        return HostKernels()
    except NumoeError as error:  # no C++ compiler
        pytest.skip(str(error))


@pytest.fixture(scope="module")
def backend(kernels: Kernels) -> CupyBackend:
    return CupyBackend(kernels=kernels)


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_dequantize_is_bit_exact_with_gguf_py(kernels: Kernels, qtype: QType) -> None:
    differ, total = dequantize_mismatches(kernels, qtype, seed=int(qtype))
    assert total > 0 and differ == 0


@pytest.mark.parametrize("n_tokens", [1, 3, 20])  # matvec kernel (< 16 tokens), then GEMM
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_matmul_matches_float64(backend: CupyBackend, qtype: QType, n_tokens: int) -> None:
    assert matmul_error(backend, qtype, n_tokens, seed=n_tokens) <= PRODUCT_BOUND


FFN_TYPES = [(QType.Q4_K, QType.Q5_K, QType.Q6_K), (QType.Q8_0, QType.Q4_0, QType.Q5_0),
             (QType.F16, QType.BF16, QType.F32)]


@pytest.mark.parametrize("n_tokens", [1, 4, 20])
@pytest.mark.parametrize("types", FFN_TYPES, ids=lambda ts: "/".join(t.name for t in ts))
def test_gated_ffn_matches_numpy_reference(backend: CupyBackend, types: tuple[QType, ...],
                                           n_tokens: int) -> None:
    assert ffn_error(backend, types, n_tokens, "gelu_tanh") <= PRODUCT_BOUND


@pytest.mark.parametrize("skip_slots", [False, True], ids=["all-slots", "skipped-slots"])
@pytest.mark.parametrize("n_tokens", [1, 4, 20])
@pytest.mark.parametrize("types", FFN_TYPES, ids=lambda ts: "/".join(t.name for t in ts))
def test_moe_matches_numpy_reference(backend: CupyBackend, types: tuple[QType, ...],
                                     n_tokens: int, skip_slots: bool) -> None:
    assert ffn_error(backend, types, n_tokens, "silu", n_experts=8,
                     skip_slots=skip_slots) <= PRODUCT_BOUND


def test_only_lm_head_products_return_to_host(backend: CupyBackend) -> None:
    rng = np.random.default_rng(0)
    shape = (40, 256)
    raw = random_weight(QType.Q8_0, shape, rng)
    x = backend.kernels.upload(rng.standard_normal((2, 256), dtype=np.float32))
    logits = backend.matmul(backend.load_weight(weight_data("output.weight", QType.Q8_0, raw,
                                                            shape)), x)
    hidden = backend.matmul(backend.load_weight(weight_data("blk.0.attn_q.weight", QType.Q8_0,
                                                            raw, shape)), x)
    assert type(logits) is np.ndarray and logits.shape == (2, 40)
    assert isinstance(hidden, backend.xp.ndarray)
    np.testing.assert_array_equal(logits, backend.kernels.download(hidden))


def test_unsupported_type_names_type_and_fix(backend: CupyBackend) -> None:
    q4_1 = weight_data("blk.0.ffn_up.weight", QType.Q4_1, np.zeros((4, 20), np.uint8), (4, 32))
    with pytest.raises(NumoeError, match=r"Q4_1.*supported: .*Q4_K.*llama-quantize"):
        backend.load_weight(q4_1)


def test_embedding_rejects_ids_outside_vocabulary(backend: CupyBackend) -> None:
    shape = (10, 32)
    embd = backend.load_weight(weight_data("token_embd.weight", QType.Q8_0,
                                           random_weight(QType.Q8_0, shape,
                                                         np.random.default_rng(0)), shape))
    with pytest.raises(NumoeError, match=r"token id 10 is outside the vocabulary \[0, 10\)"):
        backend.embedding(embd, np.array([3, 10]))


@pytest.mark.skipif(CUDA_UNAVAILABLE is None, reason="a CUDA device is available here")
def test_without_gpu_construction_is_a_clear_error() -> None:
    with pytest.raises(NumoeError, match=r"cuda backend needs (CuPy|an NVIDIA GPU)"):
        CupyBackend()


def test_tiny_qwen3moe_f32_forward_matches_numpy_reference(kernels: Kernels,
                                                           tiny_qwen3moe: TinyModel) -> None:
    """Prompt batch, decode steps and a small batch (worker.model_runner, unmodified)."""
    errors = forward_errors(tiny_qwen3moe.gguf["f32"], lambda: CupyBackend(kernels=kernels))
    assert max(errors) <= LOGIT_BOUND


@pytest.mark.parametrize("name", list(SYNTHETIC))
def test_synthetic_model_forward_matches_numpy_reference(
        kernels: Kernels, name: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    """gemma3 (sliding window over a 24-token prompt, soft-cap, tied head), qwen3moe and qwen3,
    with every weight type among their matrices."""
    path = write_synthetic_model(SYNTHETIC[name], tmp_path_factory.mktemp(name) / "m.gguf")
    errors = forward_errors(path, lambda: CupyBackend(kernels=kernels))
    assert max(errors) <= LOGIT_BOUND


def test_float16_kv_cache_forward_matches_numpy_reference(
        kernels: Kernels, tmp_path: Path) -> None:
    path = write_synthetic_model(SYNTHETIC["gemma3"], tmp_path / "gemma3.gguf")
    errors = forward_errors(path, lambda: CupyBackend(kernels=kernels), kv_cache_dtype="float16")
    assert max(errors) <= F16_CACHE_LOGIT_BOUND


@pytest.mark.slow
def test_gemma3_270m_close_to_numpy_reference(kernels: Kernels, gemma3_path: Path) -> None:
    """The real Q4_K_M file (Q8_0, Q5_0, Q4_K, Q6_K weights): float32 on the device vs float64.
    Measured on the host build: max relative error 1.4e-6, mean KL 8e-12."""
    gguf = open_gguf(gemma3_path)
    config, tensors = load_model_spec(gguf)
    reference = ModelRunner(config, tensors, gguf, NumpyRefBackend(np.float64), 48)
    ours = ModelRunner(config, tensors, gguf, CupyBackend(kernels=kernels), 48)
    ids = [2, *np.random.default_rng(0).integers(100, 200_000, 24).tolist()]
    expected = reference.forward(ids, 0, logits="all")  # [T, vocab]
    got = ours.forward(ids, 0, logits="all")
    assert max_relative_error(expected, got) <= LOGIT_BOUND
    assert kl_divergence(expected, got).mean() <= 1e-6
    for step, token in enumerate([9, 99, 999]):  # decode steps through the device KV cache
        expected = reference.forward([token], len(ids) + step)
        assert max_relative_error(expected, ours.forward([token], len(ids) + step)) <= LOGIT_BOUND
