"""Decode matvec bandwidth against read bandwidth, measured in one process.

For each weight type, a >= 512 MiB weight matrix (random valid blocks) is multiplied by one
token's activations repeatedly; the figure is weight bytes streamed per second (median of
the repeats), next to numoe_read_probe's rate on the same buffer with the same threads, the
two measured alternately so that background load on a shared machine hits both alike.
The matrix is far larger than any cache, so every call reads it from memory, as decode does.

Usage: python bench/kernel_bandwidth.py [--mib 512] [--repeats 15] [--threads 1 2]
                                         [--types Q4_K Q6_K Q8_0 BF16]
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import quantize

from native import kernels

N_IN = 4096
TILE_ROWS = 256  # rows generated per distinct tile; the big matrix repeats this tile


def random_rows(ggml_type: GGMLQuantizationType, n_rows: int, n_in: int,
                rng: np.random.Generator) -> np.ndarray:
    """uint8 [n_rows, row_bytes] of valid blocks: gguf-py quantizes where it can; K-quant
    blocks are random bytes with finite, small f16 scales (every bit pattern is valid)."""
    row_bytes = kernels.row_bytes(int(ggml_type), n_in)
    try:
        values = rng.standard_normal((n_rows, n_in)).astype(np.float32)
        return np.ascontiguousarray(quantize(values, ggml_type)).view(np.uint8).reshape(
            n_rows, row_bytes)
    except NotImplementedError:
        pass
    raw = rng.integers(0, 256, (n_rows, row_bytes), dtype=np.uint8)
    blocks = raw.reshape(n_rows, -1, kernels.block_bytes(int(ggml_type)))
    scale = np.full(blocks.shape[:2], 0.01, np.float16).view(np.uint8)
    scale = scale.reshape(*blocks.shape[:2], 2)
    if ggml_type == GGMLQuantizationType.Q6_K:  # d is the last field
        blocks[..., -2:] = scale
    else:  # Q4_K / Q5_K: d and dmin lead the block
        blocks[..., 0:2] = scale
        blocks[..., 2:4] = scale
    return raw


def big_matrix(ggml_type: GGMLQuantizationType, mib: int, rng: np.random.Generator
               ) -> tuple[np.ndarray, int]:
    """uint8 [n_out * row_bytes] of at least `mib` MiB, and n_out."""
    row_bytes = kernels.row_bytes(int(ggml_type), N_IN)
    n_out = -(-mib * 2**20 // row_bytes)
    n_out = -(-n_out // TILE_ROWS) * TILE_ROWS
    tile = random_rows(ggml_type, TILE_ROWS, N_IN, rng)
    return np.tile(tile, (n_out // TILE_ROWS, 1)).reshape(-1), n_out


def median_rates(ggml_type: int, weight: np.ndarray, n_out: int, x: np.ndarray,
                 repeats: int) -> tuple[float, float]:
    """(matvec GB/s, read probe GB/s), medians over `repeats` alternating runs: the machine is
    shared, so both figures should see the same background load."""
    kernels.matmul(ggml_type, weight, n_out, N_IN, x)  # warm-up: page faults, TLB
    kernels.read_probe(weight, 1)
    matvec_s, probe_gbs = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        kernels.matmul(ggml_type, weight, n_out, N_IN, x)
        matvec_s.append(time.perf_counter() - start)
        probe_gbs.append(kernels.read_probe(weight, 1, warm_up=False))
    return weight.nbytes / statistics.median(matvec_s) / 1e9, statistics.median(probe_gbs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=512, help="weight matrix size (MiB)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--types", nargs="+", default=["Q4_K", "Q6_K", "Q8_0", "BF16"])
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    x = rng.standard_normal(N_IN).astype(np.float32)  # [n_in], one decode token
    rows = []
    for name in args.types:
        ggml_type = GGMLQuantizationType[name]
        if not kernels.type_supported(int(ggml_type)):
            print(f"skipping {name}: no native kernel yet", file=sys.stderr)
            continue
        weight, n_out = big_matrix(ggml_type, args.mib, rng)
        for n_threads in args.threads:
            kernels.set_threads(n_threads)
            kernel, probe = median_rates(int(ggml_type), weight, n_out, x, args.repeats)
            rows.append((name, n_threads, weight.nbytes / 2**20, kernel, probe))
        del weight

    print(f"`{shlex.join([sys.executable.rsplit('/', 1)[-1], *sys.argv])}` "
          f"(ISA {kernels.get_isa()}, matvec [n_out, {N_IN}] x [{N_IN}])\n")
    print("| type | threads | weights MiB | matvec GB/s | read probe GB/s | ratio |")
    print("|---|---|---|---|---|---|")
    for name, n_threads, mib, kernel, probe in rows:
        print(f"| {name} | {n_threads} | {mib:.0f} | {kernel:.1f} | {probe:.1f} | "
              f"{kernel / probe:.2f} |")


if __name__ == "__main__":
    main()
