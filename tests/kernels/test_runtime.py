"""Runtime configuration, sizes, argument checking and the read probe."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QType
from native._numoe_native import ffi, lib

from cluster.errors import UnsupportedQuantTypeError
from native import kernels
from tests.kernels.blocks import ALL_TYPES, ISAS, isa_param, kernel_settings, random_weight


def test_isa_selection_clamps_to_best() -> None:
    best = kernels.best_isa()
    assert best in ISAS
    with kernel_settings():
        for isa in ISAS:
            expected = isa if ISAS.index(isa) <= ISAS.index(best) else best
            assert kernels.set_isa(isa) == expected  # type: ignore[arg-type]
            assert kernels.get_isa() == expected
        with pytest.raises(ValueError, match="unknown ISA"):
            kernels.set_isa("sse9")  # type: ignore[arg-type]


def test_threads_round_trip() -> None:
    with kernel_settings():
        kernels.set_threads(1)
        assert kernels.get_threads() == 1
        kernels.set_threads(2)
        assert kernels.get_threads() == 2
        with pytest.raises(ValueError):
            kernels.set_threads(0)


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_block_sizes_match_gguf_py(qtype: QType) -> None:
    size, nbytes = GGML_QUANT_SIZES[qtype]
    assert (kernels.block_size(int(qtype)), kernels.block_bytes(int(qtype))) == (size, nbytes)
    assert kernels.row_bytes(int(qtype), 4 * size) == 4 * nbytes


def test_unsupported_type_and_bad_row_length_raise() -> None:
    with pytest.raises(UnsupportedQuantTypeError, match="Q4_0"):
        kernels.block_size(int(QType.Q4_1))
    with pytest.raises(ValueError, match="multiple of 32"):
        kernels.row_bytes(int(QType.Q8_0), 48)
    assert not kernels.type_supported(int(QType.IQ4_XS))


def test_matmul_and_dequantize_reject_bad_buffers_and_shapes() -> None:
    rng = np.random.default_rng(0)
    raw, _ = random_weight(QType.Q8_0, 4, 64, rng)
    x = np.zeros((2, 64), np.float32)
    q8 = int(QType.Q8_0)
    with pytest.raises(ValueError, match="holds 204 bytes, the shape needs 272"):
        kernels.matmul(q8, raw[:-68], 4, 64, x)
    with pytest.raises(ValueError, match="x must be"):
        kernels.matmul(q8, raw, 4, 64, np.zeros((2, 32), np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        kernels.matmul(q8, raw.reshape(4, -1)[:, :34], 4, 32, np.zeros(32, np.float32))
    with pytest.raises(ValueError, match="n_out"):
        kernels.matmul(q8, raw, 0, 64, x)
    with pytest.raises(ValueError, match="needs"):
        kernels.dequantize(q8, raw, 5, 64)
    # Non-float32 or strided x is converted, not rejected.
    np.testing.assert_array_equal(kernels.matmul(q8, raw, 4, 64, x.astype(np.float64)[:, ::1]),
                                  kernels.matmul(q8, raw, 4, 64, x))


def test_c_entry_points_return_codes_instead_of_crashing() -> None:
    weight = np.zeros(34 * 4, np.uint8)
    x = np.zeros(64, np.float32)
    y = np.zeros(64, np.float32)
    w = ffi.from_buffer(weight)
    xp, yp = ffi.from_buffer("float[]", x), ffi.from_buffer("float[]", y)
    assert lib.numoe_matmul(8, ffi.NULL, 2, 64, xp, 1, yp) == lib.NUMOE_EBADARG
    assert lib.numoe_matmul(8, w, 2, 48, xp, 1, yp) == lib.NUMOE_EBADSHAPE
    assert lib.numoe_matmul(8, w, -1, 64, xp, 1, yp) == lib.NUMOE_EBADSHAPE
    assert lib.numoe_matmul(8, w, 2, 64, xp, -3, yp) == lib.NUMOE_EBADSHAPE
    assert lib.numoe_matmul(8, w, 2**62, 64, xp, 1, yp) == lib.NUMOE_EBADSHAPE
    assert lib.numoe_matmul(3, w, 2, 64, xp, 1, yp) == lib.NUMOE_EBADTYPE
    assert lib.numoe_matmul(99, w, 2, 64, xp, 1, yp) == lib.NUMOE_EBADTYPE
    assert lib.numoe_matmul(-5, w, 2, 64, xp, 1, yp) == lib.NUMOE_EBADTYPE
    assert lib.numoe_dequantize_rows(8, w, yp, -1, 32) == lib.NUMOE_EBADSHAPE
    assert lib.numoe_dequantize_rows(8, ffi.NULL, yp, 1, 32) == lib.NUMOE_EBADARG
    assert lib.numoe_row_bytes(8, 0) < 0 and lib.numoe_block_size(99) <= 0
    ids = np.zeros(2, np.int32)
    wts = np.ones(2, np.float32)
    idp, wp = ffi.from_buffer("int32_t[]", ids), ffi.from_buffer("float[]", wts)

    def moe(n_embd: int, n_used: int, activation: int) -> int:  # one Q8_0 expert, 32 x 32
        return lib.numoe_moe(xp, 1, n_embd, idp, wp, n_used, 1, 32, 8, w, 8, w, 8, w,
                             activation, yp)

    assert moe(32, 2, 0) == lib.NUMOE_OK
    ids[1] = 1  # expert 1 of 1
    assert moe(32, 2, 0) == lib.NUMOE_EBADARG
    ids[1] = 0
    assert moe(32, 2, 7) == lib.NUMOE_EBADARG  # activation
    assert moe(48, 2, 0) == lib.NUMOE_EBADSHAPE
    assert moe(32, 0, 0) == lib.NUMOE_EBADSHAPE
    assert lib.numoe_read_probe(ffi.NULL, 10, 1) == 0.0


@pytest.mark.parametrize("isa", [isa_param(isa) for isa in ISAS])
def test_read_probe_reads_every_byte_once(isa: str) -> None:
    """The probe folds the buffer into 64-bit word sums (bytes in the tails). With data only in
    the low byte of each 8-byte word, both equal the plain byte sum, so numpy predicts the
    result exactly; odd sizes exercise the per-thread shares and the tails."""
    rng = np.random.default_rng(0)
    for nbytes in (8, 4096 * 3 + 200, (1 << 20) + 13):
        buf = np.zeros(nbytes, np.uint8)
        buf[::8] = rng.integers(0, 256, len(buf[::8]), dtype=np.uint8)
        for threads in (1, 2):
            with kernel_settings(isa=isa, threads=threads):
                total = lib.numoe_read_probe(ffi.from_buffer(buf), nbytes, 3)
            assert total == 3 * float(buf.sum(dtype=np.uint64))
    assert kernels.read_probe(np.zeros(1 << 20, np.uint8), repeats=2) > 0
