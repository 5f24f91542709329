"""Row x token tiles against the per-pair kernel they reproduce, on the default model's matrices.

For each weight type of Gemma 3 270M Q4_K_M (its Q8_0 LM head, cut to 32768 rows; a Q5_0,
a Q4_K and a Q6_K matrix; Q6_K has no tile, so its two columns time the same loop), T decode
rows go through the batch-invariant product
(`matmul_view(..., rows_alone=True)`: the AVX-512 tiles) and through the per-pair kernel alone
(`vec_dot_rows`, one token at a time: what each pair must equal). Both give the same bits
(checked here too); the figure is nanoseconds per (row, token) pair per 32 weights, the ratio
per-pair / tile. One thread, medians of alternating repeats.

    python bench/kernel_tiles.py [--threads 1] [--repeats 9]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.default_model import default_model_path  # noqa: E402
from cluster.gguf import open_gguf  # noqa: E402
from native import kernels  # noqa: E402

MATRICES = ("token_embd.weight", "blk.0.ffn_gate.weight", "blk.0.attn_output.weight",
            "blk.0.ffn_down.weight")  # Q8_0, Q5_0, Q4_K tiles; Q6_K has none (per-pair loop)
MAX_ROWS = 32768


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    kernels.set_threads(args.threads)
    print(f"ISA {kernels.get_isa()}, {args.threads} thread(s), medians of {args.repeats}")
    print("| matrix | type | rows x cols | tokens | tile ns/pair-block | per-pair ns/pair-block "
          "| per-pair / tile |")
    print("|---|---|---|---:|---:|---:|---:|")
    with open_gguf(str(default_model_path(progress=True))) as gguf:
        for name in MATRICES:
            info = gguf.tensors[name]
            n_out, n_in = min(int(info.shape[0]), MAX_ROWS), int(info.shape[1])
            raw = np.asarray(gguf.tensor_data(name)).reshape(-1).view(np.uint8)
            raw = raw[:n_out * kernels.row_bytes(info.ggml_type, n_in)]
            view = kernels.WeightView(info.ggml_type, (n_out, n_in), raw)
            for n_tokens in (1, 4, 16):
                x = np.random.default_rng(0).standard_normal((n_tokens, n_in)).astype(np.float32)
                tile_s, pair_s = [], []
                for _ in range(args.repeats):
                    started = time.perf_counter()
                    tiled = kernels.matmul_view(view, x, rows_alone=True)
                    tile_s.append(time.perf_counter() - started)
                    started = time.perf_counter()
                    alone = np.stack([kernels.vec_dot_rows(info.ggml_type, raw, n_out, n_in, row)
                                      for row in x])
                    pair_s.append(time.perf_counter() - started)
                    assert np.array_equal(tiled, alone), f"{name}: tile differs from vec_dot"
                pairs_blocks = n_out * n_tokens * n_in / 32
                tile_ns = 1e9 * float(np.median(tile_s)) / pairs_blocks
                pair_ns = 1e9 * float(np.median(pair_s)) / pairs_blocks
                print(f"| {name} | {info.type_name} | {n_out} x {n_in} | "
                      f"{n_tokens} | {tile_ns:.3f} | {pair_ns:.3f} | {pair_ns / tile_ns:.2f}x |",
                      flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
