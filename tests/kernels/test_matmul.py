"""numoe_matmul against float64 numpy on gguf-py-dequantized weights, and SIMD against the
scalar reference, on both paths: decode / few tokens (vec_dot per row and token) and prompt
(from 4-12 tokens by type: dequantized weight tiles times float32 activations in a GEMM
micro-kernel; every type takes it from 12 tokens on).

Error bounds, per output y[t, o] with S = sum_i |W[o, i]| |x[t, i]|:
  * float types (F32, F16, BF16), and every type on the prompt path: weights convert exactly
    and x stays float32, only float32 summation differs: |y - ref| <= 1e-5 * S.
  * integer types, few tokens: x is rounded to 8-bit blocks, each element by at most
    h_i = amax/254 of its block of 32, so |y - ref| <= sum_i |W[o, i]| h_i + 1e-5 * S.
  * SIMD vs scalar: activation blocks are bit-identical on every ISA (same rounding), and
    integer block dots are exact, so only float32 summation order differs: <= 1e-5 * S.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QType

from native import kernels
from tests.kernels.blocks import (
    ALL_TYPES,
    INTEGER_TYPES,
    act_half_step,
    isa_param,
    kernel_settings,
    random_weight,
    type_param,
)

N_OUT, N_IN = 40, 512  # 40 rows: not a multiple of the 16-row tile
PROMPT_TOKENS = 12  # from here on every type takes the prompt (GEMM) path


def _reference_bound(qtype: QType, weight: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Allowed |y - ref| for weight [n_out, n_in] (dequantized), x [T, n_in] -> [T, n_out]."""
    abs_weight = np.abs(weight.astype(np.float64))
    bound = 1e-5 * (np.abs(x.astype(np.float64)) @ abs_weight.T)
    if qtype in INTEGER_TYPES and x.shape[0] < PROMPT_TOKENS:
        bound += act_half_step(x.astype(np.float64)) @ abs_weight.T
    return bound


# 1: decode; 7: few tokens (integer types keep vec_dot); 37: prompt path, a part-filled token
# panel on every ISA; 70: over one 64-token AVX-512 panel.
@pytest.mark.parametrize("n_tokens", [1, 7, 37, 70])
@pytest.mark.parametrize("qtype", [type_param(t) for t in ALL_TYPES])
def test_matmul_matches_float64_reference(qtype: QType, n_tokens: int) -> None:
    rng = np.random.default_rng(10 + int(qtype))
    raw, weight = random_weight(qtype, N_OUT, N_IN, rng)  # [N_OUT * row_bytes], [N_OUT, N_IN]
    x = rng.standard_normal((n_tokens, N_IN)).astype(np.float32)  # [T, N_IN]
    y = kernels.matmul(int(qtype), raw, N_OUT, N_IN, x)  # [T, N_OUT]
    reference = x.astype(np.float64) @ weight.astype(np.float64).T
    assert y.shape == (n_tokens, N_OUT) and y.dtype == np.float32
    excess = np.abs(y - reference) - _reference_bound(qtype, weight, x)
    assert excess.max() <= 0, f"bound exceeded by {excess.max()}"


def test_matmul_accepts_one_token_as_a_vector() -> None:
    rng = np.random.default_rng(3)
    raw, _ = random_weight(QType.Q8_0, N_OUT, N_IN, rng)
    x = rng.standard_normal(N_IN).astype(np.float32)  # [N_IN]
    y = kernels.matmul(int(QType.Q8_0), raw, N_OUT, N_IN, x)
    assert y.shape == (N_OUT,)
    np.testing.assert_array_equal(y, kernels.matmul(int(QType.Q8_0), raw, N_OUT, N_IN, x[None])[0])


@pytest.mark.parametrize("n_tokens", [1, 7, 37])
@pytest.mark.parametrize("qtype", [type_param(t) for t in ALL_TYPES])
@pytest.mark.parametrize("isa", [isa_param("avx2"), isa_param("avx512")])
def test_simd_matches_scalar_reference(isa: str, qtype: QType, n_tokens: int) -> None:
    rng = np.random.default_rng(20 + int(qtype))
    n_in = N_IN + 256 + 96 if qtype in (QType.F32, QType.F16, QType.BF16) else N_IN + 256
    raw, weight = random_weight(qtype, N_OUT, n_in, rng)  # float types: n_in with SIMD tails
    x = rng.standard_normal((n_tokens, n_in)).astype(np.float32)  # [T, n_in]
    with kernel_settings(isa="scalar"):
        y_scalar = kernels.matmul(int(qtype), raw, N_OUT, n_in, x)
    with kernel_settings(isa=isa):
        y_simd = kernels.matmul(int(qtype), raw, N_OUT, n_in, x)
    bound = 1e-5 * (np.abs(x.astype(np.float64)) @ np.abs(weight.astype(np.float64)).T)
    excess = np.abs(y_simd.astype(np.float64) - y_scalar) - bound
    assert excess.max() <= 0, f"bound exceeded by {excess.max()}"


@pytest.mark.parametrize("qtype", [type_param(t) for t in [QType.Q8_0, QType.BF16, QType.Q4_K]])
def test_thread_count_does_not_change_results(qtype: QType) -> None:
    rng = np.random.default_rng(4)
    n_out = 512  # large enough to cross the parallel threshold
    raw, _ = random_weight(qtype, n_out, N_IN, rng)
    x = rng.standard_normal((37, N_IN)).astype(np.float32)  # [37, N_IN]
    results = {}
    for threads in (1, 2):
        with kernel_settings(threads=threads):
            results[threads] = [kernels.matmul(int(qtype), raw, n_out, N_IN, tokens)
                                for tokens in (x[0], x[:7], x)]  # decode, few, prompt
    for one, two in zip(results[1], results[2], strict=True):
        np.testing.assert_array_equal(one, two)


@pytest.mark.parametrize("isa", [isa_param(isa) for isa in ["scalar", "avx2", "avx512"]])
@pytest.mark.parametrize("qtype", [type_param(t) for t in [QType.F32, QType.Q8_0, QType.Q5_0,
                                                           QType.Q4_K, QType.Q6_K]])
def test_prompt_path_odd_shapes_match_float64(qtype: QType, isa: str) -> None:
    """Long rows (several 128-element k blocks and a partial one where the block size allows),
    37 rows (not a multiple of the 4-row micro-tile or the 16-row tile), and 65 tokens (a
    full AVX-512 panel plus one token; AVX2 panels of 24 plus 17): every edge of the tiling,
    within the float32-activation bound on every ISA."""
    rng = np.random.default_rng(5)
    n_in = 4352 if qtype in (QType.Q4_K, QType.Q6_K) else 4128
    n_out, n_tokens = 37, 65
    raw, weight = random_weight(qtype, n_out, n_in, rng)  # [n_out * row_bytes], [n_out, n_in]
    x = rng.standard_normal((n_tokens, n_in)).astype(np.float32)  # [T, n_in]
    with kernel_settings(isa=isa):
        y = kernels.matmul(int(qtype), raw, n_out, n_in, x)  # [T, n_out]
    reference = x.astype(np.float64) @ weight.astype(np.float64).T
    excess = np.abs(y - reference) - _reference_bound(qtype, weight, x)
    assert excess.max() <= 0, f"bound exceeded by {excess.max()}"
