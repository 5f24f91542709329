"""CUDA backend on CuPy: GGUF weights stay quantized on the GPU, activations are float32 there.

Host <-> device boundaries (everything else stays on the device):
- load_weight copies a tensor's raw GGUF blocks to the GPU once (`DeviceWeight`); load_vector
  returns a dense float32 device array (norm weights; the MoE router wrapped, see below).
- Token ids arrive as host numpy (the runner's `ids`); `embedding` uploads them.
- Logits leave as host numpy float32: a product with the LM head (the weight named
  output.weight, or token_embd.weight when tied) is the forward pass's last op, so `matmul`
  returns it on the host. The runner's soft-capping then runs in numpy and `forward` returns
  numpy, as with the other backends.
- MoE routing runs on the host: the router product `x @ router.T` runs on the device but
  returns host numpy logits [T, E] (`HostRouter`), because the runner routes, counts tokens
  per expert and masks expert-parallel ids in numpy; `moe` then uploads the ids and weights
  ([T, K] each). One small device-to-host copy per MoE layer.
- The KV cache lives on the device: for each runner `KVCache` (keyed weakly by that object)
  one device array per layer, of the shape and dtype of `cache.layer_keys[layer]` /
  `layer_values[layer]`; the runner's host arrays are left untouched (and, being np.zeros,
  never paged in).

Products: a decode step (T < PREFILL_MIN_TOKENS tokens) runs the fused dequantize-matvec kernel
(worker/backends/cuda_kernels.py), which reads the quantized blocks directly; a prompt batch
dequantizes the weight to float32 (in row slices of bounded size) and multiplies with cuBLAS.
MoE decode runs the same kernel over (token, expert) pairs, each pair picking its expert's
matrix; a MoE prompt groups the pairs by expert on the host and runs one dequantize + GEMM per
expert used. Norms, RoPE and attention are CuPy array expressions mirroring worker/layers.

Every op also runs with `HostKernels` (numpy arrays, the kernels' device code built for the
CPU), which is how the tests check this file on machines without a GPU.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from cluster.errors import NumoeError
from cluster.gguf import GGML_TYPE_NAMES, type_block
from cluster.model import RopeStyle
from worker.backends.base import Activation, Backend, WeightData
from worker.backends.cuda_kernels import CHUNK, KERNEL_NAMES, SOURCE, WARP
from worker.layers.attention import KVCache
from worker.layers.rope import RopeTable

# Below this many tokens a product reads the quantized weight once per token (matvec kernel);
# from it on, dequantizing once and running a GEMM costs less.
PREFILL_MIN_TOKENS = 16
# Largest float32 slice of a weight dequantized at once for a GEMM (elements; 256 MiB).
DEQUANT_SLICE_ELEMENTS = 1 << 26
LM_HEAD_NAMES = frozenset({"output.weight", "token_embd.weight"})
ROUTER_SUFFIX = "ffn_gate_inp.weight"
_MATVEC_WARPS = 4  # warps (output rows) per block of the matvec kernel
_MAX_GRID_Y = 65535  # CUDA's limit on gridDim.y: the matvec kernel's pairs


class Kernels(Protocol):
    """What the backend needs from a device: CudaKernels (GPU) or cuda_kernels.HostKernels."""

    xp: Any  # array module: cupy or numpy

    def upload(self, array: np.ndarray) -> Any: ...

    def download(self, array: Any) -> np.ndarray: ...

    def dequantize(self, ggml_type: int, data: Any, row_bytes: int, n_in: int, n_rows: int,
                   row_ids: Any | None = None) -> Any: ...

    def matvec(self, ggml_type: int, data: Any, row_bytes: int, expert_bytes: int,
               expert_ids: Any | None, x: Any, x_div: int, n_out: int, n_in: int,
               n_pairs: int) -> Any: ...


class CudaKernels:
    """The kernels of cuda_kernels.SOURCE on one GPU, compiled by NVRTC (CuPy caches the
    binary on disk) when the backend is built."""

    def __init__(self, device: int = 0) -> None:
        try:
            import cupy  # noqa: PLC0415 — optional dependency, needed only by this backend
        except ImportError as error:
            raise NumoeError(
                f"the cuda backend needs CuPy ({error}): install cupy-cuda12x or cupy-cuda13x "
                f"(matching your NVIDIA driver's CUDA version), or choose --backend cpu"
            ) from None
        try:
            n_devices = cupy.cuda.runtime.getDeviceCount()
        except cupy.cuda.runtime.CUDARuntimeError as error:
            raise NumoeError(
                f"the cuda backend needs an NVIDIA GPU with a working driver, and CUDA reports: "
                f"{error}; check nvidia-smi, or choose --backend cpu"
            ) from None
        if not 0 <= device < n_devices:
            raise NumoeError(
                f"the cuda backend was asked for GPU {device}, but CUDA sees {n_devices} "
                f"device(s); it needs an NVIDIA GPU: pick a device below {n_devices}, or "
                f"choose --backend cpu"
            )
        self.xp = cupy
        self.device = cupy.cuda.Device(device)
        self.device.use()
        self._module = cupy.RawModule(code=SOURCE, options=("-std=c++17",))
        self._module.compile()  # now, so that a compile error surfaces once, here (cached)
        self._functions: dict[str, Any] = {}
        self._no_ids = cupy.zeros(1, dtype=cupy.int32)

    def _function(self, kind: str, ggml_type: int) -> Any:
        name = f"{kind}_{KERNEL_NAMES[ggml_type]}"
        if name not in self._functions:
            self._functions[name] = self._module.get_function(name)
        return self._functions[name]

    def upload(self, array: np.ndarray) -> Any:
        return self.xp.asarray(array)

    def download(self, array: Any) -> np.ndarray:
        return self.xp.asnumpy(array)

    def dequantize(self, ggml_type: int, data: Any, row_bytes: int, n_in: int, n_rows: int,
                   row_ids: Any | None = None) -> Any:
        cp = self.xp
        out = cp.empty((n_rows, n_in), dtype=cp.float32)
        total = n_rows * -(-n_in // CHUNK)
        if total == 0:
            return out
        ids = self._no_ids if row_ids is None else cp.ascontiguousarray(row_ids, dtype=cp.int32)
        threads = 256
        blocks = min(-(-total // threads), 1 << 20)  # the kernel loops over the rest
        self._function("dequantize", ggml_type)(
            (blocks,), (threads,),
            (data, np.int64(row_bytes), ids, np.int64(row_ids is not None), out,
             np.int64(n_in), np.int64(n_rows)))
        return out

    def matvec(self, ggml_type: int, data: Any, row_bytes: int, expert_bytes: int,
               expert_ids: Any | None, x: Any, x_div: int, n_out: int, n_in: int,
               n_pairs: int) -> Any:
        cp = self.xp
        if n_pairs > _MAX_GRID_Y:
            raise ValueError(f"matvec takes at most {_MAX_GRID_Y} pairs, got {n_pairs}")
        x = cp.ascontiguousarray(x, dtype=cp.float32)
        y = cp.empty((n_pairs, n_out), dtype=cp.float32)
        if n_pairs == 0 or n_out == 0:
            return y
        ids = (self._no_ids if expert_ids is None
               else cp.ascontiguousarray(expert_ids, dtype=cp.int32))
        grid = (-(-n_out // _MATVEC_WARPS), n_pairs)
        self._function("matvec", ggml_type)(
            grid, (WARP * _MATVEC_WARPS,),
            (data, np.int64(row_bytes), np.int64(expert_bytes), ids,
             np.int64(expert_ids is not None), x, np.int64(x_div), y, np.int64(n_out),
             np.int64(n_in)))
        return y


@dataclass(frozen=True, eq=False)
class DeviceWeight:
    """A matrix [n_out, n_in] or expert stack [E, n_out, n_in]: its GGUF blocks on the device."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]
    data: Any  # device uint8 [n_bytes], blocks exactly as in the file
    row_bytes: int
    logits_to_host: bool  # the LM head: matmul returns host numpy

    @property
    def n_in(self) -> int:
        return self.shape[-1]

    @property
    def n_out(self) -> int:
        return self.shape[-2]

    @property
    def matrix_bytes(self) -> int:
        """Bytes of one [n_out, n_in] matrix: the stride between experts."""
        return self.n_out * self.row_bytes


