"""Native layer ops (native/ops.py: RMSNorm, RoPE, attention over a float32 or float16 KV
cache) against float64 numpy written out here, and SIMD against the scalar reference.

Error bounds, with u = 2^-24 (float32 unit roundoff):
  * rms_norm: the float32 sum of n squares is off by at most n*u relatively, which the square
    root halves: |out - ref| <= (n/2 + 8) u |x w / rms| + 2u |out|.
  * rope: two products and a sum per element from float32 inputs (the cos/sin table is an input
    here): |out - ref| <= 4u (|x0 cos| + |x1 sin|).
  * attention: a score q.k of d terms is off by at most d u sum_i |q_i k_i| (times scale); each
    softmax weight then by e^(2 e_s) - 1 ~ 2 e_s relatively plus rounding of the S-term sums:
    |out - ref| <= (2 e_s + (2S + 16) u) sum_j p_j |v_j|, e_s the largest score error.
  * SIMD vs scalar: both within the float64 bound, so their difference within twice of it.
A float16 cache stores k and v rounded to float16 (round to nearest even, as numpy does); the
reference uses those rounded values.
"""

from __future__ import annotations

import numpy as np
import pytest

from native import ops
from tests.kernels.blocks import isa_param, kernel_settings

U = 2.0**-24
ALL_ISAS = [isa_param("scalar"), isa_param("avx2"), isa_param("avx512")]


# --- references (float64) ---------------------------------------------------------------


