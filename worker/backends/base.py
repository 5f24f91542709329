"""The one narrow interface every compute backend implements (numpy reference, native CPU, ...).

A backend owns the weight-heavy operations: products with (possibly quantized) weight matrices,
the fused gated FFN / MoE block and embedding-row lookup; and the small per-layer ops around
them (RMSNorm, RoPE, attention over the KV cache), whose plain-numpy versions in worker/layers
are the reference the numpy backend runs and a native backend replaces with fused kernels.

Weights are described by `WeightData` (the raw GGUF bytes, zero-copy) and turned into a
backend-specific handle by `load_weight`; callers treat the handle as opaque.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from cluster.errors import NumoeError

if TYPE_CHECKING:
    from worker.layers.attention import KVCache, LatentCache
    from worker.layers.rope import RopeTable

Activation = Literal["silu", "gelu_tanh"]


@dataclass(frozen=True)
class WeightData:
    """One tensor, or a worker's slice of one, in its GGUF encoding."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]  # numpy order: [n_out, n_in] or [n_experts, n_out, n_in] or [n]
    # uint8 [n_bytes]: a view into the file's mmap, or a worker's own copy of its slice
    # (worker/shard_loader.py); either way whole quant blocks, rows back to back.
    data: np.ndarray

    @property
    def n_in(self) -> int:
        return self.shape[-1]


class Backend(ABC):
    """Weight-heavy operations for one device. Activations are `dtype` arrays, row-major."""

    name: str
    dtype: np.dtype  # activation dtype the layers compute in (and the default KV-cache dtype)
    kv_cache_dtypes: tuple[np.dtype, ...]  # the KV-cache dtypes `attention` can read

    @abstractmethod
    def load_weight(self, tensor: WeightData) -> Any:
        """A handle for a matrix or expert stack; used by matmul/gated_ffn/moe/embedding."""

    @abstractmethod
    def load_vector(self, tensor: WeightData) -> np.ndarray:
        """A small tensor (norm weights, router) dequantized to a dense `dtype` array."""

    @abstractmethod
    def matmul(self, weight: Any, x: np.ndarray) -> np.ndarray:
        """x [T, n_in] -> x @ W^T [T, n_out]."""

    @abstractmethod
    def gated_ffn(
        self, x: np.ndarray, gate: Any, up: Any, down: Any, activation: Activation
    ) -> np.ndarray:
        """Dense gated FFN: x [T, H] -> down(act(gate x) * up x) [T, H]."""

    @abstractmethod
    def moe(
        self,
        x: np.ndarray,
        expert_ids: np.ndarray,
        expert_weights: np.ndarray,
        gate: Any,
        up: Any,
        down: Any,
        activation: Activation,
    ) -> np.ndarray:
        """Routed experts in one call: x [T, H], expert_ids int32 [T, K], expert_weights [T, K]
        -> sum_k w[t,k] * down_e(act(gate_e x) * up_e x)  [T, H]. A negative id skips its
        (token, slot): an expert-parallel worker passes its local ids and -1 for the rest."""

    # --- batch-invariant forms (continuous batching) --------------------------------------
    # A batch of decode steps of several sequences: each row must come out bit-identical to
    # the same call with that row alone, whatever else shares the call. These defaults make
    # one call per row (right for any backend); a backend whose kernels can keep rows apart
    # in one call (native CPU) overrides them.

    def matmul_rows(self, weight: Any, x: np.ndarray) -> np.ndarray:
        """matmul, each row x[t] [n_in] computed exactly as matmul(weight, x[t:t+1])."""
        return np.concatenate([self.matmul(weight, x[t : t + 1]) for t in range(len(x))])

    def gated_ffn_rows(self, x: np.ndarray, gate: Any, up: Any, down: Any,
                       activation: Activation) -> np.ndarray:
        """gated_ffn, each row computed exactly as it would be alone."""
        return np.concatenate([self.gated_ffn(x[t : t + 1], gate, up, down, activation)
                               for t in range(len(x))])

    def moe_rows(self, x: np.ndarray, expert_ids: np.ndarray, expert_weights: np.ndarray,
                 gate: Any, up: Any, down: Any, activation: Activation) -> np.ndarray:
        """moe, each row computed exactly as it would be alone."""
        return np.concatenate([
            self.moe(x[t : t + 1], expert_ids[t : t + 1], expert_weights[t : t + 1], gate, up,
                     down, activation) for t in range(len(x))])

    @abstractmethod
    def embedding(self, weight: Any, token_ids: np.ndarray) -> np.ndarray:
        """Rows `token_ids` [T] of an embedding matrix, dequantized: [T, n_embd]."""

    @abstractmethod
    def rms_norm(self, x: np.ndarray, weight: np.ndarray, eps: float,
                 residual: np.ndarray | None = None, out: np.ndarray | None = None
                 ) -> np.ndarray:
        """residual + x / sqrt(mean(x^2, last axis) + eps) * weight: x [..., n], weight [n].
        Written into `out` when given (which may be x or residual), else a new array."""

    @abstractmethod
    def rope(self, q: np.ndarray, k: np.ndarray, table: RopeTable, start: int
             ) -> tuple[np.ndarray, np.ndarray]:
        """Rotates q [T, n_heads, d] and k [T, n_kv, d] for positions [start, start + T);
        may work in place, so use the returned arrays."""

    @abstractmethod
    def attention(self, q: np.ndarray, k_new: np.ndarray, v_new: np.ndarray, cache: KVCache,
                  layer: int, start: int, scale: float, sliding_window: int) -> np.ndarray:
        """Stores k_new [T, n_kv, d], v_new [T, n_kv, dv] in `cache` at [start, start + T),
        then attends q [T, n_heads, d] to every visible key -> [T, n_heads * dv]
        (worker/layers/attention.py states the masks)."""

    # --- multi-head latent attention (DeepSeek, Kimi) -------------------------------------
    # Not abstract: a backend without them runs every other architecture; the runner's MLA
    # path calls them and gets a clear refusal.

    def matmul_heads(self, weight: Any, x: np.ndarray) -> np.ndarray:
        """Per-head products with a stack of matrices [B, n_out, n_in] (MLA's attn_k_b and
        attn_v_b): x [T, B, n_in] -> y [T, B, n_out], y[t, b] = W[b] @ x[t, b]."""
        raise self._no_mla()

    def matmul_heads_rows(self, weight: Any, x: np.ndarray) -> np.ndarray:
        """matmul_heads, each token row computed exactly as it would be alone."""
        return np.concatenate([self.matmul_heads(weight, x[t : t + 1]) for t in range(len(x))])

    def attention_latent(self, q: np.ndarray, latent_new: np.ndarray, cache: LatentCache,
                         layer: int, start: int, scale: float, value_dim: int) -> np.ndarray:
        """MLA's absorbed attention: stores latent_new [T, width] in `cache` at
        [start, start + T), then attends q [T, n_heads, width] causally to every cached row,
        the value being a row's first value_dim elements -> [T, n_heads, value_dim]
        (worker/layers/mla.py latent_attention is the reference)."""
        raise self._no_mla()

    def _no_mla(self) -> NumoeError:
        return NumoeError(f"the {self.name} backend cannot run multi-head latent attention "
                          f"(DeepSeek / Kimi models) yet; use the cpu or numpy backend")
