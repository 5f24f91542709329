"""Python face of the native kernels: numpy arrays in, numpy arrays out.

Weights are passed to C through `ffi.from_buffer`, never copied: a slice of a GGUF memmap goes
straight in. Sizes are checked here, before the call, so a wrong buffer is a ValueError naming
the problem instead of a read past the end. Negative status codes from C become exceptions.

These functions run about ten times per layer per token, so the argument checks are plain
attribute reads and arithmetic, and arrays that are already C-contiguous float32 are not copied.
A model's weights are wrapped once at load in a `WeightView` (size checked, C pointer made);
`matmul_view`, `dense_ffn` and `moe_views` take those, while `matmul` and `moe` take raw bytes
and build the views per call.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import numpy as np

from cluster.errors import UnsupportedQuantTypeError
from native._numoe_native import ffi, lib

IsaName = Literal["scalar", "avx2", "avx512"]
ActivationName = Literal["silu", "gelu_tanh"]

_ISA_BY_NAME: dict[str, int] = {
    "scalar": lib.NUMOE_ISA_SCALAR,
    "avx2": lib.NUMOE_ISA_AVX2,
    "avx512": lib.NUMOE_ISA_AVX512,
}
_ISA_NAME = {value: name for name, value in _ISA_BY_NAME.items()}
_ACTIVATION_BY_NAME: dict[str, int] = {
    "silu": lib.NUMOE_ACT_SILU,
    "gelu_tanh": lib.NUMOE_ACT_GELU_TANH,
}
# ggml type ids the C side knows block sizes for (numoe.h's numoe_type).
TYPE_NAMES: dict[int, str] = {
    lib.NUMOE_TYPE_F32: "F32",
    lib.NUMOE_TYPE_F16: "F16",
    lib.NUMOE_TYPE_BF16: "BF16",
    lib.NUMOE_TYPE_Q8_0: "Q8_0",
    lib.NUMOE_TYPE_Q4_0: "Q4_0",
    lib.NUMOE_TYPE_Q5_0: "Q5_0",
    lib.NUMOE_TYPE_Q4_K: "Q4_K",
    lib.NUMOE_TYPE_Q5_K: "Q5_K",
    lib.NUMOE_TYPE_Q6_K: "Q6_K",
}
# (elements per block, bytes per block), read once from C.
_BLOCK: dict[int, tuple[int, int]] = {
    t: (int(lib.numoe_block_size(t)), int(lib.numoe_block_bytes(t))) for t in TYPE_NAMES
}
_F32 = np.dtype(np.float32)
_I32 = np.dtype(np.int32)


# --- runtime configuration ----------------------------------------------------------------


def best_isa() -> IsaName:
    """The widest instruction set this CPU supports."""
    return _ISA_NAME[lib.numoe_best_isa()]  # type: ignore[return-value]


def set_isa(name: IsaName) -> IsaName:
    """Selects the kernels' instruction set (clamped to best_isa()); returns the one in use."""
    if name not in _ISA_BY_NAME:
        raise ValueError(f"unknown ISA {name!r}; choose one of {sorted(_ISA_BY_NAME)}")
    return _ISA_NAME[lib.numoe_set_isa(_ISA_BY_NAME[name])]  # type: ignore[return-value]


def get_isa() -> IsaName:
    return _ISA_NAME[lib.numoe_get_isa()]  # type: ignore[return-value]


def set_threads(n_threads: int) -> None:
    """OpenMP threads for every kernel call from now on (at least 1)."""
    if n_threads < 1:
        raise ValueError(f"n_threads must be >= 1, got {n_threads}")
    lib.numoe_set_threads(int(n_threads))


def get_threads() -> int:
    return int(lib.numoe_get_threads())


# --- sizes ------------------------------------------------------------------------------


def _block(ggml_type: int) -> tuple[int, int]:
    block = _BLOCK.get(ggml_type)
    if block is None:
        raise UnsupportedQuantTypeError(
            f"ggml type id {int(ggml_type)} has no native kernel; supported types: "
            f"{', '.join(TYPE_NAMES.values())}. Requantize the model to one of them."
        )
    return block


