"""numoe_dequantize_rows against gguf-py's numpy dequantization: bit-exact, every ISA."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QType

from native import kernels
from tests.kernels.blocks import (
    ALL_TYPES,
    ISAS,
    isa_param,
    kernel_settings,
    random_weight,
    type_param,
)


@pytest.mark.parametrize("isa", [isa_param(isa) for isa in ISAS])
@pytest.mark.parametrize("qtype", [type_param(t) for t in ALL_TYPES])
def test_dequantize_equals_gguf_py(qtype: QType, isa: str) -> None:
    rng = np.random.default_rng(int(qtype))
    n_rows, n = 6, 512
    raw, reference = random_weight(qtype, n_rows, n, rng)  # [n_rows * row_bytes], [n_rows, n]
    with kernel_settings(isa=isa):
        values = kernels.dequantize(int(qtype), raw, n_rows, n)
    assert values.shape == (n_rows, n) and values.dtype == np.float32
    np.testing.assert_array_equal(values, reference)


@pytest.mark.parametrize("qtype", [type_param(t) for t in [QType.Q8_0, QType.BF16]])
def test_dequantize_reads_memmap_rows_in_place(qtype: QType, tmp_path) -> None:
    """A row slice of a read-only memmap (how GGUF tensors arrive) is read without a copy."""
    rng = np.random.default_rng(1)
    n_rows, n = 8, 256
    raw, reference = random_weight(qtype, n_rows, n, rng)
    path = tmp_path / "weights.bin"
    raw.tofile(path)
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    row_bytes = kernels.row_bytes(int(qtype), n)
    rows = mapped[3 * row_bytes:5 * row_bytes]
    np.testing.assert_array_equal(kernels.dequantize(int(qtype), rows, 2, n), reference[3:5])


def test_dequantize_large_input_uses_threads_identically() -> None:
    """Above the parallel threshold the rows are split across threads; values must not change."""
    rng = np.random.default_rng(2)
    raw, reference = random_weight(QType.Q8_0, 512, 512, rng)
    for threads in (1, 2):
        with kernel_settings(threads=threads):
            np.testing.assert_array_equal(kernels.dequantize(int(QType.Q8_0), raw, 512, 512),
                                          reference)
