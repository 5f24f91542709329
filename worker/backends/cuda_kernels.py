"""CUDA C++ source of the GPU kernels (GGUF dequantization, decode matrix-vector product), and a
host build of the same source so that their arithmetic is tested without a GPU.

Work is cut into *chunks* of 8 weights of one row, the same for every type: a chunk is two runs
of 4 consecutive elements, [a, a+4) and [b, b+4), whose codes sit in 4 neighbouring bytes of the
block, so the 32 lanes of a warp read one K-quant super-block (or 8 Q8_0 blocks) as contiguous
bytes. `chunk_values<TYPE>` decodes one chunk; it is the only per-type code, and both kernels use
it, so the bit-exact dequantization test (against gguf-py) also checks every weight the
matrix-vector product sees.

Dequantization rounds exactly as gguf-py and our C reference do (native/src/kquants_ref.c,
kernels_ref.c): float32 products in the same order, never fused into an FMA (__fmul_rn /
__fsub_rn on the GPU, -ffp-contract=off on the host). Block layouts are those of
native/src/internal.h:
    Q8_0 [d f16 | qs i8 x32]                      Q4_0 [d | qs 16 B: elem j low nibble, j+16 high]
    Q5_0 [d | qh u32: bit j = 5th bit of elem j | qs 16 B as Q4_0]
    Q4_K [d | dmin | scales 12 B (6-bit sc, m x8) | qs 128 B: 32 B per pair of sub-blocks]
    Q5_K [d | dmin | scales 12 B | qh 32 B: bit j of qh[l] = 5th bit of sub-block j | qs 128 B]
    Q6_K [ql 128 B | qh 64 B | scales i8 x16 | d]: elem 128h+32r+l: nibble r/2 of
         ql[64h + 32(r%2) + l], bits 2r..2r+1 of qh[32h + l]

Kernels (one pair per type, NAME in KERNEL_NAMES; integers are long long, pass np.int64):
    dequantize_NAME(w, row_bytes, row_ids, use_row_ids, out, n_in, n_rows)
        out[r, :] = row (use_row_ids ? row_ids[r] : r) of w, float32 [n_rows, n_in];
        one thread per chunk, grid-stride loop.
    matvec_NAME(w, row_bytes, expert_bytes, expert_ids, use_expert_ids, x, x_div, y, n_out, n_in)
        y[p, o] = sum_i W_e[o, i] * x[p / x_div, i] for pair p = blockIdx.y, with
        W_e = w + e * expert_bytes, e = use_expert_ids ? expert_ids[p] : 0; y[p] = 0 if e < 0;
        one warp per output row (blockDim.x = 32 * warps), lanes stride over the row's chunks.
"""

from __future__ import annotations

import ctypes
import functools
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from cluster.errors import NumoeError

# ggml type id -> kernel name suffix.
KERNEL_NAMES: dict[int, str] = {
    0: "f32", 1: "f16", 2: "q4_0", 6: "q5_0", 8: "q8_0", 12: "q4_k", 13: "q5_k", 14: "q6_k",
    30: "bf16",
}
CHUNK = 8  # weights per chunk; a row has ceil(n_in / 8) chunks
WARP = 32

