"""Random weights in GGUF block formats for the kernel tests, with gguf-py as the reference.

Quantized types are random bytes with finite, moderate f16 scales: every quant bit pattern is
a valid block (Q8_0's -128 included), so random bytes cover more than gguf-py's quantizer
would produce. F16/BF16/F32 come from random floats. The reference values are always gguf-py's
`gguf.quants.dequantize`, independent of numoe's C code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QType
from gguf.quants import dequantize, quantize

from native import kernels

BASIC_TYPES = [QType.F32, QType.F16, QType.BF16, QType.Q8_0, QType.Q4_0, QType.Q5_0]
KQUANT_TYPES = [QType.Q4_K, QType.Q5_K, QType.Q6_K]
ALL_TYPES = BASIC_TYPES + KQUANT_TYPES
INTEGER_TYPES = {QType.Q8_0, QType.Q4_0, QType.Q5_0, *KQUANT_TYPES}
ISAS = ["scalar", "avx2", "avx512"]

# Byte offsets of the f16 scale fields inside one block, per type.
_SCALE_OFFSETS = {
    QType.Q8_0: [0], QType.Q4_0: [0], QType.Q5_0: [0],
    QType.Q4_K: [0, 2],  # d, dmin
    QType.Q5_K: [0, 2],  # d, dmin
    QType.Q6_K: [208],   # d is the last field
}


def type_param(qtype: QType) -> object:
    """A pytest param for `qtype`, skipped while the native library has no kernel for it
    (the K-quant kernels land separately)."""
    marks = []
    if not kernels.type_supported(int(qtype)):
        marks.append(pytest.mark.skip(reason=f"no native {qtype.name} kernel yet"))
    return pytest.param(qtype, id=qtype.name, marks=marks)


def isa_param(isa: str) -> object:
    marks = []
    if ISAS.index(isa) > ISAS.index(kernels.best_isa()):
        marks.append(pytest.mark.skip(reason=f"this CPU lacks {isa}"))
    return pytest.param(isa, id=isa, marks=marks)


def random_weight(qtype: QType, n_rows: int, n: int, rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(raw uint8 [n_rows * row_bytes], gguf-py dequantized float32 [n_rows, n])."""
    row_bytes = kernels.row_bytes(int(qtype), n)
    if qtype in _SCALE_OFFSETS:
        raw = rng.integers(0, 256, (n_rows, row_bytes), dtype=np.uint8)
        blocks = raw.reshape(n_rows, -1, kernels.block_bytes(int(qtype)))
        for offset in _SCALE_OFFSETS[qtype]:
            scales = rng.uniform(0.002, 0.02, blocks.shape[:2]).astype(np.float16)
            blocks[..., offset:offset + 2] = scales.view(np.uint8).reshape(*blocks.shape[:2], 2)
    else:
        values = rng.standard_normal((n_rows, n)).astype(np.float32)
        raw = np.ascontiguousarray(quantize(values, qtype)).view(np.uint8)
    raw = raw.reshape(-1)
    reference = dequantize(raw.reshape(n_rows, row_bytes), qtype).reshape(n_rows, n)
    return raw, reference.astype(np.float32)


@contextlib.contextmanager
def kernel_settings(isa: str | None = None, threads: int | None = None) -> Iterator[None]:
    """Runs the block with the given ISA / thread count and restores the previous ones."""
    saved_isa, saved_threads = kernels.get_isa(), kernels.get_threads()
    try:
        if isa is not None:
            assert kernels.set_isa(isa) == isa  # type: ignore[arg-type]
        if threads is not None:
            kernels.set_threads(threads)
        yield
    finally:
        kernels.set_isa(saved_isa)
        kernels.set_threads(saved_threads)


def act_half_step(x: np.ndarray) -> np.ndarray:
    """Largest rounding error of the 8-bit activation blocks, per element: d/2 = amax/254,
    with amax over each block of 32. x [..., n] -> [..., n]."""
    blocks = x.reshape(*x.shape[:-1], -1, 32)
    amax = np.abs(blocks).max(axis=-1, keepdims=True)
    return np.broadcast_to(amax / 254.0, blocks.shape).reshape(x.shape)