class HostRouter:
    """The MoE router [E, H] on the device, whose product with the activations comes back to
    the host: the runner computes `x @ router.T` and then routes in numpy (top-k, per-expert
    counters, expert-parallel id masks), so its router logits [T, E] must be host arrays.
    `__array_ufunc__ = None` makes numpy and CuPy hand `x @ router.T` to __rmatmul__."""

    __array_ufunc__ = None

    def __init__(self, weight: Any, kernels: Kernels, transposed: bool = False) -> None:
        self.weight = weight  # device float32 [E, H]
        self.kernels = kernels
        self.transposed = transposed

    @property
    def T(self) -> HostRouter:  # noqa: N802 — mirrors ndarray.T
        return HostRouter(self.weight, self.kernels, not self.transposed)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.T.shape if self.transposed else self.weight.shape)

    def __rmatmul__(self, x: Any) -> np.ndarray:
        if not self.transposed:
            raise ValueError("the router multiplies as x @ router.T")
        logits = self.kernels.xp.asarray(x) @ self.weight.T  # [T, H] @ [H, E] -> [T, E]
        return self.kernels.download(logits)


@dataclass
class DeviceKVCache:
    """The device copy of a runner KVCache, allocated per layer on first use."""

    keys: list[Any | None]  # L x [n_kv, n_ctx, d] in the runner cache's dtype
    values: list[Any | None]  # L x [n_kv, n_ctx, dv]