def block_size(ggml_type: int) -> int:
    """Elements per block of `ggml_type`."""
    return _block(ggml_type)[0]


def block_bytes(ggml_type: int) -> int:
    """Bytes per block of `ggml_type`."""
    return _block(ggml_type)[1]


def row_bytes(ggml_type: int, n: int) -> int:
    """Bytes of one row of n elements; n must be a positive multiple of the block size."""
    size, nbytes = _block(ggml_type)
    if n <= 0 or n % size:
        raise ValueError(
            f"a {TYPE_NAMES[ggml_type]} row must hold a positive multiple of {size} elements, "
            f"got {n}"
        )
    return n // size * nbytes


def type_supported(ggml_type: int) -> bool:
    """True if dequantize, matmul and moe have kernels for `ggml_type`."""
    return ggml_type in _BLOCK and bool(lib.numoe_type_supported(int(ggml_type)))


# --- argument plumbing ------------------------------------------------------------------


def _weight_buffer(data: Any, needed: int, what: str) -> Any:
    """A cffi view of `data` (no copy) after checking it is contiguous and large enough."""
    if isinstance(data, np.ndarray):
        if not data.flags.c_contiguous:
            raise ValueError(f"{what} buffer must be C-contiguous (pass the raw GGUF bytes)")
        nbytes = data.nbytes
    else:
        nbytes = memoryview(data).nbytes
    if nbytes < needed:
        raise ValueError(f"{what} buffer holds {nbytes} bytes, the shape needs {needed}")
    return ffi.from_buffer(data)


def _as_f32(x: np.ndarray) -> np.ndarray:
    if x.dtype == _F32 and x.flags.c_contiguous:
        return x
    return np.ascontiguousarray(x, dtype=np.float32)


def _check_status(status: int, call: str) -> None:
    if status >= 0:
        return
    if status == lib.NUMOE_EBADTYPE:
        raise UnsupportedQuantTypeError(
            f"{call}: the native library has no kernel for this type; supported types: "
            f"{', '.join(t for i, t in TYPE_NAMES.items() if type_supported(i))}"
        )
    if status == lib.NUMOE_EBADSHAPE:
        raise ValueError(f"{call}: bad shape (sizes must be positive multiples of the block "
                         "size) or the scratch memory could not be allocated")
    raise ValueError(f"{call}: bad argument (status {status}), e.g. an expert id out of range")


# --- operations -------------------------------------------------------------------------


def dequantize(ggml_type: int, data: Any, n_rows: int, n: int) -> np.ndarray:
    """n_rows rows of n elements from raw GGUF bytes -> float32 [n_rows, n]."""
    if n_rows < 0:
        raise ValueError(f"dequantize: n_rows must be >= 0, got {n_rows}")
    src = _weight_buffer(data, n_rows * row_bytes(ggml_type, n), "dequantize")
    out = np.empty((n_rows, n), np.float32)  # [n_rows, n]
    status = lib.numoe_dequantize_rows(ggml_type, src, ffi.from_buffer("float[]", out), n_rows, n)
    _check_status(status, "dequantize")
    return out


class WeightView:
    """A weight matrix [n_out, n_in] or expert stack [n_experts, n_out, n_in] in its GGUF bytes,
    size-checked once and with its C pointer made once (no copy). The products below take it,
    so a decode step pays for neither check again."""

    __slots__ = ("ggml_type", "shape", "data", "pointer")

    def __init__(self, ggml_type: int, shape: tuple[int, ...], data: Any,
                 what: str = "weight") -> None:
        n_rows = int(np.prod(shape[:-1], dtype=np.int64))
        # row_bytes raises for types without a kernel and rows that are not whole blocks.
        self.pointer = _weight_buffer(data, n_rows * row_bytes(ggml_type, shape[-1]), what)
        self.ggml_type = ggml_type
        self.shape = shape
        self.data = data  # uint8 [n_bytes]; keeps the mapping alive behind `pointer`