def rms_norm_reference(x: np.ndarray, weight: np.ndarray, eps: float,
                       residual: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(reference [..., n], bound [..., n])."""
    x64, w64 = x.astype(np.float64), weight.astype(np.float64)
    rms = np.sqrt(np.mean(x64 * x64, axis=-1, keepdims=True) + eps)
    normed = x64 / rms * w64
    out = normed if residual is None else residual.astype(np.float64) + normed
    n = x.shape[-1]
    return out, (n / 2 + 8) * U * np.abs(normed) + 2 * U * np.abs(out)


def rope_reference(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, neox: bool
                   ) -> tuple[np.ndarray, np.ndarray]:
    """x [T, H, d], cos/sin [T, d/2] -> (reference, bound), both [T, H, d]."""
    half = x.shape[-1] // 2
    x64 = x.astype(np.float64)
    if neox:
        pair_first, pair_second = np.arange(half), np.arange(half) + half
    else:
        pair_first, pair_second = np.arange(half) * 2, np.arange(half) * 2 + 1
    c, s = cos.astype(np.float64)[:, None, :], sin.astype(np.float64)[:, None, :]  # [T, 1, d/2]
    x0, x1 = x64[..., pair_first], x64[..., pair_second]
    out, bound = np.empty_like(x64), np.empty_like(x64)
    out[..., pair_first] = x0 * c - x1 * s
    out[..., pair_second] = x1 * c + x0 * s
    bound[..., pair_first] = 4 * U * (np.abs(x0 * c) + np.abs(x1 * s))
    bound[..., pair_second] = 4 * U * (np.abs(x1 * c) + np.abs(x0 * s))
    return out, bound


def attention_reference(q: np.ndarray, keys: np.ndarray, values: np.ndarray, start: int,
                        scale: float, window: int) -> tuple[np.ndarray, np.ndarray]:
    """q [T, nh, d]; keys [nkv, P, d] and values [nkv, P, dv] for positions [0, P = start + T),
    as the cache holds them -> (reference, bound), both [T, nh * dv]."""
    n_tokens, n_heads, head_dim = q.shape
    n_kv, _, value_dim = values.shape
    out = np.zeros((n_tokens, n_heads, value_dim))
    bound = np.zeros_like(out)
    for t in range(n_tokens):
        pos = start + t
        visible = np.arange(pos + 1)
        if window > 0:
            visible = visible[pos - visible < window]
        for h in range(n_heads):
            kv = h // (n_heads // n_kv)
            products = q[t, h].astype(np.float64) * keys[kv, visible].astype(np.float64)
            scores = scale * products.sum(axis=-1)  # [S]
            p = np.exp(scores - scores.max())
            p /= p.sum()
            v = values[kv, visible].astype(np.float64)  # [S, dv]
            out[t, h] = p @ v
            score_error = scale * head_dim * U * np.abs(products).sum(axis=-1).max()
            bound[t, h] = (2 * score_error + (2 * len(visible) + 16) * U) * (p @ np.abs(v))
    return out.reshape(n_tokens, -1), bound.reshape(n_tokens, -1)


def assert_within(actual: np.ndarray, reference: np.ndarray, bound: np.ndarray) -> None:
    excess = np.abs(actual.astype(np.float64) - reference) - bound
    assert excess.max() <= 0, f"bound exceeded by {excess.max()} (max bound {bound.max()})"


# --- rms_norm ---------------------------------------------------------------------------


@pytest.mark.parametrize("isa", ALL_ISAS)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("n", [640, 36])  # 36: SIMD tail
def test_rms_norm_matches_float64(isa: str, with_residual: bool, n: int) -> None:
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((5, n)) * 3).astype(np.float32)  # [5, n]
    weight = rng.uniform(0.5, 2.0, n).astype(np.float32)  # [n]
    residual = rng.standard_normal((5, n)).astype(np.float32) if with_residual else None
    with kernel_settings(isa=isa):
        out = ops.rms_norm(x, weight, 1e-6, residual)
    reference, bound = rms_norm_reference(x, weight, 1e-6, residual)
    assert out.shape == x.shape and out.dtype == np.float32
    assert_within(out, reference, bound)


def test_rms_norm_in_place_on_x_and_on_residual() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 4, 64)).astype(np.float32)  # [T, heads, d]: rows of d
    weight = rng.uniform(0.5, 2.0, 64).astype(np.float32)
    residual = rng.standard_normal((3, 4, 64)).astype(np.float32)
    expected_plain = ops.rms_norm(x, weight, 1e-6)
    expected_sum = ops.rms_norm(x, weight, 1e-6, residual)
    x_copy, residual_copy = x.copy(), residual.copy()
    assert ops.rms_norm(x_copy, weight, 1e-6, out=x_copy) is x_copy
    ops.rms_norm(x, weight, 1e-6, residual_copy, out=residual_copy)
    np.testing.assert_array_equal(x_copy, expected_plain)
    np.testing.assert_array_equal(residual_copy, expected_sum)


@pytest.mark.parametrize("isa", [isa_param("avx2"), isa_param("avx512")])
def test_rms_norm_simd_matches_scalar(isa: str) -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 1000)).astype(np.float32)
    weight = rng.uniform(0.5, 2.0, 1000).astype(np.float32)
    residual = rng.standard_normal((4, 1000)).astype(np.float32)
    with kernel_settings(isa="scalar"):
        scalar = ops.rms_norm(x, weight, 1e-6, residual)
    with kernel_settings(isa=isa):
        simd = ops.rms_norm(x, weight, 1e-6, residual)
    _, bound = rms_norm_reference(x, weight, 1e-6, residual)
    assert_within(simd, scalar.astype(np.float64), 2 * bound)


def test_rms_norm_rejects_wrong_dtype_and_size() -> None:
    weight = np.ones(8, np.float32)
    with pytest.raises(ValueError, match="float32"):
        ops.rms_norm(np.ones((2, 8)), weight, 1e-6)  # float64
    with pytest.raises(ValueError, match="weight"):
        ops.rms_norm(np.ones((2, 8), np.float32), np.ones(4, np.float32), 1e-6)


# --- rope -------------------------------------------------------------------------------


def rope_tables(positions: np.ndarray, head_dim: int, base: float) -> tuple[np.ndarray, ...]:
    """float32 cos, sin [T, d/2] of position * base^(-2i/d)."""
    inv_freq = base ** (-np.arange(head_dim // 2) * 2.0 / head_dim)
    angles = positions[:, None] * inv_freq  # [T, d/2]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


@pytest.mark.parametrize("isa", ALL_ISAS)
@pytest.mark.parametrize("neox", [True, False], ids=["neox", "normal"])
def test_rope_matches_float64(isa: str, neox: bool) -> None:
    rng = np.random.default_rng(4)
    head_dim = 72  # half = 36: one 8-wide SIMD pass short of a multiple, so the tail runs
    q = rng.standard_normal((3, 4, head_dim)).astype(np.float32)  # [T, nh, d]
    k = rng.standard_normal((3, 2, head_dim)).astype(np.float32)  # [T, nkv, d]
    cos, sin = rope_tables(np.array([0.0, 7.0, 3000.0]), head_dim, 10_000.0)
    q_out, k_out = q.copy(), k.copy()
    with kernel_settings(isa=isa):
        ops.rope(q_out, k_out, cos, sin, neox)
    for before, after in ((q, q_out), (k, k_out)):
        reference, bound = rope_reference(before, cos, sin, neox)
        assert_within(after, reference, bound)


@pytest.mark.parametrize("isa", [isa_param("avx2"), isa_param("avx512")])
def test_rope_simd_matches_scalar(isa: str) -> None:
    rng = np.random.default_rng(5)
    q = rng.standard_normal((2, 8, 256)).astype(np.float32)
    k = rng.standard_normal((2, 1, 256)).astype(np.float32)
    cos, sin = rope_tables(np.array([5.0, 900.0]), 256, 1e6)
    results = []
    for chosen in ("scalar", isa):
        q_out, k_out = q.copy(), k.copy()
        with kernel_settings(isa=chosen):
            ops.rope(q_out, k_out, cos, sin, True)
        results.append((q_out, k_out))
    for before, scalar, simd in zip((q, k), results[0], results[1], strict=True):
        _, bound = rope_reference(before, cos, sin, True)
        assert_within(simd, scalar.astype(np.float64), 2 * bound)


# --- attention --------------------------------------------------------------------------

N_CTX = 80


def run_attention(cache_dtype: type, n_tokens: int, start: int, window: int, *,
                  n_heads: int = 4, n_kv: int = 2, head_dim: int = 72, value_dim: int = 36,
                  seed: int = 6) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                          np.ndarray, np.ndarray]:
    """Fills positions [0, start) of a cache with random rows, then runs the op for T new
    tokens. Returns (out, reference, bound, k_cache, v_cache, the rows stored)."""
    rng = np.random.default_rng(seed)
    k_cache = np.zeros((n_kv, N_CTX, head_dim), cache_dtype)  # [nkv, C, d]
    v_cache = np.zeros((n_kv, N_CTX, value_dim), cache_dtype)  # [nkv, C, dv]
    k_cache[:, :start] = rng.standard_normal((n_kv, start, head_dim))
    v_cache[:, :start] = rng.standard_normal((n_kv, start, value_dim))
    q = rng.standard_normal((n_tokens, n_heads, head_dim)).astype(np.float32)
    k_new = rng.standard_normal((n_tokens, n_kv, head_dim)).astype(np.float32)
    v_new = rng.standard_normal((n_tokens, n_kv, value_dim)).astype(np.float32)
    scale = head_dim**-0.5
    out = ops.attention(q, k_new, v_new, k_cache, v_cache, start, scale, window)
    # What the cache must hold: the new rows rounded to its dtype.
    keys = k_cache[:, : start + n_tokens].copy()
    values = v_cache[:, : start + n_tokens].copy()
    stored_k = k_new.transpose(1, 0, 2).astype(cache_dtype)  # [nkv, T, d]
    stored_v = v_new.transpose(1, 0, 2).astype(cache_dtype)
    keys[:, start:], values[:, start:] = stored_k, stored_v
    reference, bound = attention_reference(q, keys, values, start, scale, window)
    return out, reference, bound, k_cache, v_cache, np.concatenate(
        [keys.reshape(-1), values.reshape(-1)])


@pytest.mark.parametrize("isa", ALL_ISAS)
@pytest.mark.parametrize("cache_dtype", [np.float32, np.float16], ids=["f32", "f16"])
@pytest.mark.parametrize(("n_tokens", "start", "window"), [
    (1, 0, 0),     # first token: sees only itself
    (1, 20, 0),    # decode, global
    (1, 20, 6),    # decode, the window hides positions 0..14
    (5, 9, 0),     # a few tokens: causal mask between them
    (5, 9, 4),     # a few tokens with a window shorter than the batch
    (33, 40, 16),  # enough work for the threads
])
def test_attention_matches_float64(isa: str, cache_dtype: type, n_tokens: int, start: int,
                                   window: int) -> None:
    with kernel_settings(isa=isa):
        out, reference, bound, k_cache, v_cache, stored = run_attention(
            cache_dtype, n_tokens, start, window)
    assert out.shape == (n_tokens, 4 * 36) and out.dtype == np.float32
    assert_within(out, reference, bound)
    end = start + n_tokens
    np.testing.assert_array_equal(
        np.concatenate([k_cache[:, :end].reshape(-1), v_cache[:, :end].reshape(-1)]), stored)
    assert not k_cache[:, end:].any() and not v_cache[:, end:].any()  # nothing past the end


@pytest.mark.parametrize("isa", [isa_param("avx2"), isa_param("avx512")])
@pytest.mark.parametrize("cache_dtype", [np.float32, np.float16], ids=["f32", "f16"])
def test_attention_simd_matches_scalar(isa: str, cache_dtype: type) -> None:
    with kernel_settings(isa="scalar"):
        scalar, _, bound, *_ = run_attention(cache_dtype, 7, 30, 12, head_dim=256,
                                             value_dim=256, n_heads=8, n_kv=1)
    with kernel_settings(isa=isa):
        simd, *_ = run_attention(cache_dtype, 7, 30, 12, head_dim=256, value_dim=256,
                                 n_heads=8, n_kv=1)
    assert_within(simd, scalar.astype(np.float64), 2 * bound)


def test_attention_thread_count_does_not_change_results() -> None:
    results = []
    for threads in (1, 2):
        with kernel_settings(threads=threads):
            results.append(run_attention(np.float32, 33, 40, 0)[0])
    np.testing.assert_array_equal(results[0], results[1])


def test_attention_rejects_positions_past_the_cache() -> None:
    q = np.zeros((2, 4, 8), np.float32)
    kv = np.zeros((2, 2, 8), np.float32)
    cache = np.zeros((2, 10, 8), np.float32)
    with pytest.raises(ValueError, match="positions"):
        ops.attention(q, kv, kv, cache, cache.copy(), 9, 1.0)
    with pytest.raises(ValueError, match="float32 or float16"):
        ops.attention(q, kv, kv, cache.astype(np.float64), cache.astype(np.float64), 0, 1.0)
