"""numoe_matmul against float64 numpy on gguf-py-dequantized weights, and SIMD against the
scalar reference.

Error bounds, per output y[t, o] with S = sum_i |W[o, i]| |x[t, i]|:
  * float types (F32, F16, BF16): weights convert exactly, only float32 summation differs:
    |y - ref| <= 1e-5 * S.
  * integer types: x is rounded to 8-bit blocks, each element by at most h_i = amax/254 of its
    block of 32, so |y - ref| <= sum_i |W[o, i]| h_i + 1e-5 * S.
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


def _reference_bound(qtype: QType, weight: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Allowed |y - ref| for weight [n_out, n_in] (dequantized), x [T, n_in] -> [T, n_out]."""
    abs_weight = np.abs(weight.astype(np.float64))
    bound = 1e-5 * (np.abs(x.astype(np.float64)) @ abs_weight.T)
    if qtype in INTEGER_TYPES:
        bound += act_half_step(x.astype(np.float64)) @ abs_weight.T
    return bound


@pytest.mark.parametrize("n_tokens", [1, 7])
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


@pytest.mark.parametrize("n_tokens", [1, 7])
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
    x = rng.standard_normal((7, N_IN)).astype(np.float32)  # [7, N_IN]
    results = {}
    for threads in (1, 2):
        with kernel_settings(threads=threads):
            results[threads] = (kernels.matmul(int(qtype), raw, n_out, N_IN, x[0]),
                                kernels.matmul(int(qtype), raw, n_out, N_IN, x))
    np.testing.assert_array_equal(results[1][0], results[2][0])
    np.testing.assert_array_equal(results[1][1], results[2][1])


@pytest.mark.parametrize("qtype", [type_param(t) for t in [QType.F32, QType.Q8_0]])
def test_prompt_tiles_equal_token_by_token_products(qtype: QType) -> None:
    """The prompt path tiles rows x tokens (F32 at n_in 4096 gives 12-token tiles); each
    output is still one dot product, so it must equal the one-token path exactly."""
    rng = np.random.default_rng(5)
    n_out, n_in, n_tokens = 37, 4096, 30
    raw, _ = random_weight(qtype, n_out, n_in, rng)
    x = rng.standard_normal((n_tokens, n_in)).astype(np.float32)  # [T, n_in]
    y = kernels.matmul(int(qtype), raw, n_out, n_in, x)
    one_by_one = np.stack([kernels.matmul(int(qtype), raw, n_out, n_in, row) for row in x])
    np.testing.assert_array_equal(y, one_by_one)
