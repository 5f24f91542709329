"""KV-cache bytes per token: DeepSeek's latent cache (MLA) against Qwen3-MoE's per-head cache.

    python bench/kv_cache_per_token.py [--deepseek FILE] [--qwen FILE] [--workers 2] [--ctx 4096]

For the two benchmark models (bench/make_deepseek_model.py and bench/make_moe_model.py, both
hidden 2048) and the built-in full-size descriptions (DeepSeek-V3, Kimi-K2 against
Qwen3-235B-A22B, Qwen3-Coder-480B), prints per token of context, summed over the layers:

* the plan's KV bytes per token (f16 cache, as llama.cpp's default), per worker of a W-way
  tensor-parallel plan on W virtual NUMA nodes; MLA keeps the whole latent cache on every
  worker (replicated), GQA splits its kv heads;
* measured (benchmark models only): the bytes a numoe runner's cache really allocates for
  --ctx tokens, divided by --ctx, from a single-process ModelRunner (weights stay mmapped);
* per layer, and the latent path each MLA worker computes redundantly (attn_kv_a_mqa and
  attn_q_a bytes per token, from the plan) against its whole per-token read.

Prints a markdown table for bench/RESULTS.md on stdout.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cluster.catalog import describe  # noqa: E402 — repo root on the path first
from cluster.gguf import open_gguf  # noqa: E402
from cluster.model import ModelConfig, load_model_spec  # noqa: E402
from cluster.placement import ModelSpec, Plan, PlanOptions, make_plan  # noqa: E402
from cluster.topology import GIB, Host, NumaNode, Topology, virtual_numa  # noqa: E402
from worker.backends.cpu import CpuBackend  # noqa: E402
from worker.model_runner import ModelRunner  # noqa: E402

BENCH_MODELS = Path.home() / ".cache" / "numoe" / "bench-models"
FULL_SIZE = ("deepseek-v3:Q4_K_M", "kimi-k2:Q4_K_M", "qwen3-235b-a22b:Q4_K_M",
             "qwen3-coder-480b:Q4_K_M")
_LATENT = ("attn_kv_a_mqa.weight", "attn_q_a.weight")


def topology(workers: int) -> Topology:
    """One host of `workers` virtual nodes, each with room for any of the models."""
    node = NumaNode(0, tuple(range(2 * workers)), 1024 * GIB)
    return virtual_numa(Topology(hosts=(Host("box", (node,)),)), workers)


def plan_of(spec: ModelSpec, workers: int, ctx: int) -> Plan:
    return make_plan(spec, topology(workers), PlanOptions(ctx=ctx, gpu="off"))


def latent_share(plan: Plan, config: ModelConfig) -> str:
    """Bytes of the replicated latent path one worker reads per token, and their share of
    all it reads per token."""
    if not config.is_mla:
        return "-"
    worker = plan.workers[0]
    held = {tensor.name: shard for tensor, shard in plan.shards_of(worker.rank)}
    latent = sum(shard.n_bytes for name, shard in held.items() if name.endswith(_LATENT))
    return (f"{latent / 1e6:.1f} MB of {worker.decode_bytes_per_token / 1e6:.1f} MB "
            f"({100 * latent / worker.decode_bytes_per_token:.1f}%)")


def measured_per_token(path: Path, ctx: int) -> int:
    """KV-cache bytes per context token a single-process runner allocates (float16 cache)."""
    with open_gguf(path) as gguf:
        config, tensors = load_model_spec(gguf)
        runner = ModelRunner(config, tensors, gguf, CpuBackend(n_threads=1), ctx,
                             kv_cache_dtype="float16")
        return runner.cache.n_bytes // ctx


def row(name: str, config: ModelConfig, plan: Plan, measured: int | None) -> str:
    per_worker = [w.kv_bytes_per_token for w in plan.workers]
    attention = (f"MLA {config.n_heads} heads, latent {config.kv_lora_rank}+"
                 f"{config.qk_rope_head_dim}" if config.is_mla
                 else f"GQA {config.n_heads}/{config.n_kv_heads} heads of {config.head_dim}")
    single = config.n_layers * config.kv_cache_width * 2
    return (f"| {name} | {config.n_embd} | {config.n_layers} | {attention} | "
            f"{config.kv_cache_width * 2} | {single} | "
            f"{'-' if measured is None else measured} | "
            f"{' / '.join(map(str, per_worker))} | {latent_share(plan, config)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deepseek", type=Path,
                        default=BENCH_MODELS / "deepseek2-bench-Q4_K_M.gguf")
    parser.add_argument("--qwen", type=Path, default=BENCH_MODELS / "qwen3moe-bench-Q4_K_M.gguf")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--ctx", type=int, default=4096)
    args = parser.parse_args()

    print(f"`python bench/kv_cache_per_token.py {shlex.join(sys.argv[1:])}`\n")
    print(f"f16 KV cache; per worker: a {args.workers}-way tensor-parallel plan.\n")
    print("| model | hidden | layers | attention | B/token/layer | plan B/token | measured "
          "B/token | per worker B/token | replicated latent path read per token (worker 0) |")
    print("|---|---|---|---|---|---|---|---|---|")
    singles = {}
    for label, path in (("DeepSeek-shaped bench", args.deepseek),
                        ("Qwen3-MoE bench", args.qwen)):
        with open_gguf(path) as gguf:
            config, tensors = load_model_spec(gguf)
        plan = plan_of(ModelSpec(config, tensors), args.workers, args.ctx)
        singles[label] = config.n_layers * config.kv_cache_width * 2 / config.n_layers
        print(row(f"{label} ({path.name})", config, plan, measured_per_token(path, args.ctx)))
    for name in FULL_SIZE:
        model = describe(name)
        plan = plan_of(ModelSpec(model.config, model.tensors), args.workers, args.ctx)
        print(row(name, model.config, plan, None))
    deepseek, qwen = singles["DeepSeek-shaped bench"], singles["Qwen3-MoE bench"]
    print(f"\nPer layer at the same hidden size (2048): DeepSeek-shaped {deepseek:.0f} B/token "
          f"against Qwen3-MoE {qwen:.0f} B/token: {deepseek / qwen:.2f}x.")


if __name__ == "__main__":
    main()
