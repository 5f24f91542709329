"""numoe_moe against a float64 numpy MoE on gguf-py-dequantized weights.

Bounds, relative to the largest |y_ref| of the batch: 1e-4 for float weight types (only
float32 rounding), 3e-2 for integer types (x and the hidden activations are rounded to 8-bit
blocks, about 0.4% each, and the errors of thousands of terms add up). A wrong expert, a
wrong routing weight or a wrong activation gives errors of the order of y itself.
Prefill: an expert with at least 12 pairs takes the prompt (GEMM) path for every type, with
float32 activations, so a batch where every expert has that many meets 1e-4 for every type.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QType

from cluster.errors import UnsupportedQuantTypeError
from native import kernels
from tests.kernels.blocks import (
    ALL_TYPES,
    INTEGER_TYPES,
    kernel_settings,
    random_weight,
    type_param,
)

N_EMBD, N_FF, N_EXPERTS, N_USED = 256, 512, 4, 2


def _silu(v: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # exp(-v) -> inf for very negative v: silu -> -0
        return v / (1.0 + np.exp(-v))


def _gelu_tanh(v: np.ndarray) -> np.ndarray:
    return 0.5 * v * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (v + 0.044715 * v**3)))


def moe_reference(x, expert_ids, expert_weights, gate, up, down, activation) -> np.ndarray:
    """float64 MoE: x [T, H], ids/weights [T, K], gate/up [E, F, H], down [E, H, F] -> [T, H]."""
    act = _silu if activation == "silu" else _gelu_tanh
    x = x.astype(np.float64)
    y = np.zeros_like(x)
    for t in range(x.shape[0]):
        for e, w in zip(expert_ids[t], expert_weights[t], strict=True):
            if e < 0:
                continue  # a skipped slot: the expert lives on another worker
            hidden = act(gate[e] @ x[t]) * (up[e] @ x[t])  # [F]
            y[t] += w * (down[e] @ hidden)
    return y


class Experts:
    """Random expert weights of the given types: raw GGUF bytes and their float values."""

    def __init__(self, gate_type: QType, up_type: QType, down_type: QType, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.types = (gate_type, up_type, down_type)
        self.gate_raw, gate = random_weight(gate_type, N_EXPERTS * N_FF, N_EMBD, rng)
        self.up_raw, up = random_weight(up_type, N_EXPERTS * N_FF, N_EMBD, rng)
        self.down_raw, down = random_weight(down_type, N_EXPERTS * N_EMBD, N_FF, rng)
        self.gate = gate.reshape(N_EXPERTS, N_FF, N_EMBD)
        self.up = up.reshape(N_EXPERTS, N_FF, N_EMBD)
        self.down = down.reshape(N_EXPERTS, N_EMBD, N_FF)

    def run(self, x, expert_ids, expert_weights, activation="silu") -> np.ndarray:
        return kernels.moe(
            x, expert_ids, expert_weights,
            gate=(int(self.types[0]), self.gate_raw), up=(int(self.types[1]), self.up_raw),
            down=(int(self.types[2]), self.down_raw),
            n_experts=N_EXPERTS, n_ff=N_FF, activation=activation,
        )

    def reference(self, x, expert_ids, expert_weights, activation="silu") -> np.ndarray:
        return moe_reference(x, expert_ids, expert_weights, self.gate, self.up, self.down,
                             activation)

    @property
    def tolerance(self) -> float:
        return 3e-2 if any(t in INTEGER_TYPES for t in self.types) else 1e-4


def routing(n_tokens: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct experts per token and softmax-like positive weights: ids, weights [T, K]."""
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.permutation(N_EXPERTS)[:N_USED] for _ in range(n_tokens)])
    weights = rng.uniform(0.1, 1.0, (n_tokens, N_USED))
    return ids.astype(np.int32), (weights / weights.sum(1, keepdims=True)).astype(np.float32)


