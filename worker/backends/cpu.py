"""Native CPU backend: numoe's C kernels through native.kernels and native.ops (cffi).

Quantized weights stay quantized: a handle (`kernels.WeightView`) is the uint8 view into the GGUF
mmap plus its type and shape, size-checked and turned into a C pointer once at load, then
passed to the kernels as-is (no copy, no repacking). Activations are float32.
The dense gated FFN runs as a one-expert MoE call, so gate, up, activation and down are a single
native call per layer instead of three products and several numpy element-wise passes. Norms,
RoPE and attention are native too (native/ops.py): one call each, in place where they can be.
"""

from __future__ import annotations

import numpy as np

from cluster.model import RopeStyle
from native import kernels, ops
from native.kernels import WeightView
from worker.backends.base import Activation, Backend, WeightData
from worker.backends.blas_threads import limit_blas_threads
from worker.layers.attention import KVCache, LatentCache
from worker.layers.rope import RopeTable

_F32 = 0  # ggml type id of float32


class CpuBackend(Backend):
    name = "cpu"

    def __init__(self, n_threads: int | None = None, isa: str | None = None) -> None:
        self.dtype = np.dtype(np.float32)
        self.kv_cache_dtypes = tuple(ops.CACHE_TYPES)  # float32, float16
        if isa is not None:
            kernels.set_isa(isa)
        if n_threads is not None:
            kernels.set_threads(n_threads)
        # The kernels own the cores; numpy's small products (MoE router) run on one BLAS
        # thread (see blas_threads.py for the measured contention).
        limit_blas_threads(1)

    def load_weight(self, tensor: WeightData) -> WeightView:
        return WeightView(tensor.ggml_type, tuple(tensor.shape), tensor.data, tensor.name)

    def load_vector(self, tensor: WeightData) -> np.ndarray:
        if tensor.ggml_type == _F32:
            return tensor.data.view(np.float32).reshape(tensor.shape)
        n_in = tensor.shape[-1]
        n_rows = int(np.prod(tensor.shape[:-1], dtype=np.int64))
        values = kernels.dequantize(tensor.ggml_type, tensor.data, n_rows, n_in)
        return values.reshape(tensor.shape)

    def matmul(self, weight: WeightView, x: np.ndarray) -> np.ndarray:
        return kernels.matmul_view(weight, x)  # [T, n_out]

    def gated_ffn(
        self, x: np.ndarray, gate: WeightView, up: WeightView, down: WeightView,
        activation: Activation,
    ) -> np.ndarray:
        return kernels.dense_ffn(x, gate, up, down, activation)  # [T, H]

    def moe(
        self,
        x: np.ndarray,
        expert_ids: np.ndarray,
        expert_weights: np.ndarray,
        gate: WeightView,
        up: WeightView,
        down: WeightView,
        activation: Activation,
    ) -> np.ndarray:
        return kernels.moe_views(x, expert_ids, expert_weights, gate, up, down,
                                 activation)  # x, result [T, H]; ids, weights [T, K]

    # Batch-invariant forms: one native call each, every row on the decode (vec_dot) path,
    # which quantizes each row's activations on its own and splits threads by output rows.

    def matmul_rows(self, weight: WeightView, x: np.ndarray) -> np.ndarray:
        return kernels.matmul_view(weight, x, rows_alone=True)  # [T, n_out]

    def gated_ffn_rows(
        self, x: np.ndarray, gate: WeightView, up: WeightView, down: WeightView,
        activation: Activation,
    ) -> np.ndarray:
        return kernels.dense_ffn(x, gate, up, down, activation, rows_alone=True)  # [T, H]

    def moe_rows(
        self,
        x: np.ndarray,
        expert_ids: np.ndarray,
        expert_weights: np.ndarray,
        gate: WeightView,
        up: WeightView,
        down: WeightView,
        activation: Activation,
    ) -> np.ndarray:
        return kernels.moe_views(x, expert_ids, expert_weights, gate, up, down, activation,
                                 rows_alone=True)  # [T, H]

    def embedding(self, weight: WeightView, token_ids: np.ndarray) -> np.ndarray:
        n_rows, n_embd = weight.shape
        rows = weight.data.reshape(n_rows, -1)[token_ids]  # [T, row_bytes]: only these rows
        return kernels.dequantize(weight.ggml_type, rows, len(token_ids), n_embd)  # [T, H]

    def rms_norm(self, x: np.ndarray, weight: np.ndarray, eps: float,
                 residual: np.ndarray | None = None, out: np.ndarray | None = None
                 ) -> np.ndarray:
        return ops.rms_norm(x, weight, eps, residual, out)

    def rope(self, q: np.ndarray, k: np.ndarray, table: RopeTable, start: int
             ) -> tuple[np.ndarray, np.ndarray]:
        end = start + q.shape[0]
        ops.rope(q, k, table.cos[start:end], table.sin[start:end],
                 table.style is RopeStyle.NEOX)  # in place
        return q, k

    def attention(self, q: np.ndarray, k_new: np.ndarray, v_new: np.ndarray, cache: KVCache,
                  layer: int, start: int, scale: float, sliding_window: int) -> np.ndarray:
        return ops.attention(q, k_new, v_new, cache.layer_keys[layer], cache.layer_values[layer],
                             start, scale, sliding_window)  # [T, n_heads * dv]

    # MLA: the per-head products loop over heads in C (one call), and the latent attention
    # reads one cache row per position for every head, its first value_dim values the value.

    def matmul_heads(self, weight: WeightView, x: np.ndarray) -> np.ndarray:
        return kernels.matmul_batched(weight, x)  # [T, B, n_out]

    def matmul_heads_rows(self, weight: WeightView, x: np.ndarray) -> np.ndarray:
        return kernels.matmul_batched(weight, x, rows_alone=True)  # [T, B, n_out]

    def attention_latent(self, q: np.ndarray, latent_new: np.ndarray, cache: LatentCache,
                         layer: int, start: int, scale: float, value_dim: int) -> np.ndarray:
        return ops.attention_latent(q, latent_new, cache.layer_latents[layer], start, scale,
                                    value_dim)  # [T, n_heads, value_dim]
