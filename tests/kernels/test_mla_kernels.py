"""The two native kernels of DeepSeek's multi-head latent attention (MLA).

ops.attention_latent: multi-query attention with one shared KV head whose key is the cached
latent row [width = kv_lora + rope] and whose value is the row's first kv_lora elements
(llama.cpp's MLA cache). Checked against plain-softmax float64 numpy written out here, with
the bound of test_ops.py (u = 2^-24, float32 unit roundoff): a score of d terms is off by at
most d u scale sum_i |q_i k_i|, so |out - ref| <= (2 e_s + (2S + 16) u) sum_j p_j |v_j|, e_s the
largest score error over the S visible keys. A float16 cache holds the rows rounded to float16
(round to nearest even, as numpy does) and the reference reads those. A second, independent
path: ops.attention with n_kv = 1 and a separate value cache holding the first kv_lora columns.

kernels.matmul_batched: per-head products y[t, b] = W[b] @ x[t, b] over a weight stack. Each
head must equal kernels.matmul_view on that head's bytes bit for bit (same rows_alone), at any
thread count, and lie within test_matmul.py's bound of float64 numpy on gguf-py-dequantized
weights: 1e-5 S plus, for integer types, sum_i |W[o, i]| h_i where h_i = amax/254 is the
rounding of the 8-bit activation blocks (S = sum_i |W[o, i]| |x[t, i]|).
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QType

from native import kernels, ops
from tests.kernels.blocks import (
    ALL_TYPES,
    INTEGER_TYPES,
    act_half_step,
    isa_param,
    kernel_settings,
    random_weight,
    type_param,
)

U = 2.0**-24
ALL_ISAS = [isa_param("scalar"), isa_param("avx2"), isa_param("avx512")]
N_CTX = 48


# --- attention_latent ---------------------------------------------------------------------


def latent_attention_reference(q: np.ndarray, rows: np.ndarray, start: int, scale: float,
                               value_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """q [T, nh, W]; rows [P = start + T, W], the cache as it must hold positions [0, P)
    -> (reference, bound), both [T, nh, value_dim]. Keys are whole rows, values their first
    value_dim elements; causal."""
    n_tokens, n_heads, width = q.shape
    out = np.zeros((n_tokens, n_heads, value_dim))
    bound = np.zeros_like(out)
    for t in range(n_tokens):
        visible = rows[: start + t + 1].astype(np.float64)  # [S, W]
        values = visible[:, :value_dim]  # [S, dv]
        for h in range(n_heads):
            products = q[t, h].astype(np.float64) * visible  # [S, W]
            scores = scale * products.sum(axis=-1)  # [S]
            p = np.exp(scores - scores.max())
            p /= p.sum()
            out[t, h] = p @ values
            score_error = scale * width * U * np.abs(products).sum(axis=-1).max()
            bound[t, h] = (2 * score_error + (2 * len(visible) + 16) * U) * (p @ np.abs(values))
    return out, bound


def assert_within(actual: np.ndarray, reference: np.ndarray, bound: np.ndarray) -> None:
    excess = np.abs(actual.astype(np.float64) - reference) - bound
    assert excess.max() <= 0, f"bound exceeded by {excess.max()} (max bound {bound.max()})"


# (n_heads, width, value_dim): DeepSeek-V2-Lite-like 512 + 64 scaled down, a SIMD tail
# (width 44: not a multiple of 8 or 16), and one head.
SHAPES = [(4, 80, 64), (3, 44, 36), (1, 32, 16)]


@pytest.mark.parametrize("isa", ALL_ISAS)
@pytest.mark.parametrize("cache_dtype", [np.float32, np.float16], ids=["f32", "f16"])
@pytest.mark.parametrize(("n_heads", "width", "value_dim"), SHAPES)
def test_attention_latent_prefill_then_decode_matches_float64(
        isa: str, cache_dtype: type, n_heads: int, width: int, value_dim: int) -> None:
    rng = np.random.default_rng(n_heads * 1000 + width)
    sentinel = 7.0  # rows past the written ones must keep it
    cache = np.full((N_CTX, width), sentinel, cache_dtype)  # [C, W]
    expected_rows = cache.copy()
    scale = 0.3 * width**-0.5  # a softmax neither flat nor one-hot
    # A prompt of 9 tokens at start 0, then three decode steps, then 2 tokens at once.
    steps = [(0, 9), (9, 1), (10, 1), (11, 1), (12, 2)]
    with kernel_settings(isa=isa):
        for start, n_tokens in steps:
            q = rng.standard_normal((n_tokens, n_heads, width)).astype(np.float32)
            latent = rng.standard_normal((n_tokens, width)).astype(np.float32)
            out = ops.attention_latent(q, latent, cache, start, scale, value_dim)
            expected_rows[start:start + n_tokens] = latent.astype(cache_dtype)
            # Rows written equal latent_new rounded to the cache type; none other changed.
            np.testing.assert_array_equal(cache, expected_rows)
            assert out.shape == (n_tokens, n_heads, value_dim) and out.dtype == np.float32
            reference, bound = latent_attention_reference(
                q, expected_rows[:start + n_tokens], start, scale, value_dim)
            assert_within(out, reference, bound)
    assert (cache[14:] == sentinel).all()


def run_both_paths(cache_dtype: type, n_tokens: int, start: int, n_heads: int = 4,
                   width: int = 80, value_dim: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """attention_latent and ops.attention (n_kv = 1, head_dim = width, a value cache holding
    the first value_dim columns) on the same random cache and tokens."""
    rng = np.random.default_rng(11 + n_tokens + start)
    history = rng.standard_normal((start, width))
    latent_cache = np.zeros((N_CTX, width), cache_dtype)  # [C, W]
    latent_cache[:start] = history
    k_cache = latent_cache[None].copy()  # [1, C, W]
    v_cache = np.ascontiguousarray(k_cache[:, :, :value_dim])  # [1, C, dv]
    q = rng.standard_normal((n_tokens, n_heads, width)).astype(np.float32)
    latent = rng.standard_normal((n_tokens, width)).astype(np.float32)
    scale = width**-0.5
    out_latent = ops.attention_latent(q, latent, latent_cache, start, scale, value_dim)
    k_new = latent[:, None, :]  # [T, 1, W]
    v_new = np.ascontiguousarray(latent[:, None, :value_dim])  # [T, 1, dv]
    out_mqa = ops.attention(q, np.ascontiguousarray(k_new), v_new, k_cache, v_cache, start,
                            scale)
    np.testing.assert_array_equal(latent_cache, k_cache[0])
    return out_latent, out_mqa.reshape(n_tokens, n_heads, value_dim)


@pytest.mark.parametrize("isa", ALL_ISAS)
@pytest.mark.parametrize("cache_dtype", [np.float32, np.float16], ids=["f32", "f16"])
@pytest.mark.parametrize(("n_tokens", "start"), [(1, 0), (1, 30), (6, 20), (40, 0)])
def test_attention_latent_equals_mqa_with_a_separate_value_cache(
        isa: str, cache_dtype: type, n_tokens: int, start: int) -> None:
    with kernel_settings(isa=isa, threads=2):
        out_latent, out_mqa = run_both_paths(cache_dtype, n_tokens, start)
    # Same keys, same value elements, same kernels: the strided value rows change nothing.
    np.testing.assert_array_equal(out_latent, out_mqa)


def test_attention_latent_thread_count_does_not_change_results() -> None:
    results = []
    for threads in (1, 2):
        with kernel_settings(threads=threads):
            results.append(run_both_paths(np.float32, 40, 0, n_heads=16)[0])
    np.testing.assert_array_equal(results[0], results[1])


def test_attention_latent_rejects_bad_arguments() -> None:
    q = np.zeros((2, 4, 24), np.float32)
    latent = np.zeros((2, 24), np.float32)
    cache = np.zeros((10, 24), np.float32)
    with pytest.raises(ValueError, match="float32 or float16"):
        ops.attention_latent(q, latent, cache.astype(np.float64), 0, 1.0, 16)
    with pytest.raises(ValueError, match=r"\[n_ctx, width\]"):
        ops.attention_latent(q, latent, cache[None], 0, 1.0, 16)
    with pytest.raises(ValueError, match=r"q must be \[T, n_heads, 24\]"):
        ops.attention_latent(q[:, :, :16], latent, cache, 0, 1.0, 16)
    with pytest.raises(ValueError, match=r"latent_new \[T, 24\]"):
        ops.attention_latent(q, latent[:1], cache, 0, 1.0, 16)
    with pytest.raises(ValueError, match="value_dim must be in"):
        ops.attention_latent(q, latent, cache, 0, 1.0, 25)
    with pytest.raises(ValueError, match="positions"):
        ops.attention_latent(q, latent, cache, 9, 1.0, 16)
    with pytest.raises(ValueError, match="q must be float32"):
        ops.attention_latent(q.astype(np.float64), latent, cache, 0, 1.0, 16)
    with pytest.raises(ValueError, match="out"):
        ops.attention_latent(q, latent, cache, 0, 1.0, 16, out=np.empty((2, 4, 8), np.float32))
    assert not cache.any()  # no refused call wrote the cache


# --- matmul_batched -----------------------------------------------------------------------


# (n_batch, n_out, n_in): six heads, enough work that two threads split the heads (rows not a
# multiple of the 16-row tile); one head, which two threads split by rows.
BATCH_SHAPES = [(6, 88, 512), (1, 40, 256)]


@pytest.mark.parametrize("shape", BATCH_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("qtype", [type_param(t) for t in ALL_TYPES])
@pytest.mark.parametrize("isa", ALL_ISAS)
def test_matmul_batched_equals_each_head_alone(isa: str, qtype: QType,
                                               shape: tuple[int, int, int]) -> None:
    n_batch, n_out, n_in = shape
    rng = np.random.default_rng(int(qtype) * 10 + n_batch)
    raw, weight = random_weight(qtype, n_batch * n_out, n_in, rng)  # weight [B * O, I]
    weight = weight.reshape(n_batch, n_out, n_in)
    stack = kernels.WeightView(int(qtype), (n_batch, n_out, n_in), raw)
    matrix_bytes = n_out * kernels.row_bytes(int(qtype), n_in)
    heads = [kernels.WeightView(int(qtype), (n_out, n_in),
                                raw[b * matrix_bytes:(b + 1) * matrix_bytes])
             for b in range(n_batch)]
    abs_weight = np.abs(weight.astype(np.float64))  # [B, O, I]
    for n_tokens in (1, 3, 17):  # decode, few-token tiles, prompt GEMM (from 12 tokens)
        x = rng.standard_normal((n_tokens, n_batch, n_in)).astype(np.float32)  # [T, B, I]
        reference = np.einsum("boi,tbi->tbo", weight.astype(np.float64), x.astype(np.float64))
        bound = 1e-5 * np.einsum("boi,tbi->tbo", abs_weight, np.abs(x.astype(np.float64)))
        if qtype in INTEGER_TYPES:
            bound += np.einsum("boi,tbi->tbo", abs_weight, act_half_step(x.astype(np.float64)))
        for rows_alone in (False, True):
            with kernel_settings(isa=isa, threads=1):
                alone = np.stack([kernels.matmul_view(heads[b], x[:, b], rows_alone)
                                  for b in range(n_batch)], axis=1)  # [T, B, O]
            for threads in (1, 2):
                with kernel_settings(isa=isa, threads=threads):
                    batched = kernels.matmul_batched(stack, x, rows_alone)
                what = f"T={n_tokens} rows_alone={rows_alone} threads={threads}"
                assert batched.shape == (n_tokens, n_batch, n_out), what
                mismatch = np.argwhere(batched != alone)
                assert mismatch.size == 0, f"{what}: differs at [t, b, o] {mismatch[:4]}"
            excess = np.abs(batched - reference) - bound
            assert excess.max() <= 0, f"T={n_tokens}: bound exceeded by {excess.max()}"


def test_matmul_batched_accepts_one_token_without_the_token_axis() -> None:
    rng = np.random.default_rng(3)
    raw, _ = random_weight(QType.Q8_0, 3 * 32, 64, rng)
    stack = kernels.WeightView(int(QType.Q8_0), (3, 32, 64), raw)
    x = rng.standard_normal((3, 64)).astype(np.float32)  # [B, I]
    y = kernels.matmul_batched(stack, x)
    assert y.shape == (3, 32)
    np.testing.assert_array_equal(y, kernels.matmul_batched(stack, x[None])[0])


def test_matmul_batched_rejects_bad_shapes() -> None:
    raw, _ = random_weight(QType.Q8_0, 3 * 32, 64, np.random.default_rng(4))
    stack = kernels.WeightView(int(QType.Q8_0), (3, 32, 64), raw)
    with pytest.raises(ValueError, match=r"x must be \[T, 3, 64\]"):
        kernels.matmul_batched(stack, np.zeros((2, 3, 32), np.float32))
    with pytest.raises(ValueError, match=r"x must be \[T, 3, 64\]"):
        kernels.matmul_batched(stack, np.zeros((2, 4, 64), np.float32))
    with pytest.raises(ValueError, match=r"x must be \[T, 3, 64\]"):
        kernels.matmul_batched(stack, np.zeros(64, np.float32))
    flat = kernels.WeightView(int(QType.Q8_0), (96, 64), raw)
    with pytest.raises(ValueError, match=r"stack \[n_batch, n_out, n_in\]"):
        kernels.matmul_batched(flat, np.zeros((1, 96, 64), np.float32))
    with pytest.raises(ValueError, match="buffer holds"):
        kernels.WeightView(int(QType.Q8_0), (4, 32, 64), raw)  # one head more than the bytes