def _inputs(n_tokens: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = np.random.default_rng(seed).standard_normal((n_tokens, N_EMBD)).astype(np.float32)
    return (x, *routing(n_tokens, seed))  # [T, H], [T, K], [T, K]


def assert_close(y: np.ndarray, reference: np.ndarray, tolerance: float) -> None:
    error = np.abs(y - reference).max() / np.abs(reference).max()
    assert error <= tolerance, f"relative error {error:.2e} > {tolerance:.0e}"


@pytest.mark.parametrize("n_tokens", [1, 5])
@pytest.mark.parametrize("qtype", [type_param(t) for t in ALL_TYPES])
def test_moe_matches_float64_reference(qtype: QType, n_tokens: int) -> None:
    experts = Experts(qtype, qtype, qtype, seed=int(qtype))
    x, ids, weights = _inputs(n_tokens, seed=n_tokens)
    y = experts.run(x, ids, weights)
    assert y.shape == (n_tokens, N_EMBD) and y.dtype == np.float32
    assert_close(y, experts.reference(x, ids, weights), experts.tolerance)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize(
    "types",
    [
        pytest.param((QType.Q8_0, QType.Q5_0, QType.F16), id="Q8_0-Q5_0-F16"),
        pytest.param((QType.BF16, QType.F32, QType.Q4_0), id="BF16-F32-Q4_0"),
        pytest.param((QType.Q4_K, QType.Q4_K, QType.Q6_K), id="Q4_K-Q4_K-Q6_K",
                     marks=[] if kernels.type_supported(int(QType.Q4_K))
                     and kernels.type_supported(int(QType.Q6_K))
                     else [pytest.mark.skip(reason="no native K-quant kernels yet")]),
    ],
)
def test_moe_mixed_types_and_activations(
    types: tuple[QType, QType, QType], activation: str
) -> None:
    experts = Experts(*types, seed=7)
    x, ids, weights = _inputs(6, seed=8)
    y = experts.run(x, ids, weights, activation)
    assert_close(y, experts.reference(x, ids, weights, activation), experts.tolerance)


def test_moe_repeated_expert_and_unused_experts() -> None:
    """All tokens on one expert (others idle), one token picking the same expert twice."""
    experts = Experts(QType.F32, QType.F32, QType.F32, seed=9)
    x, _, weights = _inputs(3, seed=10)
    ids = np.array([[2, 2], [2, 0], [0, 2]], np.int32)
    assert_close(experts.run(x, ids, weights), experts.reference(x, ids, weights), 1e-4)


@pytest.mark.parametrize("n_tokens", [1, 6])
def test_moe_thread_count_does_not_change_results(n_tokens: int) -> None:
    experts = Experts(QType.Q8_0, QType.Q8_0, QType.BF16, seed=11)
    x, ids, weights = _inputs(n_tokens, seed=12)
    with kernel_settings(threads=1):
        one = experts.run(x, ids, weights)
    with kernel_settings(threads=2):
        two = experts.run(x, ids, weights)
    np.testing.assert_array_equal(one, two)


def test_moe_rejects_bad_arguments() -> None:
    experts = Experts(QType.Q8_0, QType.Q8_0, QType.Q8_0, seed=13)
    x, ids, weights = _inputs(2, seed=14)
    bad_ids = ids.copy()
    bad_ids[1, 0] = N_EXPERTS
    with pytest.raises(ValueError, match="expert ids"):
        experts.run(x, bad_ids, weights)
    with pytest.raises(ValueError, match="activation"):
        experts.run(x, ids, weights, activation="relu")
    with pytest.raises(ValueError, match="must match"):
        experts.run(x, ids, weights[:, :1])
    with pytest.raises(ValueError, match="gate buffer"):
        kernels.moe(x, ids, weights, gate=(int(QType.Q8_0), experts.gate_raw[:-1]),
                    up=(int(QType.Q8_0), experts.up_raw), down=(int(QType.Q8_0), experts.down_raw),
                    n_experts=N_EXPERTS, n_ff=N_FF, activation="silu")
    with pytest.raises(UnsupportedQuantTypeError):
        kernels.moe(x, ids, weights, gate=(3, experts.gate_raw),  # 3 = Q4_1, no kernel
                    up=(int(QType.Q8_0), experts.up_raw), down=(int(QType.Q8_0), experts.down_raw),
                    n_experts=N_EXPERTS, n_ff=N_FF, activation="silu")


def _balanced_routing(n_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Token t on experts t % E and (t + 1) % E: every expert gets 2 * n_tokens / E pairs."""
    t = np.arange(n_tokens)
    ids = np.stack([t % N_EXPERTS, (t + 1) % N_EXPERTS], axis=1).astype(np.int32)  # [T, 2]
    weights = np.random.default_rng(n_tokens).uniform(0.1, 1.0, ids.shape)
    return ids, (weights / weights.sum(1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("qtype", [type_param(t) for t in ALL_TYPES])
def test_moe_prefill_takes_the_float_path(qtype: QType) -> None:
    """37 tokens, 18-19 pairs per expert: every matrix on the GEMM path, activations float32
    throughout, so even integer types meet the float bound."""
    experts = Experts(qtype, qtype, qtype, seed=20 + int(qtype))
    x = np.random.default_rng(21).standard_normal((37, N_EMBD)).astype(np.float32)  # [37, H]
    ids, weights = _balanced_routing(37)
    assert_close(experts.run(x, ids, weights), experts.reference(x, ids, weights), 1e-4)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "types",
    [
        pytest.param((QType.Q5_0, QType.Q8_0, QType.F32), id="Q5_0-Q8_0-F32"),
        pytest.param((QType.Q4_K, QType.Q4_K, QType.Q6_K), id="Q4_K-Q4_K-Q6_K",
                     marks=[] if kernels.type_supported(int(QType.Q4_K))
                     and kernels.type_supported(int(QType.Q6_K))
                     else [pytest.mark.skip(reason="no native K-quant kernels yet")]),
    ],
)
def test_moe_prefill_mixes_gemm_and_vec_dot_experts(
    types: tuple[QType, QType, QType], threads: int
) -> None:
    """Expert 0 takes every token (GEMM path); the others share the second slot, 6-7 pairs
    each: vec_dot for the integer types, GEMM for F32 (threshold 4), so gate and up of one
    expert can take different paths. Results equal across thread counts."""
    experts = Experts(*types, seed=22)
    n_tokens = 20
    x = np.random.default_rng(23).standard_normal((n_tokens, N_EMBD)).astype(np.float32)
    t = np.arange(n_tokens)
    ids = np.stack([np.zeros(n_tokens), 1 + t % 3], axis=1).astype(np.int32)  # [T, 2]
    weights = np.full(ids.shape, 0.5, np.float32)
    with kernel_settings(threads=threads):
        y = experts.run(x, ids, weights, "gelu_tanh")
    assert_close(y, experts.reference(x, ids, weights, "gelu_tanh"), experts.tolerance)
    with kernel_settings(threads=3 - threads):
        np.testing.assert_array_equal(y, experts.run(x, ids, weights, "gelu_tanh"))


# --- negative ids: skipped slots (expert parallel) --------------------------------------------


def _skip_some(ids: np.ndarray, seed: int) -> np.ndarray:
    """ids [T, K] with about a third of the slots set to -1 (the first token's first slot
    always), and with several tokens the last one skipping every slot."""
    rng = np.random.default_rng(seed)
    skipped = np.where(rng.uniform(size=ids.shape) < 0.35, -1, ids).astype(np.int32)
    skipped[0, 0] = -1
    if len(ids) > 1:
        skipped[-1] = -1
    return skipped


@pytest.mark.parametrize("n_tokens", [1, 5, 37])
@pytest.mark.parametrize("qtype", [type_param(t) for t in (QType.F32, QType.Q8_0, QType.Q4_K)])
def test_moe_negative_ids_skip_their_slot(qtype: QType, n_tokens: int) -> None:
    """A negative id adds nothing: the float64 reference leaves those slots out (37 tokens:
    the GEMM path for the busy experts)."""
    experts = Experts(qtype, qtype, qtype, seed=30 + int(qtype))
    if n_tokens == 37:
        x = np.random.default_rng(31).standard_normal((37, N_EMBD)).astype(np.float32)
        ids, weights = _balanced_routing(37)
    else:
        x, ids, weights = _inputs(n_tokens, seed=32)
    ids = _skip_some(ids, seed=n_tokens)
    y = experts.run(x, ids, weights)
    assert_close(y, experts.reference(x, ids, weights), experts.tolerance)
    if n_tokens > 1:
        np.testing.assert_array_equal(y[-1], 0.0)  # the last token skips every slot


def test_moe_every_slot_skipped_gives_zeros() -> None:
    experts = Experts(QType.Q8_0, QType.Q8_0, QType.Q8_0, seed=33)
    x, ids, weights = _inputs(4, seed=34)
    y = experts.run(x, np.full_like(ids, -1), weights)
    np.testing.assert_array_equal(y, np.zeros_like(x))


@pytest.mark.parametrize("n_tokens", [1, 6])
def test_moe_expert_parallel_halves_sum_to_the_whole(n_tokens: int) -> None:
    """Two workers holding experts [0, 2) and [2, 4) (their own byte ranges of the stack),
    each passing local ids and -1 for the other's: the two partial sums add up to the whole
    block, as the float64 reference computes it."""
    experts = Experts(QType.F32, QType.F32, QType.F32, seed=35)
    x, ids, weights = _inputs(n_tokens, seed=36)
    half = N_EXPERTS // 2
    partials = []
    for e0, e1 in ((0, half), (half, N_EXPERTS)):
        local = np.where((ids >= e0) & (ids < e1), ids - e0, -1).astype(np.int32)  # [T, K]
        gate = experts.gate_raw.reshape(N_EXPERTS, -1)[e0:e1]  # [E/2, F*H*4 bytes]
        up = experts.up_raw.reshape(N_EXPERTS, -1)[e0:e1]
        down = experts.down_raw.reshape(N_EXPERTS, -1)[e0:e1]
        partials.append(kernels.moe(
            x, local, weights, gate=(int(QType.F32), gate), up=(int(QType.F32), up),
            down=(int(QType.F32), down), n_experts=e1 - e0, n_ff=N_FF, activation="silu"))
    assert_close(partials[0] + partials[1], experts.reference(x, ids, weights), 1e-4)


def test_numpy_backend_negative_ids_skip_their_slot() -> None:
    """The numpy reference backend follows the same rule (float64, gguf-py weights)."""
    from worker.backends.numpy_ref import NumpyRefBackend  # noqa: PLC0415

    experts = Experts(QType.F32, QType.F32, QType.F32, seed=37)
    x, ids, weights = _inputs(5, seed=38)
    ids = _skip_some(ids, seed=39)
    y = NumpyRefBackend(np.float64).moe(x.astype(np.float64), ids, weights, experts.gate,
                                        experts.up, experts.down, "silu")
    assert_close(y, experts.reference(x, ids, weights), 1e-12)
    np.testing.assert_array_equal(y[-1], 0.0)
