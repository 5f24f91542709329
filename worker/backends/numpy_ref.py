"""Reference backend: dequantize with gguf-py (independent of numoe's C kernels), compute in numpy.

Slow and memory-hungry on purpose (every weight is dequantized once to a dense array, by
default float64), so that its results are a trustworthy yardstick for the native backends and
for the forward pass itself. It is for tests and small models.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from worker.backends.base import Activation, Backend, WeightData
from worker.layers import attention as attention_layer
from worker.layers.attention import KVCache, LatentCache
from worker.layers.mla import latent_attention
from worker.layers.norm import rms_norm
from worker.layers.rope import RopeTable

# Bound on the [T, K, F, H] gather of expert weights in `moe`, in elements (~128 MB in float64).
_MOE_GATHER_ELEMENTS = 16 * 1024 * 1024


def dequantize_tensor(tensor: WeightData) -> np.ndarray:
    """The tensor as float32 with its numpy shape, through gguf-py's dequantizers."""
    block_size, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(tensor.ggml_type)]
    row_bytes = tensor.n_in // block_size * block_bytes
    rows = tensor.data.reshape(-1, row_bytes)  # [n_rows, row_bytes]
    values = dequantize(rows, GGMLQuantizationType(tensor.ggml_type))  # [n_rows, n_in]
    return np.asarray(values, dtype=np.float32).reshape(tensor.shape)


def activate(gate: np.ndarray, activation: Activation) -> np.ndarray:
    if activation == "silu":
        return gate / (1.0 + np.exp(-gate))
    if activation == "gelu_tanh":
        inner = np.sqrt(2.0 / np.pi) * (gate + 0.044715 * gate**3)
        return 0.5 * gate * (1.0 + np.tanh(inner))
    raise ValueError(f"unknown activation {activation!r}")


class NumpyRefBackend(Backend):
    name = "numpy"

    def __init__(self, dtype: np.dtype | type = np.float64) -> None:
        self.dtype = np.dtype(dtype)
        self.kv_cache_dtypes = (self.dtype, np.dtype(np.float16))

    def load_weight(self, tensor: WeightData) -> np.ndarray:
        return dequantize_tensor(tensor).astype(self.dtype, copy=False)  # [..., n_out, n_in]

    def load_vector(self, tensor: WeightData) -> np.ndarray:
        return dequantize_tensor(tensor).astype(self.dtype, copy=False)

    def matmul(self, weight: np.ndarray, x: np.ndarray) -> np.ndarray:
        return x @ weight.T  # [T, n_in] @ [n_in, n_out] -> [T, n_out]

    def gated_ffn(
        self, x: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray,
        activation: Activation,
    ) -> np.ndarray:
        hidden = activate(x @ gate.T, activation) * (x @ up.T)  # [T, F]
        return hidden @ down.T  # [T, H]

    def moe(
        self,
        x: np.ndarray,
        expert_ids: np.ndarray,
        expert_weights: np.ndarray,
        gate: np.ndarray,
        up: np.ndarray,
        down: np.ndarray,
        activation: Activation,
    ) -> np.ndarray:
        n_tokens, n_used = expert_ids.shape
        _, n_ff, n_embd = gate.shape  # [E, F, H]
        out = np.zeros((n_tokens, n_embd), dtype=self.dtype)  # [T, H]
        # A negative id skips its slot (an expert-parallel worker's experts held elsewhere):
        # it gathers expert 0 and multiplies by 0, so the sum runs over the kept slots only.
        skipped = expert_ids < 0  # [T, K]
        expert_ids = np.where(skipped, 0, expert_ids)  # [T, K]
        expert_weights = np.where(skipped, 0, expert_weights)  # [T, K]
        # Gather the selected experts' matrices for a chunk of tokens at a time: vectorised over
        # tokens and experts, with memory bounded for long prompts.
        chunk = max(1, _MOE_GATHER_ELEMENTS // max(1, n_used * n_ff * n_embd))
        for start in range(0, n_tokens, chunk):
            ids = expert_ids[start : start + chunk]  # [t, K]
            xs = x[start : start + chunk]  # [t, H]
            g = np.einsum("tkfh,th->tkf", gate[ids], xs)  # [t, K, F]
            u = np.einsum("tkfh,th->tkf", up[ids], xs)  # [t, K, F]
            hidden = activate(g, activation) * u  # [t, K, F]
            y = np.einsum("tkhf,tkf->tkh", down[ids], hidden)  # [t, K, H]
            weights = expert_weights[start : start + chunk].astype(self.dtype)  # [t, K]
            out[start : start + chunk] = np.einsum("tkh,tk->th", y, weights)
        return out

    def embedding(self, weight: np.ndarray, token_ids: np.ndarray) -> np.ndarray:
        return weight[token_ids]  # [T, n_embd]

    def rms_norm(self, x: np.ndarray, weight: np.ndarray, eps: float,
                 residual: np.ndarray | None = None, out: np.ndarray | None = None
                 ) -> np.ndarray:
        result = rms_norm(x, weight, eps, residual)  # [..., n]
        if out is None:
            return result
        out[...] = result
        return out

    def rope(self, q: np.ndarray, k: np.ndarray, table: RopeTable, start: int
             ) -> tuple[np.ndarray, np.ndarray]:
        return table.apply(q, start), table.apply(k, start)

    def attention(self, q: np.ndarray, k_new: np.ndarray, v_new: np.ndarray, cache: KVCache,
                  layer: int, start: int, scale: float, sliding_window: int) -> np.ndarray:
        return attention_layer.attention(q, k_new, v_new, cache, layer, start, scale,
                                         sliding_window)

    def matmul_heads(self, weight: np.ndarray, x: np.ndarray) -> np.ndarray:
        return np.einsum("tbi,boi->tbo", x, weight)  # [T, B, n_out]

    def attention_latent(self, q: np.ndarray, latent_new: np.ndarray, cache: LatentCache,
                         layer: int, start: int, scale: float, value_dim: int) -> np.ndarray:
        return latent_attention(q, latent_new, cache.layer_latents[layer], start, scale,
                                value_dim)  # [T, n_heads, value_dim]