def matmul(ggml_type: int, weight: Any, n_out: int, n_in: int, x: np.ndarray) -> np.ndarray:
    """y = x @ W^T for W [n_out, n_in] in GGUF layout; x [T, n_in] or [n_in] -> [T, n_out] or
    [n_out]. For few tokens, integer types quantize x to 8-bit blocks (decode path); from
    numoe_gemm_min_tokens (native/src/gemm.h: 4 to 12 by type, at most 12) on, weights are
    dequantized in tiles and x stays float32 (prompt path, more accurate)."""
    if n_out <= 0:
        raise ValueError(f"matmul: n_out must be positive, got {n_out}")
    return matmul_view(WeightView(ggml_type, (n_out, n_in), weight, "matmul weight"), x)


def matmul_view(weight: WeightView, x: np.ndarray, rows_alone: bool = False) -> np.ndarray:
    """`matmul` over a WeightView [n_out, n_in]: x [..., n_in] -> x @ W^T [..., n_out].
    rows_alone: compute every row exactly as a call with that row alone would (the decode
    path for all rows, never the prompt GEMM), so a row's result does not depend on the
    others: a batch of decode steps of several sequences."""
    n_out, n_in = weight.shape[-2], weight.shape[-1]
    x = _as_f32(x)
    if x.ndim == 0 or x.shape[-1] != n_in:
        raise ValueError(f"matmul: x must be [T, {n_in}] or [{n_in}], got {list(x.shape)}")
    y = np.empty(x.shape[:-1] + (n_out,), _F32)  # [T, n_out] or [n_out]
    n_tokens = x.size // n_in
    if n_tokens:
        fn = lib.numoe_matmul_rows if rows_alone else lib.numoe_matmul
        status = fn(weight.ggml_type, weight.pointer, n_out, n_in,
                                  ffi.from_buffer("float[]", x), n_tokens,
                                  ffi.from_buffer("float[]", y))
        _check_status(status, "matmul")
    return y


def matmul_batched(weight: WeightView, x: np.ndarray, rows_alone: bool = False) -> np.ndarray:
    """Per-head products over a stack W [n_batch, n_out, n_in] (MLA's attn_k_b / attn_v_b):
    x [T, n_batch, n_in] (or [n_batch, n_in]) -> y [T, n_batch, n_out], y[t, b] = W[b] @ x[t, b],
    in one native call. Head b's result is bit for bit matmul_view on W[b] and x[:, b] (with the
    same rows_alone), whatever the thread count, so batching heads changes nothing."""
    if len(weight.shape) != 3:
        raise ValueError(f"matmul_batched: weight must be a stack [n_batch, n_out, n_in], got "
                         f"{list(weight.shape)}")
    n_batch, n_out, n_in = weight.shape
    x = _as_f32(x)
    if x.ndim not in (2, 3) or x.shape[-2:] != (n_batch, n_in):
        raise ValueError(f"matmul_batched: x must be [T, {n_batch}, {n_in}] or "
                         f"[{n_batch}, {n_in}] for weight {list(weight.shape)}, got "
                         f"{list(x.shape)}")
    y = np.empty(x.shape[:-1] + (n_out,), _F32)  # [T, n_batch, n_out] or [n_batch, n_out]
    n_tokens = x.size // (n_batch * n_in)
    if n_tokens:
        status = lib.numoe_matmul_batched(weight.ggml_type, weight.pointer, n_batch, n_out, n_in,
                                          ffi.from_buffer("float[]", x), n_tokens,
                                          ffi.from_buffer("float[]", y), int(rows_alone))
        _check_status(status, "matmul_batched")
    return y


def vec_dot_rows(ggml_type: int, weight: Any, n_out: int, n_in: int,
                 x: np.ndarray) -> np.ndarray:
    """Each row of weight [n_out, n_in] dotted with x [n_in] by the ISA's per-pair kernel,
    never a tile: what every matmul path must reproduce bit for bit (for tests)."""
    x = _as_f32(x)
    if x.shape != (n_in,):
        raise ValueError(f"vec_dot_rows: x must be [{n_in}], got {list(x.shape)}")
    buf = _weight_buffer(weight, n_out * row_bytes(ggml_type, n_in), "vec_dot_rows weight")
    y = np.empty(n_out, _F32)
    status = lib.numoe_vec_dot_rows(ggml_type, buf, n_out, n_in, ffi.from_buffer("float[]", x),
                                    ffi.from_buffer("float[]", y))
    _check_status(status, "vec_dot_rows")
    return y


