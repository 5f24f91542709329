"""Native CPU backend: numoe's C kernels through native.kernels (cffi).

Quantized weights stay quantized: a handle is the uint8 view into the GGUF mmap plus its type
and shape, passed to the kernels as-is (no copy, no repacking). Activations are float32.
The dense gated FFN runs as a one-expert MoE call, so gate, up, activation and down are a single
native call per layer instead of three products and several numpy element-wise passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from native import kernels
from worker.backends.base import Activation, Backend, WeightData
from worker.backends.blas_threads import limit_blas_threads

_F32 = 0  # ggml type id of float32


@dataclass(frozen=True)
class NativeWeight:
    ggml_type: int
    shape: tuple[int, ...]  # [n_out, n_in] or [n_experts, n_out, n_in]
    data: np.ndarray  # uint8 [n_bytes], view into the mmap

    @property
    def n_out(self) -> int:
        return self.shape[-2]

    @property
    def n_in(self) -> int:
        return self.shape[-1]


class CpuBackend(Backend):
    name = "cpu"

    def __init__(self, n_threads: int | None = None, isa: str | None = None) -> None:
        self.dtype = np.dtype(np.float32)
        if isa is not None:
            kernels.set_isa(isa)
        if n_threads is not None:
            kernels.set_threads(n_threads)
        # The kernels own the cores; numpy's small attention products run on one BLAS thread
        # (see blas_threads.py for the measured contention).
        limit_blas_threads(1)
        # A dense FFN is a MoE with one expert that every token uses with weight 1; keep the
        # routing arrays for the decode case preallocated.
        self._single_expert_ids = np.zeros((1, 1), np.int32)  # [T=1, K=1]
        self._single_expert_weights = np.ones((1, 1), np.float32)  # [T=1, K=1]

    def load_weight(self, tensor: WeightData) -> NativeWeight:
        return NativeWeight(tensor.ggml_type, tuple(tensor.shape), tensor.data)

    def load_vector(self, tensor: WeightData) -> np.ndarray:
        if tensor.ggml_type == _F32:
            return tensor.data.view(np.float32).reshape(tensor.shape)
        n_in = tensor.shape[-1]
        n_rows = int(np.prod(tensor.shape[:-1], dtype=np.int64))
        values = kernels.dequantize(tensor.ggml_type, tensor.data, n_rows, n_in)
        return values.reshape(tensor.shape)

    def matmul(self, weight: NativeWeight, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)  # [T, n_in]
        return kernels.matmul(weight.ggml_type, weight.data, weight.n_out, weight.n_in, x)

    def gated_ffn(
        self, x: np.ndarray, gate: NativeWeight, up: NativeWeight, down: NativeWeight,
        activation: Activation,
    ) -> np.ndarray:
        n_tokens = x.shape[0]
        if n_tokens == 1:
            ids, weights = self._single_expert_ids, self._single_expert_weights
        else:
            ids = np.zeros((n_tokens, 1), np.int32)  # [T, 1]
            weights = np.ones((n_tokens, 1), np.float32)  # [T, 1]
        return self._moe(x, ids, weights, gate, up, down, activation, n_experts=1,
                         n_ff=gate.n_out)

    def moe(
        self,
        x: np.ndarray,
        expert_ids: np.ndarray,
        expert_weights: np.ndarray,
        gate: NativeWeight,
        up: NativeWeight,
        down: NativeWeight,
        activation: Activation,
    ) -> np.ndarray:
        return self._moe(x, expert_ids, expert_weights, gate, up, down, activation,
                         n_experts=gate.shape[0], n_ff=gate.n_out)

    def _moe(self, x: np.ndarray, expert_ids: np.ndarray, expert_weights: np.ndarray,
             gate: NativeWeight, up: NativeWeight, down: NativeWeight, activation: Activation,
             n_experts: int, n_ff: int) -> np.ndarray:
        return kernels.moe(
            np.ascontiguousarray(x, dtype=np.float32),  # [T, H]
            np.ascontiguousarray(expert_ids, dtype=np.int32),  # [T, K]
            np.ascontiguousarray(expert_weights, dtype=np.float32),  # [T, K]
            gate=(gate.ggml_type, gate.data),
            up=(up.ggml_type, up.data),
            down=(down.ggml_type, down.data),
            n_experts=n_experts,
            n_ff=n_ff,
            activation=activation,
        )

    def embedding(self, weight: NativeWeight, token_ids: np.ndarray) -> np.ndarray:
        n_rows, n_embd = weight.shape
        rows = weight.data.reshape(n_rows, -1)[token_ids]  # [T, row_bytes]: only these rows
        return kernels.dequantize(weight.ggml_type, rows, len(token_ids), n_embd)  # [T, H]