SOURCE = r"""
typedef unsigned char u8;
typedef signed char i8;
typedef unsigned int u32;
typedef long long i64;

/* ---- portability: NVRTC compiles this for the GPU, g++ for the host tests ------------------ */
#ifdef __CUDACC__
#define NUMOE_FN __device__ __forceinline__
NUMOE_FN float bits_to_float(u32 bits) { return __uint_as_float(bits); }
NUMOE_FN float mul_rn(float a, float b) { return __fmul_rn(a, b); }  /* never fused into FMA */
NUMOE_FN float sub_rn(float a, float b) { return __fsub_rn(a, b); }
#else
#include <string.h>
#define NUMOE_FN inline
NUMOE_FN float bits_to_float(u32 bits) { float f; memcpy(&f, &bits, sizeof f); return f; }
NUMOE_FN float mul_rn(float a, float b) { return a * b; }  /* built with -ffp-contract=off */
NUMOE_FN float sub_rn(float a, float b) { return a - b; }
#endif

enum { F32 = 0, F16 = 1, Q4_0 = 2, Q5_0 = 6, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14,
       BF16 = 30 };

/* (elements, bytes) of one block; the float types use 8-element pseudo-blocks (one chunk). */
template <int T> struct Layout;
template <> struct Layout<F32> { static constexpr int elems = 8, bytes = 32; };
template <> struct Layout<F16> { static constexpr int elems = 8, bytes = 16; };
template <> struct Layout<BF16> { static constexpr int elems = 8, bytes = 16; };
template <> struct Layout<Q8_0> { static constexpr int elems = 32, bytes = 34; };
template <> struct Layout<Q4_0> { static constexpr int elems = 32, bytes = 18; };
template <> struct Layout<Q5_0> { static constexpr int elems = 32, bytes = 22; };
template <> struct Layout<Q4_K> { static constexpr int elems = 256, bytes = 144; };
template <> struct Layout<Q5_K> { static constexpr int elems = 256, bytes = 176; };
template <> struct Layout<Q6_K> { static constexpr int elems = 256, bytes = 210; };

/* 8 weights of a row: v[0..3] are elements a..a+3, v[4..7] are elements b..b+3. */
struct Chunk { float v[8]; i64 a; i64 b; };

/* Unaligned little-endian loads: Q8_0, Q4_0, Q5_0 and Q6_K blocks are only 2-byte aligned. */
NUMOE_FN u32 load_u16(const u8 *p) { return (u32)p[0] | ((u32)p[1] << 8); }
NUMOE_FN u32 load_u32(const u8 *p) { return load_u16(p) | (load_u16(p + 2) << 16); }

/* IEEE binary16 -> float32, exact for every input (NaN payloads kept, as numpy does). */
NUMOE_FN float half_to_float(u32 h) {
    const u32 sign = (h & 0x8000u) << 16;
    const u32 exponent = (h >> 10) & 0x1Fu;
    const u32 mantissa = h & 0x3FFu;
    if (exponent == 0) {  /* zero or subnormal: mantissa * 2^-24, exact in float32 */
        const float magnitude = mul_rn((float)mantissa, bits_to_float(0x33800000u));
        return sign ? -magnitude : magnitude;
    }
    if (exponent == 31) return bits_to_float(sign | 0x7F800000u | (mantissa << 13));
    return bits_to_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

NUMOE_FN float bf16_to_float(u32 h) { return bits_to_float(h << 16); }

/* 6-bit scale and min of sub-block j (0..7) of a Q4_K/Q5_K super-block (ggml get_scale_min_k4):
 * bytes 0-3 hold sc[0..3] and the top bits of sc[4..7], bytes 4-7 likewise for the mins,
 * bytes 8-11 the low 4 bits of sc[4..7] (low nibble) and m[4..7] (high nibble). */
NUMOE_FN void scale_min_k4(int j, const u8 *packed, int &sc, int &m) {
    if (j < 4) {
        sc = packed[j] & 63;
        m = packed[j + 4] & 63;
    } else {
        sc = (packed[j + 4] & 0xF) | ((packed[j - 4] >> 6) << 4);
        m = (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4);
    }
}

/* ---- one chunk per type: cc is the chunk within its block, base the block's first element -- */

template <int T>
NUMOE_FN void chunk_float(const u8 *row, i64 c, i64 n, Chunk &out) {
    out.a = c * 8;
    out.b = out.a + 4;
    for (int i = 0; i < 8; i++) {
        const i64 e = out.a + i;
        float value = 0.0f;
        if (e < n) {  /* float rows need not be a multiple of 8 long */
            if (T == F32) value = bits_to_float(load_u32(row + 4 * e));
            else if (T == F16) value = half_to_float(load_u16(row + 2 * e));
            else value = bf16_to_float(load_u16(row + 2 * e));
        }
        out.v[i] = value;
    }
}

NUMOE_FN void chunk_q8_0(const u8 *block, int cc, i64 base, Chunk &out) {
    const float d = half_to_float(load_u16(block));
    const i8 *qs = (const i8 *)(block + 2) + 8 * cc;
    for (int i = 0; i < 8; i++) out.v[i] = mul_rn((float)qs[i], d);
    out.a = base + 8 * cc;
    out.b = out.a + 4;
}

NUMOE_FN void chunk_q4_0(const u8 *block, int cc, i64 base, Chunk &out) {
    const float d = half_to_float(load_u16(block));
    const u8 *qs = block + 2 + 4 * cc;  /* bytes j = 4cc..4cc+3: elements j and j + 16 */
    for (int i = 0; i < 4; i++) {
        out.v[i] = mul_rn((float)((qs[i] & 0xF) - 8), d);
        out.v[4 + i] = mul_rn((float)((qs[i] >> 4) - 8), d);
    }
    out.a = base + 4 * cc;
    out.b = out.a + 16;
}

NUMOE_FN void chunk_q5_0(const u8 *block, int cc, i64 base, Chunk &out) {
    const float d = half_to_float(load_u16(block));
    const u32 qh = load_u32(block + 2);
    const u8 *qs = block + 6;
    for (int i = 0; i < 4; i++) {
        const int j = 4 * cc + i;
        const int lo = (qs[j] & 0xF) | (int)((qh >> j) & 1) << 4;
        const int hi = (qs[j] >> 4) | (int)((qh >> (j + 16)) & 1) << 4;
        out.v[i] = mul_rn((float)(lo - 16), d);
        out.v[4 + i] = mul_rn((float)(hi - 16), d);
    }
    out.a = base + 4 * cc;
    out.b = out.a + 16;
}

/* Q4_K / Q5_K: chunk cc takes qs bytes [32g + l0, 32g + l0 + 4), g = cc / 8, l0 = 4 (cc % 8):
 * their low nibbles are elements 64g + l0 + i (sub-block 2g), high nibbles 64g + 32 + l0 + i
 * (sub-block 2g + 1). w = d*sc*q - dmin*m, as ggml: (d*sc) * q - (dmin*m). */
template <bool FIVE_BITS>
NUMOE_FN void chunk_k4(const u8 *block, int cc, i64 base, Chunk &out) {
    const float d = half_to_float(load_u16(block));
    const float dmin = half_to_float(load_u16(block + 2));
    const u8 *scales = block + 4;
    const u8 *qh = block + 16;  /* Q5_K only */
    const u8 *qs = block + (FIVE_BITS ? 48 : 16);
    const int g = cc >> 3, l0 = (cc & 7) * 4;
    int sc, m;
    scale_min_k4(2 * g, scales, sc, m);
    const float d_lo = mul_rn(d, (float)sc), m_lo = mul_rn(dmin, (float)m);
    scale_min_k4(2 * g + 1, scales, sc, m);
    const float d_hi = mul_rn(d, (float)sc), m_hi = mul_rn(dmin, (float)m);
    for (int i = 0; i < 4; i++) {
        const int l = l0 + i;
        int q_lo = qs[32 * g + l] & 0xF, q_hi = qs[32 * g + l] >> 4;
        if (FIVE_BITS) {
            q_lo |= ((qh[l] >> (2 * g)) & 1) << 4;
            q_hi |= ((qh[l] >> (2 * g + 1)) & 1) << 4;
        }
        out.v[i] = sub_rn(mul_rn(d_lo, (float)q_lo), m_lo);
        out.v[4 + i] = sub_rn(mul_rn(d_hi, (float)q_hi), m_hi);
    }
    out.a = base + 64 * g + l0;
    out.b = out.a + 32;
}

/* Q6_K: chunk cc is half h = cc / 16, run r0 = (cc / 8) % 2, l0 = 4 (cc % 8): ql bytes
 * [64h + 32 r0 + l0, +4) give elements 128h + 32 r0 + l0 + i (low nibbles, run r0) and
 * 128h + 32 (r0 + 2) + l0 + i (high nibbles, run r0 + 2). w = (d * sc) * (q - 32), as ggml. */
NUMOE_FN void chunk_q6_k(const u8 *block, int cc, i64 base, Chunk &out) {
    const u8 *ql = block, *qh = block + 128;
    const i8 *scales = (const i8 *)(block + 192);
    const float d = half_to_float(load_u16(block + 208));
    const int h = cc >> 4, r0 = (cc >> 3) & 1, l0 = (cc & 7) * 4;
    const int first = 128 * h + 32 * r0 + l0;  /* element of v[0]; v[4] is first + 64 */
    const float d_a = mul_rn(d, (float)scales[first / 16]);
    const float d_b = mul_rn(d, (float)scales[first / 16 + 4]);
    for (int i = 0; i < 4; i++) {
        const int low = ql[64 * h + 32 * r0 + l0 + i], high = qh[32 * h + l0 + i];
        const int q_a = (low & 0xF) | (((high >> (2 * r0)) & 3) << 4);
        const int q_b = (low >> 4) | (((high >> (2 * r0 + 4)) & 3) << 4);
        out.v[i] = mul_rn(d_a, (float)(q_a - 32));
        out.v[4 + i] = mul_rn(d_b, (float)(q_b - 32));
    }
    out.a = base + first;
    out.b = out.a + 64;
}

/* Chunk c (0 .. ceil(n/8) - 1) of a row of n weights of type T. */
template <int T>
NUMOE_FN void chunk_values(const u8 *row, i64 c, i64 n, Chunk &out) {
    if constexpr (T == F32 || T == F16 || T == BF16) {
        chunk_float<T>(row, c, n, out);
    } else {
        constexpr int per_block = Layout<T>::elems / 8;
        const i64 block = c / per_block;
        const int cc = (int)(c % per_block);
        const u8 *b = row + block * Layout<T>::bytes;
        const i64 base = block * Layout<T>::elems;
        if constexpr (T == Q8_0) chunk_q8_0(b, cc, base, out);
        else if constexpr (T == Q4_0) chunk_q4_0(b, cc, base, out);
        else if constexpr (T == Q5_0) chunk_q5_0(b, cc, base, out);
        else if constexpr (T == Q4_K) chunk_k4<false>(b, cc, base, out);
        else if constexpr (T == Q5_K) chunk_k4<true>(b, cc, base, out);
        else chunk_q6_k(b, cc, base, out);
    }
}

/* What one thread of dequantize_* does for flat chunk index idx (row-major over chunks). */
template <int T>
NUMOE_FN void dequant_chunk(const u8 *w, i64 row_bytes, const int *row_ids, i64 use_row_ids,
                            float *out, i64 n, i64 idx) {
    const i64 chunks = (n + 7) / 8;
    const i64 r = idx / chunks, c = idx % chunks;
    const i64 src = use_row_ids ? (i64)row_ids[r] : r;
    Chunk ch;
    chunk_values<T>(w + src * row_bytes, c, n, ch);
    float *o = out + r * n;
    for (int i = 0; i < 4; i++) {
        if (ch.a + i < n) o[ch.a + i] = ch.v[i];
        if (ch.b + i < n) o[ch.b + i] = ch.v[4 + i];
    }
}

/* One lane's share of a row's dot product: chunks lane, lane + 32, ... */
template <int T>
NUMOE_FN float matvec_lane(const u8 *w_row, const float *x, i64 n, int lane) {
    const i64 chunks = (n + 7) / 8;
    float sum = 0.0f;
    for (i64 c = lane; c < chunks; c += 32) {
        Chunk ch;
        chunk_values<T>(w_row, c, n, ch);
        for (int i = 0; i < 4; i++) {
            if (ch.a + i < n) sum += ch.v[i] * x[ch.a + i];
            if (ch.b + i < n) sum += ch.v[4 + i] * x[ch.b + i];
        }
    }
    return sum;
}

#define NUMOE_FOR_EACH_TYPE(X) \
    X(f32, F32) X(f16, F16) X(bf16, BF16) X(q8_0, Q8_0) X(q4_0, Q4_0) X(q5_0, Q5_0) \
    X(q4_k, Q4_K) X(q5_k, Q5_K) X(q6_k, Q6_K)

#ifdef __CUDACC__
/* ---- GPU kernels ---------------------------------------------------------------------------- */
template <int T>
__device__ void dequantize_rows(const u8 *w, i64 row_bytes, const int *row_ids, i64 use_row_ids,
                                float *out, i64 n, i64 n_rows) {
    const i64 total = n_rows * ((n + 7) / 8);
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += stride)
        dequant_chunk<T>(w, row_bytes, row_ids, use_row_ids, out, n, idx);
}

template <int T>
__device__ void matvec_rows(const u8 *w, i64 row_bytes, i64 expert_bytes, const int *expert_ids,
                            i64 use_expert_ids, const float *x, i64 x_div, float *y, i64 n_out,
                            i64 n_in) {
    const int lane = threadIdx.x & 31;
    const i64 row = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const i64 pair = blockIdx.y;
    if (row >= n_out) return;  /* the whole warp leaves together: the shuffles stay full */
    const i64 expert = use_expert_ids ? (i64)expert_ids[pair] : 0;
    if (expert < 0) {  /* a skipped (token, slot): its expert is held by another worker */
        if (lane == 0) y[pair * n_out + row] = 0.0f;
        return;
    }
    const u8 *w_row = w + expert * expert_bytes + row * row_bytes;
    float sum = matvec_lane<T>(w_row, x + (pair / x_div) * n_in, n_in, lane);
    for (int offset = 16; offset > 0; offset >>= 1)
        sum += __shfl_xor_sync(0xFFFFFFFFu, sum, offset);
    if (lane == 0) y[pair * n_out + row] = sum;
}

#define NUMOE_KERNELS(NAME, T)                                                                  \
    extern "C" __global__ void dequantize_##NAME(const u8 *w, i64 row_bytes, const int *row_ids, \
                                                 i64 use_row_ids, float *out, i64 n,            \
                                                 i64 n_rows) {                                  \
        dequantize_rows<T>(w, row_bytes, row_ids, use_row_ids, out, n, n_rows);                 \
    }                                                                                           \
    extern "C" __global__ void matvec_##NAME(const u8 *w, i64 row_bytes, i64 expert_bytes,      \
                                             const int *expert_ids, i64 use_expert_ids,         \
                                             const float *x, i64 x_div, float *y, i64 n_out,    \
                                             i64 n_in) {                                        \
        matvec_rows<T>(w, row_bytes, expert_bytes, expert_ids, use_expert_ids, x, x_div, y,     \
                       n_out, n_in);                                                            \
    }
NUMOE_FOR_EACH_TYPE(NUMOE_KERNELS)

#else
/* ---- host build: the same per-thread / per-lane code in plain loops ------------------------- */
template <int T>
static void host_dequantize_t(const u8 *w, i64 row_bytes, const int *row_ids, i64 use_row_ids,
                              float *out, i64 n, i64 n_rows) {
    const i64 total = n_rows * ((n + 7) / 8);
    for (i64 idx = 0; idx < total; idx++)
        dequant_chunk<T>(w, row_bytes, row_ids, use_row_ids, out, n, idx);
}

template <int T>
static void host_matvec_t(const u8 *w, i64 row_bytes, i64 expert_bytes, const int *expert_ids,
                          i64 use_expert_ids, const float *x, i64 x_div, float *y, i64 n_out,
                          i64 n_in, i64 n_pairs) {
    for (i64 pair = 0; pair < n_pairs; pair++) {
        const i64 expert = use_expert_ids ? (i64)expert_ids[pair] : 0;
        for (i64 row = 0; row < n_out; row++) {
            const u8 *w_row = w + expert * expert_bytes + row * row_bytes;
            float sum = 0.0f;
            if (expert < 0) {
                y[pair * n_out + row] = 0.0f;
                continue;
            }
            for (int lane = 0; lane < 32; lane++)
                sum += matvec_lane<T>(w_row, x + (pair / x_div) * n_in, n_in, lane);
            y[pair * n_out + row] = sum;
        }
    }
}

#define NUMOE_HOST_CASE_DEQUANT(NAME, T) \
    case T: host_dequantize_t<T>(w, row_bytes, row_ids, use_row_ids, out, n, n_rows); return 0;
#define NUMOE_HOST_CASE_MATVEC(NAME, T)                                                        \
    case T: host_matvec_t<T>(w, row_bytes, expert_bytes, expert_ids, use_expert_ids, x, x_div, \
                             y, n_out, n_in, n_pairs); return 0;

extern "C" int numoe_host_dequantize(int type, const u8 *w, i64 row_bytes, const int *row_ids,
                                     i64 use_row_ids, float *out, i64 n, i64 n_rows) {
    switch (type) { NUMOE_FOR_EACH_TYPE(NUMOE_HOST_CASE_DEQUANT) }
    return -1;
}

extern "C" int numoe_host_matvec(int type, const u8 *w, i64 row_bytes, i64 expert_bytes,
                                 const int *expert_ids, i64 use_expert_ids, const float *x,
                                 i64 x_div, float *y, i64 n_out, i64 n_in, i64 n_pairs) {
    switch (type) { NUMOE_FOR_EACH_TYPE(NUMOE_HOST_CASE_MATVEC) }
    return -1;
}
#endif
"""