def moe(
    x: np.ndarray,
    expert_ids: np.ndarray,
    expert_weights: np.ndarray,
    *,
    gate: tuple[int, Any],
    up: tuple[int, Any],
    down: tuple[int, Any],
    n_experts: int,
    n_ff: int,
    activation: ActivationName,
) -> np.ndarray:
    """Routed-expert FFN of one layer in one native call.

    x [T, H] float32; expert_ids [T, K] int32 < n_experts, a negative id skipping its
    (token, slot) (an expert-parallel worker marks the experts it does not hold so);
    expert_weights [T, K];
    gate/up: (ggml type, bytes of [n_experts, n_ff, H]); down: (type, bytes of
    [n_experts, H, n_ff]). Returns y [T, H], y[t] = sum over k with id >= 0 of
    w[t,k] * down_e(act(gate_e x) * up_e x).
    """
    if x.ndim != 2:
        raise ValueError(f"moe: x must be [T, H], got shape {list(x.shape)}")
    if n_experts <= 0 or n_ff <= 0:
        raise ValueError(f"moe: n_experts ({n_experts}) and n_ff ({n_ff}) must be positive")
    n_embd = x.shape[1]
    (gate_type, gate_data), (up_type, up_data), (down_type, down_data) = gate, up, down
    return moe_views(
        x, expert_ids, expert_weights,
        WeightView(gate_type, (n_experts, n_ff, n_embd), gate_data, "gate"),
        WeightView(up_type, (n_experts, n_ff, n_embd), up_data, "up"),
        WeightView(down_type, (n_experts, n_embd, n_ff), down_data, "down"),
        activation,
    )


def moe_views(x: np.ndarray, expert_ids: np.ndarray, expert_weights: np.ndarray,
              gate: WeightView, up: WeightView, down: WeightView,
              activation: ActivationName, rows_alone: bool = False) -> np.ndarray:
    """`moe` over WeightViews: gate, up [E, F, H], down [E, H, F]; negative ids skip.
    rows_alone: as in matmul_view (every (token, expert) pair on the decode path)."""
    x = _as_f32(x)
    if x.ndim != 2:
        raise ValueError(f"moe: x must be [T, H], got shape {list(x.shape)}")
    n_tokens, n_embd = x.shape
    if len(gate.shape) != 3:
        raise ValueError(f"moe: gate must be an expert stack [E, F, H], got {list(gate.shape)}")
    n_experts, n_ff = gate.shape[0], gate.shape[1]
    if (gate.shape != (n_experts, n_ff, n_embd) or up.shape != gate.shape
            or down.shape != (n_experts, n_embd, n_ff)):
        raise ValueError(f"moe: x {list(x.shape)} with gate {list(gate.shape)}, "
                         f"up {list(up.shape)}, down {list(down.shape)}")
    if expert_ids.dtype != _I32 or not expert_ids.flags.c_contiguous:
        expert_ids = np.ascontiguousarray(expert_ids, dtype=np.int32)
    expert_weights = _as_f32(expert_weights)
    if expert_ids.ndim != 2 or expert_ids.shape[0] != n_tokens:
        raise ValueError(f"moe: expert_ids must be [{n_tokens}, K], got {list(expert_ids.shape)}")
    if expert_weights.shape != expert_ids.shape:
        raise ValueError(f"moe: expert_weights {list(expert_weights.shape)} must match "
                         f"expert_ids {list(expert_ids.shape)}")
    if expert_ids.shape[1] <= 0:
        raise ValueError("moe: each token needs at least one expert (K > 0)")
    return _moe_call(x, expert_ids, expert_weights, n_experts, n_ff, gate, up, down,
                     _activation(activation, "moe"), "moe", rows_alone)