def _row_bytes(ggml_type: int, n_in: int, name: str) -> int:
    if ggml_type not in KERNEL_NAMES:
        supported = ", ".join(GGML_TYPE_NAMES[t] for t in sorted(KERNEL_NAMES))
        raise NumoeError(
            f"tensor {name!r} has quant type {GGML_TYPE_NAMES.get(ggml_type, ggml_type)}, which "
            f"the cuda backend cannot read; supported: {supported}. Requantise the model, e.g. "
            f"`llama-quantize --allow-requantize model.gguf out.gguf Q4_K_M`"
        )
    block_elements, block_bytes = type_block(ggml_type)
    return n_in // block_elements * block_bytes


class CupyBackend(Backend):
    name = "cuda"

    def __init__(self, device: int = 0, kernels: Kernels | None = None) -> None:
        """device: CUDA device ordinal. kernels: a stand-in device (tests pass
        cuda_kernels.HostKernels); by default the GPU's CudaKernels."""
        self.kernels: Kernels = kernels if kernels is not None else CudaKernels(device)
        self.xp = self.kernels.xp
        self.dtype = np.dtype(np.float32)
        self.kv_cache_dtypes = (np.dtype(np.float32), np.dtype(np.float16))
        self._caches: weakref.WeakKeyDictionary[KVCache, DeviceKVCache] = (
            weakref.WeakKeyDictionary())
        self._rope_tables: weakref.WeakKeyDictionary[RopeTable, tuple[Any, Any]] = (
            weakref.WeakKeyDictionary())

    # --- weights ---------------------------------------------------------------------------

    def load_weight(self, tensor: WeightData) -> DeviceWeight:
        row_bytes = _row_bytes(tensor.ggml_type, tensor.n_in, tensor.name)
        return DeviceWeight(tensor.name, tensor.ggml_type, tuple(tensor.shape),
                            self.kernels.upload(tensor.data), row_bytes,
                            tensor.name in LM_HEAD_NAMES)

    def load_vector(self, tensor: WeightData) -> Any:
        """A device float32 array; the MoE router as a HostRouter."""
        n_in = tensor.shape[-1]
        n_rows = int(np.prod(tensor.shape[:-1], dtype=np.int64))
        row_bytes = _row_bytes(tensor.ggml_type, n_in, tensor.name)
        values = self.kernels.dequantize(tensor.ggml_type, self.kernels.upload(tensor.data),
                                         row_bytes, n_in, n_rows).reshape(tensor.shape)
        if tensor.name.endswith(ROUTER_SUFFIX):
            return HostRouter(values, self.kernels)  # [E, H]
        return values

    # --- products --------------------------------------------------------------------------

    def _activations(self, x: Any) -> Any:
        return self.xp.ascontiguousarray(self.xp.asarray(x), dtype=self.xp.float32)

    def _matvec(self, w: DeviceWeight, x: Any, data: Any | None = None) -> Any:
        """x [T, n_in] @ W^T -> [T, n_out], reading the quantized blocks per token."""
        return self.kernels.matvec(w.ggml_type, w.data if data is None else data, w.row_bytes,
                                   0, None, x, 1, w.n_out, w.n_in, x.shape[0])

    def _gemm(self, w: DeviceWeight, x: Any, data: Any | None = None) -> Any:
        """x [T, n_in] @ W^T -> [T, n_out] through float32 slices of W and cuBLAS."""
        xp = self.xp
        data = w.data if data is None else data
        out = xp.empty((x.shape[0], w.n_out), dtype=xp.float32)  # [T, n_out]
        step = max(1, DEQUANT_SLICE_ELEMENTS // max(1, w.n_in))
        for first in range(0, w.n_out, step):
            last = min(w.n_out, first + step)
            rows = data[first * w.row_bytes : last * w.row_bytes]
            dense = self.kernels.dequantize(w.ggml_type, rows, w.row_bytes, w.n_in,
                                            last - first)  # [rows, n_in]
            out[:, first:last] = x @ dense.T
        return out

    def _product(self, w: DeviceWeight, x: Any, data: Any | None = None) -> Any:
        if x.shape[0] < PREFILL_MIN_TOKENS:
            return self._matvec(w, x, data)
        return self._gemm(w, x, data)

    def matmul(self, weight: DeviceWeight, x: Any) -> Any:
        out = self._product(weight, self._activations(x))  # [T, n_out]
        return self.kernels.download(out) if weight.logits_to_host else out

    def gated_ffn(self, x: Any, gate: DeviceWeight, up: DeviceWeight, down: DeviceWeight,
                  activation: Activation) -> Any:
        x = self._activations(x)
        hidden = activate(self.xp, self._product(gate, x), activation)  # [T, F]
        hidden *= self._product(up, x)
        return self._product(down, hidden)  # [T, H]

    def moe(self, x: Any, expert_ids: Any, expert_weights: Any, gate: DeviceWeight,
            up: DeviceWeight, down: DeviceWeight, activation: Activation) -> Any:
        xp = self.xp
        x = self._activations(x)  # [T, H]
        n_tokens, n_used = expert_ids.shape
        n_pairs = n_tokens * n_used  # pair p = (token p // K, slot p % K)
        # Routing happens on the host (see HostRouter), so ids and weights arrive as numpy.
        host_ids = self._host(expert_ids).astype(np.int32).reshape(n_pairs)  # [P]
        # A negative id skips its slot (experts held by another worker): its y rows are 0,
        # and its weight is zeroed so that a stray inf or NaN there cannot leak in.
        weights = np.where(host_ids.reshape(n_tokens, n_used) < 0, 0.0,
                           self._host(expert_weights)).astype(np.float32)  # [T, K]
        if n_tokens < PREFILL_MIN_TOKENS:
            ids = self.kernels.upload(host_ids)
            g = self.kernels.matvec(gate.ggml_type, gate.data, gate.row_bytes, gate.matrix_bytes,
                                    ids, x, n_used, gate.n_out, gate.n_in, n_pairs)  # [P, F]
            u = self.kernels.matvec(up.ggml_type, up.data, up.row_bytes, up.matrix_bytes,
                                    ids, x, n_used, up.n_out, up.n_in, n_pairs)  # [P, F]
            hidden = activate(xp, g, activation) * u  # [P, F]
            y = self.kernels.matvec(down.ggml_type, down.data, down.row_bytes, down.matrix_bytes,
                                    ids, hidden, 1, down.n_out, down.n_in, n_pairs)  # [P, H]
        else:
            y = self._grouped_experts(x, host_ids, n_used, gate, up, down, activation)  # [P, H]
        weights = self.kernels.upload(weights)  # [T, K]
        return (y.reshape(n_tokens, n_used, -1) * weights[:, :, None]).sum(axis=1)  # [T, H]

    def _host(self, array: Any) -> np.ndarray:
        return array if isinstance(array, np.ndarray) else self.kernels.download(array)

    def _grouped_experts(self, x: Any, host_ids: np.ndarray, n_used: int, gate: DeviceWeight,
                         up: DeviceWeight, down: DeviceWeight, activation: Activation) -> Any:
        """A prompt's (token, expert) pairs grouped by expert: one GEMM per expert used."""
        xp = self.xp
        kept = np.flatnonzero(host_ids >= 0)  # pairs whose expert this worker holds
        order = kept[np.argsort(host_ids[kept], kind="stable")]  # kept pairs sorted by expert
        counts = np.bincount(host_ids[kept], minlength=gate.shape[0])  # [E]
        order_device = self.kernels.upload(order.astype(np.int64))
        y = xp.zeros((len(host_ids), down.n_out), dtype=xp.float32)  # [P, H]
        first = 0
        for expert in np.flatnonzero(counts):
            pairs = order_device[first : first + counts[expert]]  # [n]
            first += int(counts[expert])
            xs = x[pairs // n_used]  # [n, H]
            g = self._gemm(gate, xs, _expert_slice(gate, expert))  # [n, F]
            u = self._gemm(up, xs, _expert_slice(up, expert))  # [n, F]
            hidden = activate(xp, g, activation) * u
            y[pairs] = self._gemm(down, hidden, _expert_slice(down, expert))  # [n, H]
        return y

    def embedding(self, weight: DeviceWeight, token_ids: Any) -> Any:
        ids = np.asarray(self.kernels.download(token_ids) if not isinstance(token_ids, np.ndarray)
                         else token_ids)
        n_rows = weight.n_out
        if ids.size and (ids.min() < 0 or ids.max() >= n_rows):
            raise NumoeError(f"token id {int(ids.max() if ids.max() >= n_rows else ids.min())} is "
                             f"outside the vocabulary [0, {n_rows}); check the tokenizer")
        device_ids = self.kernels.upload(ids.astype(np.int32))
        return self.kernels.dequantize(weight.ggml_type, weight.data, weight.row_bytes,
                                       weight.n_in, len(ids), device_ids)  # [T, H]

    # --- per-layer ops -----------------------------------------------------------------------

    def rms_norm(self, x: Any, weight: Any, eps: float, residual: Any | None = None,
                 out: Any | None = None) -> Any:
        xp = self.xp
        x = xp.asarray(x)  # a no-op on device arrays
        sum_squares = (x * x).sum(axis=-1, keepdims=True)  # [..., 1]
        result = x * (1.0 / xp.sqrt(sum_squares * (1.0 / x.shape[-1]) + eps))
        result *= weight
        if residual is not None:
            result += xp.asarray(residual)
        if out is None:
            return result
        out[...] = result
        return out

    def _rope_table(self, table: RopeTable) -> tuple[Any, Any]:
        if table not in self._rope_tables:
            self._rope_tables[table] = (self.kernels.upload(table.cos),
                                        self.kernels.upload(table.sin))  # [n_ctx, d/2] each
        return self._rope_tables[table]

    def rope(self, q: Any, k: Any, table: RopeTable, start: int) -> tuple[Any, Any]:
        cos_table, sin_table = self._rope_table(table)
        cos = cos_table[start : start + q.shape[0], None]  # [T, 1, d/2]
        sin = sin_table[start : start + q.shape[0], None]
        return (_rotate(self.xp, q, cos, sin, table.style),
                _rotate(self.xp, k, cos, sin, table.style))

    def _layer_cache(self, cache: KVCache, layer: int) -> tuple[Any, Any]:
        """The device keys [n_kv, n_ctx, d] and values [n_kv, n_ctx, dv] of one layer."""
        if cache not in self._caches:
            n_layers = len(cache.layer_keys)
            self._caches[cache] = DeviceKVCache([None] * n_layers, [None] * n_layers)
        device_cache = self._caches[cache]
        if device_cache.keys[layer] is None:
            host_keys, host_values = cache.layer_keys[layer], cache.layer_values[layer]
            device_cache.keys[layer] = self.xp.zeros(host_keys.shape, dtype=host_keys.dtype)
            device_cache.values[layer] = self.xp.zeros(host_values.shape,
                                                       dtype=host_values.dtype)
        return device_cache.keys[layer], device_cache.values[layer]

    def attention(self, q: Any, k_new: Any, v_new: Any, cache: KVCache, layer: int, start: int,
                  scale: float, sliding_window: int) -> Any:
        """As worker/layers/attention.attention, on the device cache."""
        xp = self.xp
        layer_keys, layer_values = self._layer_cache(cache, layer)
        n_tokens, n_heads, head_dim = q.shape
        n_kv = k_new.shape[1]
        group = n_heads // n_kv
        end = start + n_tokens
        layer_keys[:, start:end] = k_new.transpose(1, 0, 2)
        layer_values[:, start:end] = v_new.transpose(1, 0, 2)

        first = max(0, start - sliding_window + 1) if sliding_window > 0 else 0
        keys = layer_keys[:, first:end].astype(xp.float32)  # [n_kv, S, d]
        values = layer_values[:, first:end].astype(xp.float32)  # [n_kv, S, dv]
        n_keys = end - first

        q_grouped = q.reshape(n_tokens, n_kv, group, head_dim).transpose(1, 2, 0, 3)
        q_grouped = q_grouped.reshape(n_kv, group * n_tokens, head_dim)  # [n_kv, G*T, d]
        scores = xp.matmul(q_grouped, keys.transpose(0, 2, 1))  # [n_kv, G*T, S]
        scores *= scale
        if n_tokens > 1:
            query_pos = xp.arange(start, end)[:, None]  # [T, 1]
            key_pos = xp.arange(first, end)[None, :]  # [1, S]
            visible = key_pos <= query_pos  # [T, S]
            if sliding_window > 0:
                visible &= query_pos - key_pos < sliding_window
            scores = xp.where(visible, scores.reshape(n_kv, group, n_tokens, n_keys),
                              -math.inf).reshape(n_kv, group * n_tokens, n_keys)
        scores -= scores.max(axis=-1, keepdims=True)
        probs = xp.exp(scores)
        probs /= probs.sum(axis=-1, keepdims=True)
        out = xp.matmul(probs, values)  # [n_kv, G*T, dv]
        out = out.reshape(n_kv, group, n_tokens, -1).transpose(2, 0, 1, 3)  # [T, n_kv, G, dv]
        return out.reshape(n_tokens, -1)  # [T, n_heads * dv]


def _expert_slice(w: DeviceWeight, expert: int) -> Any:
    return w.data[expert * w.matrix_bytes : (expert + 1) * w.matrix_bytes]


def activate(xp: Any, gate: Any, activation: Activation) -> Any:
    """silu or tanh-approximated gelu in gate's dtype (Python-float constants stay weak)."""
    if activation == "silu":
        return gate / (1.0 + xp.exp(-gate))
    if activation == "gelu_tanh":
        inner = math.sqrt(2.0 / math.pi) * (gate + 0.044715 * gate * gate * gate)
        return 0.5 * gate * (1.0 + xp.tanh(inner))
    raise ValueError(f"unknown activation {activation!r}")


def _rotate(xp: Any, x: Any, cos: Any, sin: Any, style: RopeStyle) -> Any:
    """x [T, n_heads, d] rotated by cos, sin [T, 1, d/2] (worker/layers/rope.py's layouts)."""
    out = xp.empty_like(x)
    if style is RopeStyle.NEOX:
        half = x.shape[-1] // 2
        first, second = x[..., :half], x[..., half:]  # pairs (i, i + d/2)
        out[..., :half] = first * cos - second * sin
        out[..., half:] = second * cos + first * sin
    else:
        first, second = x[..., 0::2], x[..., 1::2]  # pairs (2i, 2i + 1)
        out[..., 0::2] = first * cos - second * sin
        out[..., 1::2] = second * cos + first * sin
    return out
