"""The one narrow interface every compute backend implements (numpy reference, native CPU, ...).

A backend owns the weight-heavy operations: products with (possibly quantized) weight matrices,
the fused gated FFN / MoE block and embedding-row lookup. The small element-wise work (norms,
RoPE, softmax attention over the KV cache) lives in worker/layers as plain array code in the
backend's activation dtype, so a new backend only has to provide these few calls.

Weights are described by `WeightData` (the raw GGUF bytes, zero-copy) and turned into a
backend-specific handle by `load_weight`; callers treat the handle as opaque.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

Activation = Literal["silu", "gelu_tanh"]


@dataclass(frozen=True)
class WeightData:
    """One tensor as stored in the GGUF file."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]  # numpy order: [n_out, n_in] or [n_experts, n_out, n_in] or [n]
    data: np.ndarray  # uint8 [n_bytes], a view into the file's mmap

    @property
    def n_in(self) -> int:
        return self.shape[-1]

    @property
    def n_out(self) -> int:
        return self.shape[-2] if len(self.shape) >= 2 else 1


class Backend(ABC):
    """Weight-heavy operations for one device. Activations are `dtype` arrays, row-major."""

    name: str
    dtype: np.dtype  # activation / KV-cache dtype the layers compute in

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
        -> sum_k w[t,k] * down_e(act(gate_e x) * up_e x)  [T, H]."""

    @abstractmethod
    def embedding(self, weight: Any, token_ids: np.ndarray) -> np.ndarray:
        """Rows `token_ids` [T] of an embedding matrix, dequantized: [T, n_embd]."""