# A dense FFN is a MoE with one expert that every token uses with weight 1; the decode step's
# routing arrays are made once.
_ONE_TOKEN_IDS = np.zeros((1, 1), np.int32)  # [T=1, K=1]
_ONE_TOKEN_WEIGHTS = np.ones((1, 1), np.float32)  # [T=1, K=1]


def dense_ffn(x: np.ndarray, gate: WeightView, up: WeightView, down: WeightView,
              activation: ActivationName, rows_alone: bool = False) -> np.ndarray:
    """x [T, H] -> down(act(gate x) * up x) [T, H]: gate, up [F, H], down [H, F], in one
    native call (numoe_moe with one expert). rows_alone: as in matmul_view."""
    x = _as_f32(x)
    if x.ndim != 2:
        raise ValueError(f"dense_ffn: x must be [T, H], got shape {list(x.shape)}")
    n_tokens, n_embd = x.shape
    n_ff = gate.shape[0]
    if (gate.shape != (n_ff, n_embd) or up.shape != (n_ff, n_embd)
            or down.shape != (n_embd, n_ff)):
        raise ValueError(f"dense_ffn: x {list(x.shape)} with gate {list(gate.shape)}, "
                         f"up {list(up.shape)}, down {list(down.shape)}")
    if n_tokens == 1:
        ids, weights = _ONE_TOKEN_IDS, _ONE_TOKEN_WEIGHTS
    else:
        ids, weights = np.zeros((n_tokens, 1), np.int32), np.ones((n_tokens, 1), np.float32)
    return _moe_call(x, ids, weights, 1, n_ff, gate, up, down,
                     _activation(activation, "dense_ffn"), "dense_ffn", rows_alone)


def _activation(name: str, call: str) -> int:
    act = _ACTIVATION_BY_NAME.get(name)
    if act is None:
        raise ValueError(f"{call}: unknown activation {name!r}; "
                         f"choose one of {sorted(_ACTIVATION_BY_NAME)}")
    return act


def _moe_call(x: np.ndarray, expert_ids: np.ndarray, expert_weights: np.ndarray,
              n_experts: int, n_ff: int, gate: WeightView, up: WeightView, down: WeightView,
              act: int, call: str, rows_alone: bool = False) -> np.ndarray:
    """numoe_moe on checked arguments: x [T, H] float32, expert_ids int32 and expert_weights
    float32 [T, K], all C-contiguous -> y [T, H]."""
    n_tokens, n_embd = x.shape
    y = np.empty((n_tokens, n_embd), _F32)  # [T, H]
    fn = lib.numoe_moe_rows if rows_alone else lib.numoe_moe
    status = fn(
        ffi.from_buffer("float[]", x), n_tokens, n_embd,
        ffi.from_buffer("int32_t[]", expert_ids), ffi.from_buffer("float[]", expert_weights),
        expert_ids.shape[1], n_experts, n_ff,
        gate.ggml_type, gate.pointer, up.ggml_type, up.pointer, down.ggml_type, down.pointer,
        act, ffi.from_buffer("float[]", y),
    )
    if status == lib.NUMOE_EBADARG:
        raise ValueError(f"{call}: expert ids must be below {n_experts} (negative ids skip "
                         f"their slot); got max {int(expert_ids.max())}")
    _check_status(status, call)
    return y


def read_probe(buf: Any, repeats: int = 3, warm_up: bool = True) -> float:
    """Streams `buf` `repeats` times with the current threads; returns the read rate in GB/s
    (1e9 bytes per second), the ceiling a weight-streaming kernel can reach. The warm-up pass
    (page faults, TLB) is not timed; skip it when the buffer was just read."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    data = ffi.from_buffer(buf)
    nbytes = len(data)
    if nbytes == 0:
        raise ValueError("read_probe needs a non-empty buffer")
    if warm_up:
        lib.numoe_read_probe(data, nbytes, 1)
    start = time.perf_counter()
    lib.numoe_read_probe(data, nbytes, repeats)
    elapsed = time.perf_counter() - start
    return nbytes * repeats / elapsed / 1e9
