"""K-quant kernels (Q4_K, Q5_K, Q6_K): dequantization and products on every ISA.

test_dequantize.py and test_matmul.py already run the generic checks on random-byte blocks;
this file adds what is specific to the K-quants:
  * realistic blocks from llama.cpp's own quantizer (quantize_row_q*_K_ref in libggml-base),
    whose dequantization must equal both gguf-py and llama.cpp's dequantize_row_q*_K bit for bit;
  * extreme blocks (every code, scale and min at its maximum, Q6_K scales at -128) against
    activations that 8-bit quantization represents exactly, so the integer paths (no
    saturation, mins and Q6_K's -32 folded through the activation block sums) are checked
    to float32 rounding alone;
  * rows of the real Gemma 3 270M Q4_K_M model.

Error bounds, per output with S = sum_i |W_i| |x_i| and B = n / 32 activation blocks:
  * SIMD vs scalar: block dot products are exact integers; each block term d*sc*d_act*isum
    takes at most 5 float32 roundings and the float sums at most B + 8 more, so each result
    is within (B + 13) * 2^-24 * S of the exact value, and two results within twice that.
  * vs float64 on gguf-py's dequantized weights: the same float32 term, plus the activation
    rounding sum_i |W_i| * amax_block(i) / 254 (round to nearest of x / d, d = amax / 127);
    exactly representable activations (integers with amax 127 per block) remove that term.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QType
from gguf.quants import dequantize

from cluster.gguf import open_gguf
from native import kernels
from tests.kernels.blocks import ISAS, act_half_step, isa_param, kernel_settings
from tests.reference import llamacpp as llamacpp_reference

KQUANTS = [QType.Q4_K, QType.Q5_K, QType.Q6_K]
ALL_ISAS = [isa_param(isa) for isa in ISAS]
SIMD_ISAS = [isa_param("avx2"), isa_param("avx512")]


def _float_bound(x: np.ndarray, weight: np.ndarray, factor: float = 1.0) -> np.ndarray:
    """factor * (B + 13) * 2^-24 * S for x [T, n], weight [n_out, n] -> [T, n_out]."""
    n_blocks = x.shape[-1] // 32
    s = np.abs(x.astype(np.float64)) @ np.abs(weight.astype(np.float64)).T
    return factor * (n_blocks + 13) * 2.0**-24 * s


def _reference_bound(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Float32 rounding plus 8-bit activation rounding, [T, n_out]."""
    activation_error = act_half_step(x.astype(np.float64)) @ np.abs(weight.astype(np.float64)).T
    return _float_bound(x, weight) + activation_error


def _assert_within(y: np.ndarray, reference: np.ndarray, bound: np.ndarray) -> None:
    excess = np.abs(y.astype(np.float64) - reference) - bound
    worst = np.unravel_index(int(np.argmax(excess)), excess.shape)
    assert excess.max() <= 0, (
        f"error {abs(float(y[worst]) - reference[worst]):.3g} exceeds bound {bound[worst]:.3g} "
        f"at {worst}")


# --- llama.cpp's K-quant reference code, called through ctypes ---------------------------


class GgmlKQuants:
    """quantize_row_q*_K_ref / dequantize_row_q*_K from llama.cpp's libggml-base."""

    _SUFFIX = {QType.Q4_K: "q4_K", QType.Q5_K: "q5_K", QType.Q6_K: "q6_K"}

    def __init__(self, library: Path) -> None:
        self._lib = ctypes.CDLL(str(library))
        for suffix in self._SUFFIX.values():
            for name in (f"quantize_row_{suffix}_ref", f"dequantize_row_{suffix}"):
                fn = getattr(self._lib, name)
                fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
                fn.restype = None

    def quantize(self, qtype: QType, values: np.ndarray) -> np.ndarray:
        """float32 [n_rows, n] -> raw blocks uint8 [n_rows * row_bytes]."""
        values = np.ascontiguousarray(values, dtype=np.float32)
        out = np.zeros(values.shape[0] * kernels.row_bytes(int(qtype), values.shape[1]), np.uint8)
        fn = getattr(self._lib, f"quantize_row_{self._SUFFIX[qtype]}_ref")
        fn(values.ctypes.data, out.ctypes.data, values.size)
        return out

    def dequantize(self, qtype: QType, raw: np.ndarray, n_rows: int, n: int) -> np.ndarray:
        """raw blocks -> float32 [n_rows, n]."""
        raw = np.ascontiguousarray(raw)
        out = np.empty((n_rows, n), np.float32)
        fn = getattr(self._lib, f"dequantize_row_{self._SUFFIX[qtype]}")
        fn(raw.ctypes.data, out.ctypes.data, n_rows * n)
        return out


@pytest.fixture(scope="session")
def ggml() -> GgmlKQuants:
    library = llamacpp_reference.ensure_built() / "build" / "bin" / "libggml-base.so"
    return GgmlKQuants(library)


