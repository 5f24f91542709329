"""Batch invariance down to the bit: every product path equals the ISA's per-pair vec_dot.

On AVX-512, Q8_0 / Q4_0 / Q5_0 products run in row x token tiles (native/src/qdot_avx512.c:
16 rows per vector, up to 64 tokens per call) and the plain C vec_dot defines what each pair
must give. numoe_vec_dot_rows exposes that definition; here a matrix-vector product, the
batch-invariant rows path at several batch sizes, and the MoE call's decode path must all
match it exactly, on every ISA, for every type (types without a tile exercise the per-pair
fallback the same way). Row counts that are not multiples of 16 cover the part-filled tile.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QType

from native import kernels
from tests.kernels.blocks import ALL_TYPES, isa_param, kernel_settings, random_weight, type_param

N_IN = 256


@pytest.mark.parametrize("n_out", [40, 7])
@pytest.mark.parametrize("qtype", [type_param(t) for t in ALL_TYPES])
@pytest.mark.parametrize("isa", [isa_param(i) for i in ("scalar", "avx2", "avx512")])
def test_every_matmul_path_reproduces_vec_dot(isa: str, qtype: QType, n_out: int) -> None:
    rng = np.random.default_rng(100 + int(qtype) + n_out)
    raw, _ = random_weight(qtype, n_out, N_IN, rng)  # [n_out * row_bytes]
    x = rng.standard_normal((70, N_IN)).astype(np.float32)  # [T, N_IN]
    view = kernels.WeightView(int(qtype), (n_out, N_IN), raw)
    with kernel_settings(isa=isa, threads=2):
        alone = np.stack([kernels.vec_dot_rows(int(qtype), raw, n_out, N_IN, row) for row in x])
        for t in (0, 33):  # a plain call with one token: the matrix-vector path
            assert np.array_equal(kernels.matmul_view(view, x[t]), alone[t])
        for n_tokens in (1, 3, 16, 70):  # 70: more than one 64-token tile call
            rows = kernels.matmul_view(view, x[:n_tokens], rows_alone=True)
            mismatch = np.argwhere(rows != alone[:n_tokens])
            assert mismatch.size == 0, f"{n_tokens} tokens: rows differ at {mismatch[:4]}"


# (gate, up, down): both tiled; gate tiled and up not (the fused per-pair loop), none tiled.
MOE_TYPES = [
    (QType.Q5_0, QType.Q4_0, QType.Q8_0),
    (QType.Q8_0, QType.Q4_K, QType.Q6_K),
    (QType.Q4_K, QType.Q6_K, QType.Q5_K),
]


@pytest.mark.parametrize("types", MOE_TYPES, ids=lambda t: "-".join(q.name for q in t))
@pytest.mark.parametrize("isa", [isa_param(i) for i in ("scalar", "avx2", "avx512")])
def test_moe_rows_equal_each_token_alone(isa: str, types: tuple[QType, QType, QType]) -> None:
    n_experts, n_ff, n_embd, n_used, n_tokens = 6, 256, N_IN, 2, 21
    rng = np.random.default_rng(7)
    gate_type, up_type, down_type = types
    gate, _ = random_weight(gate_type, n_experts * n_ff, n_embd, rng)
    up, _ = random_weight(up_type, n_experts * n_ff, n_embd, rng)
    down, _ = random_weight(down_type, n_experts * n_embd, n_ff, rng)
    views = (kernels.WeightView(int(gate_type), (n_experts, n_ff, n_embd), gate),
             kernels.WeightView(int(up_type), (n_experts, n_ff, n_embd), up),
             kernels.WeightView(int(down_type), (n_experts, n_embd, n_ff), down))
    x = rng.standard_normal((n_tokens, n_embd)).astype(np.float32)  # [T, H]
    ids = np.stack([rng.choice(n_experts, n_used, replace=False)
                    for _ in range(n_tokens)]).astype(np.int32)  # [T, K]
    weights = rng.uniform(0.1, 1.0, (n_tokens, n_used)).astype(np.float32)  # [T, K]
    with kernel_settings(isa=isa, threads=2):
        batch = kernels.moe_views(x, ids, weights, *views, "silu", rows_alone=True)
        for t in range(n_tokens):
            alone = kernels.moe_views(x[t:t + 1], ids[t:t + 1], weights[t:t + 1], *views, "silu")
            assert np.array_equal(batch[t], alone[0]), f"token {t} differs"


def test_vec_dot_rows_refuses_a_wrong_activation_shape() -> None:
    raw, _ = random_weight(QType.Q8_0, 4, N_IN, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"x must be \[256\]"):
        kernels.vec_dot_rows(int(QType.Q8_0), raw, 4, N_IN, np.zeros(N_IN + 32, np.float32))