class HostKernels:
    """The kernels' device code built for the CPU (g++), behind the same launcher interface as
    the GPU's CudaKernels (worker/backends/cupy_gpu.py), with numpy arrays. It runs the per-thread
    and per-lane code of every kernel in plain loops, so tests check the chunk layouts, the
    rounding and the whole CupyBackend on machines without a GPU; the GPU-only parts (grid
    mapping, warp shuffles) are checked on a GPU."""

    xp = np

    def __init__(self) -> None:
        self._lib = _host_library()

    def upload(self, array: np.ndarray) -> np.ndarray:
        return np.asarray(array)

    def download(self, array: np.ndarray) -> np.ndarray:
        return np.asarray(array)

    def dequantize(self, ggml_type: int, data: np.ndarray, row_bytes: int, n_in: int,
                   n_rows: int, row_ids: np.ndarray | None = None) -> np.ndarray:
        """Rows of a weight (all n_rows, or row_ids [n_rows]) as float32 [n_rows, n_in]."""
        out = np.empty((n_rows, n_in), np.float32)
        ids = _int32(row_ids)
        status = self._lib.numoe_host_dequantize(
            ggml_type, _pointer(data), row_bytes, _pointer(ids), row_ids is not None,
            _pointer(out), n_in, n_rows)
        _check_type(status, ggml_type)
        return out

    def matvec(self, ggml_type: int, data: np.ndarray, row_bytes: int, expert_bytes: int,
               expert_ids: np.ndarray | None, x: np.ndarray, x_div: int, n_out: int, n_in: int,
               n_pairs: int) -> np.ndarray:
        """y [n_pairs, n_out]: pair p is row p // x_div of x [*, n_in] times expert
        expert_ids[p] (or the only matrix) of w."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        y = np.empty((n_pairs, n_out), np.float32)
        ids = _int32(expert_ids)
        status = self._lib.numoe_host_matvec(
            ggml_type, _pointer(data), row_bytes, expert_bytes, _pointer(ids),
            expert_ids is not None, _pointer(x), x_div, _pointer(y), n_out, n_in, n_pairs)
        _check_type(status, ggml_type)
        return y


def _int32(ids: np.ndarray | None) -> np.ndarray:
    if ids is None:
        return np.zeros(1, np.int32)
    return np.ascontiguousarray(ids, dtype=np.int32)


def _pointer(array: np.ndarray) -> ctypes.c_void_p:
    if not array.flags.c_contiguous:
        raise ValueError("host kernels take C-contiguous arrays")
    return ctypes.c_void_p(array.ctypes.data)


def _check_type(status: int, ggml_type: int) -> None:
    if status != 0:
        raise ValueError(f"no kernel for ggml type {ggml_type}; kernels: {sorted(KERNEL_NAMES)}")


@functools.cache
def _host_library() -> ctypes.CDLL:
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise NumoeError("HostKernels build the CUDA kernels' device code with a C++ compiler, "
                         "and none was found: install g++")
    directory = Path(tempfile.mkdtemp(prefix="numoe-host-kernels-"))
    try:
        source = directory / "kernels.cpp"
        library = directory / "kernels.so"
        source.write_text(SOURCE)
        subprocess.run(
            [compiler, "-O2", "-std=c++17", "-ffp-contract=off", "-fPIC", "-shared",
             "-o", str(library), str(source)],
            check=True, capture_output=True, text=True)
        lib = ctypes.CDLL(str(library))
    finally:
        shutil.rmtree(directory, ignore_errors=True)  # the loaded library stays mapped
    i64, ptr = ctypes.c_longlong, ctypes.c_void_p
    lib.numoe_host_dequantize.argtypes = [ctypes.c_int, ptr, i64, ptr, i64, ptr, i64, i64]
    lib.numoe_host_dequantize.restype = ctypes.c_int
    lib.numoe_host_matvec.argtypes = [ctypes.c_int, ptr, i64, i64, ptr, i64, ptr, i64, ptr, i64,
                                      i64, i64]
    lib.numoe_host_matvec.restype = ctypes.c_int
    return lib