def _gguf_py(qtype: QType, raw: np.ndarray, n_rows: int, n: int) -> np.ndarray:
    row_bytes = kernels.row_bytes(int(qtype), n)
    return dequantize(raw.reshape(n_rows, row_bytes), qtype).reshape(n_rows, n).astype(np.float32)


def _realistic_weight(ggml: GgmlKQuants, qtype: QType, n_rows: int, n: int, seed: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(raw [n_rows * row_bytes] from llama.cpp's quantizer, gguf-py values [n_rows, n]).
    Rows mix scales and offsets so that the mins and the 6-bit scales take many values."""
    rng = np.random.default_rng(seed)
    row_scale = rng.uniform(0.01, 3.0, (n_rows, 1))
    row_shift = rng.uniform(-1.0, 1.0, (n_rows, 1))
    values = (rng.standard_normal((n_rows, n)) * row_scale + row_shift).astype(np.float32)
    values[:, : n // 8] *= 4.0  # outliers in some sub-blocks
    raw = ggml.quantize(qtype, values)
    return raw, _gguf_py(qtype, raw, n_rows, n)


# --- extreme blocks ------------------------------------------------------------------------


def _extreme_weight(qtype: QType, n_rows: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Raw blocks whose bytes are mostly 0xFF (largest codes, scales and mins; Q6_K scale -1)
    or 0x00, with Q6_K scales at -128 and 127 in places, and sane f16 super-scales."""
    block_bytes = kernels.block_bytes(int(qtype))
    n_blocks = n_rows * n // 256
    raw = np.where(rng.random((n_blocks, block_bytes)) < 0.8, 0xFF, 0x00).astype(np.uint8)
    raw[0] = 0xFF  # one block entirely at the maximum
    if qtype == QType.Q6_K:
        scales = raw[:, 192:208].view(np.int8)
        scales[:, 0::3] = -128
        scales[:, 1::3] = 127
        raw[:, 208:210] = np.float16(0.004).reshape(1).view(np.uint8)
    else:
        raw[:, 0:2] = np.float16(0.003).reshape(1).view(np.uint8)   # d
        raw[:, 2:4] = np.float16(0.002).reshape(1).view(np.uint8)   # dmin
    return raw.reshape(-1)


def _exact_activations(n_tokens: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Integers in [-127, 127] with +-127 in every block of 32: 8-bit blocks hold them exactly
    (d = 1), with long runs of +-127 to push every integer partial sum to its extreme."""
    x = rng.integers(-127, 128, (n_tokens, n)).astype(np.float32)
    x[:, ::32] = 127.0
    x[:, 1::32] = -127.0
    x[0, : n // 2] = 127.0
    if n_tokens > 1:
        x[1, : n // 2] = -127.0
    return x


# --- dequantization ------------------------------------------------------------------------


@pytest.mark.parametrize("isa", ALL_ISAS)
@pytest.mark.parametrize("qtype", KQUANTS, ids=lambda t: t.name)
def test_dequantize_realistic_blocks_equal_gguf_py_and_llamacpp(
        ggml: GgmlKQuants, qtype: QType, isa: str) -> None:
    n_rows, n = 12, 1024
    raw, reference = _realistic_weight(ggml, qtype, n_rows, n, seed=int(qtype))
    np.testing.assert_array_equal(ggml.dequantize(qtype, raw, n_rows, n), reference)
    with kernel_settings(isa=isa):
        values = kernels.dequantize(int(qtype), raw, n_rows, n)  # [n_rows, n]
    np.testing.assert_array_equal(values, reference)


@pytest.mark.parametrize("isa", ALL_ISAS)
@pytest.mark.parametrize("qtype", KQUANTS, ids=lambda t: t.name)
def test_dequantize_extreme_blocks_equal_gguf_py(qtype: QType, isa: str) -> None:
    n_rows, n = 4, 512
    raw = _extreme_weight(qtype, n_rows, n, np.random.default_rng(1))
    with kernel_settings(isa=isa):
        values = kernels.dequantize(int(qtype), raw, n_rows, n)
    np.testing.assert_array_equal(values, _gguf_py(qtype, raw, n_rows, n))


# --- products ------------------------------------------------------------------------------


@pytest.mark.parametrize("isa", ALL_ISAS)
@pytest.mark.parametrize("qtype", KQUANTS, ids=lambda t: t.name)
def test_extreme_blocks_with_exact_activations(qtype: QType, isa: str) -> None:
    """Only float32 rounding may separate the result from float64: no activation error."""
    rng = np.random.default_rng(2 + int(qtype))
    n_out, n_in = 24, 1280
    raw = _extreme_weight(qtype, n_out, n_in, rng)
    weight = _gguf_py(qtype, raw, n_out, n_in)  # [n_out, n_in]
    x = _exact_activations(3, n_in, rng)  # [3, n_in]
    reference = x.astype(np.float64) @ weight.astype(np.float64).T  # [3, n_out]
    with kernel_settings(isa=isa):
        one_token = kernels.matmul(int(qtype), raw, n_out, n_in, x[0])  # [n_out]
        tokens = kernels.matmul(int(qtype), raw, n_out, n_in, x)  # [3, n_out]
    _assert_within(one_token[None], reference[:1], _float_bound(x[:1], weight))
    _assert_within(tokens, reference, _float_bound(x, weight))


@pytest.mark.parametrize("isa", ALL_ISAS)
@pytest.mark.parametrize("n_in", [256, 2816])  # one super-block; 11 (odd, 88 activation blocks)
@pytest.mark.parametrize("qtype", KQUANTS, ids=lambda t: t.name)
def test_matmul_realistic_weights_match_float64(
        ggml: GgmlKQuants, qtype: QType, n_in: int, isa: str) -> None:
    n_out = 33
    raw, weight = _realistic_weight(ggml, qtype, n_out, n_in, seed=100 + int(qtype))
    rng = np.random.default_rng(n_in)
    x = rng.standard_normal((4, n_in)).astype(np.float32)  # [4, n_in]
    x[1] *= 1e-3  # small activations: the scales must not underflow
    x[2, : n_in // 2] = 0.0  # all-zero activation blocks (d = 0)
    reference = x.astype(np.float64) @ weight.astype(np.float64).T  # [4, n_out]
    with kernel_settings(isa=isa):
        for t in range(x.shape[0]):  # the decode path, one token at a time
            y = kernels.matmul(int(qtype), raw, n_out, n_in, x[t])  # [n_out]
            _assert_within(y[None], reference[t:t + 1], _reference_bound(x[t:t + 1], weight))
        y = kernels.matmul(int(qtype), raw, n_out, n_in, x)  # [4, n_out], the prompt path
    _assert_within(y, reference, _reference_bound(x, weight))


@pytest.mark.parametrize("isa", SIMD_ISAS)
@pytest.mark.parametrize("qtype", KQUANTS, ids=lambda t: t.name)
def test_simd_matches_scalar_on_realistic_and_extreme_blocks(
        ggml: GgmlKQuants, qtype: QType, isa: str) -> None:
    n_out, n_in = 40, 2816
    rng = np.random.default_rng(7)
    realistic_raw, realistic = _realistic_weight(ggml, qtype, n_out, n_in, seed=200 + int(qtype))
    extreme_raw = _extreme_weight(qtype, n_out, n_in, rng)
    cases = [(realistic_raw, realistic, rng.standard_normal((2, n_in)).astype(np.float32)),
             (extreme_raw, _gguf_py(qtype, extreme_raw, n_out, n_in),
              _exact_activations(2, n_in, rng))]
    for raw, weight, x in cases:
        with kernel_settings(isa="scalar"):
            y_scalar = np.stack([kernels.matmul(int(qtype), raw, n_out, n_in, row) for row in x])
        with kernel_settings(isa=isa):
            y_simd = np.stack([kernels.matmul(int(qtype), raw, n_out, n_in, row) for row in x])
        _assert_within(y_simd, y_scalar.astype(np.float64), _float_bound(x, weight, factor=2.0))


# --- the real model ---------------------------------------------------------------------------


@pytest.mark.parametrize("isa", ALL_ISAS)
@pytest.mark.parametrize("tensor_name", ["blk.0.attn_output.weight", "blk.0.ffn_down.weight",
                                         "blk.2.ffn_down.weight"])
def test_gemma3_rows(gemma3_path: Path, tensor_name: str, isa: str) -> None:
    """Q4_K and Q6_K rows of Gemma 3 270M Q4_K_M: dequantization bit-exact with gguf-py,
    decode products within the reference bound."""
    n_rows = 48
    with open_gguf(gemma3_path) as gguf_file:
        info = gguf_file.tensors[tensor_name]
        qtype = QType(info.ggml_type)
        assert qtype in KQUANTS, f"{tensor_name} is {qtype.name}; the test expects a K-quant"
        n_in = info.shape[-1]
        row_bytes = kernels.row_bytes(int(qtype), n_in)
        raw = np.array(gguf_file.tensor_data(tensor_name)[: n_rows * row_bytes])  # copy, then close
    weight = _gguf_py(qtype, raw, n_rows, n_in)  # [n_rows, n_in]
    x = np.random.default_rng(9).standard_normal(n_in).astype(np.float32)  # [n_in]
    with kernel_settings(isa=isa):
        np.testing.assert_array_equal(kernels.dequantize(int(qtype), raw, n_rows, n_in), weight)
        y = kernels.matmul(int(qtype), raw, n_rows, n_in, x)  # [n_rows]
    reference = weight.astype(np.float64) @ x.astype(np.float64)
    _assert_within(y[None], reference[None], _reference_bound(x[None], weight))
