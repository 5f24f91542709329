"""Prompt-path (matrix-matrix) kernel speed: GFLOP/s of numoe_matmul for [n_out x n_in] weights
times T tokens, per type and thread count, next to the old integer path measured in the same
process.

The new path (from 4-12 tokens by type, native/src/gemm.h) dequantizes row tiles to float32
and runs a register-blocked float GEMM. The old path was the integer vec_dot (float vec_dot
for F32/F16/BF16) per (row, token), the same kernel the one-token decode path runs, so
calling numoe_matmul token by token measures it (the matrices fit in L3, so re-reading them
per token costs what the old loop's re-reads from cache cost). FLOPs are 2 * n_out * n_in * T.
The figures are medians; the machine may be shared.

Usage: python bench/kernel_gemm.py [--tokens 64] [--threads 1 2] [--repeats 7]
            [--types Q4_K Q5_0 Q6_K Q8_0 F32] [--shapes 2048x2048 640x2048 2048x640] [--no-old]
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
from gguf import GGMLQuantizationType
from kernel_bandwidth import random_rows  # same folder: run as a script

from native import kernels


def median_seconds(run: Callable[..., object], args: tuple, repeats: int) -> float:
    run(*args)  # warm-up: page faults, caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def old_path(ggml_type: int, weight: np.ndarray, n_out: int, n_in: int, x: np.ndarray) -> None:
    """The vec_dot per (row, token): numoe_matmul one token at a time (decode path)."""
    for row in x:  # [n_in]
        kernels.matmul(ggml_type, weight, n_out, n_in, row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--types", nargs="+", default=["Q4_K", "Q5_0", "Q6_K", "Q8_0", "F32"])
    parser.add_argument("--shapes", nargs="+", default=["2048x2048", "640x2048", "2048x640"],
                        help="n_out x n_in")
    parser.add_argument("--no-old", action="store_true", help="skip the old integer path")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    rows = []
    for shape in args.shapes:
        n_out, n_in = (int(v) for v in shape.split("x"))
        x = rng.standard_normal((args.tokens, n_in)).astype(np.float32)  # [T, n_in]
        flops = 2.0 * n_out * n_in * args.tokens
        for name in args.types:
            ggml_type = GGMLQuantizationType[name]
            if not kernels.type_supported(int(ggml_type)):
                print(f"skipping {name}: no native kernel yet", file=sys.stderr)
                continue
            if n_in % kernels.block_size(int(ggml_type)):
                print(f"skipping {name} {shape}: n_in not a multiple of the block",
                      file=sys.stderr)
                continue
            weight = random_rows(ggml_type, n_out, n_in, rng).reshape(-1)
            for n_threads in args.threads:
                kernels.set_threads(n_threads)
                call = (int(ggml_type), weight, n_out, n_in, x)
                new_s = median_seconds(kernels.matmul, call, args.repeats)
                old_s = (float("nan") if args.no_old
                         else median_seconds(old_path, call, args.repeats))
                rows.append((shape, name, n_threads, flops / new_s / 1e9, flops / old_s / 1e9))

    print(f"`{shlex.join([sys.executable.rsplit('/', 1)[-1], *sys.argv])}` "
          f"(ISA {kernels.get_isa()}, {args.tokens} tokens)\n")
    print("| n_out x n_in | type | threads | GEMM GFLOP/s | old GFLOP/s | speed-up |")
    print("|---|---|---|---|---|---|")
    for shape, name, n_threads, new, old in rows:
        print(f"| {shape} | {name} | {n_threads} | {new:.1f} | {old:.1f} | {new / old:.1f}x |")


if __name__ == "__main__":
    main()
