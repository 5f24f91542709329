"""numoe's plan and predicted speed for DeepSeek-V3 Q4_K_M on KTransformers' published machine.

    python bench/plan_ktransformers.py [--topology FILE] [--ctx 8192] [--depth 12]
    python bench/plan_ktransformers.py --calibrate GGUF:TOK_S:READ_GBS [--calibrate ...]

KTransformers' DeepSeek-V3/R1 tutorial (kvcache-ai/ktransformers, doc/en/DeepseekR1_V3_tutorial.md)
reports, on 2 x Xeon Gold 6454S (32 cores each), 1 TB DDR5-4800 (8 channels per socket) and one
RTX 4090, DeepseekV3-q4km:
  * KTransformers V0.2.1, 8 experts, prompt "hi" (2 tokens), 10 tokens out: decode 13.4 tok/s;
  * llama.cpp, 2 x 32 cores, 8 experts, 500-token prompt (V0.2 table): decode 4.51 tok/s.
The plan is made from the built-in DeepSeek-V3 description (no file is read) on
deploy/topologies/ktransformers-2x6454s-4090.json; its speed model is cluster/predict.py with the
default Calibration (constants measured or fitted on the 2-core development machine).
"weights only" zeroes the fixed per-layer, per-expert, launch and all-reduce costs, leaving the
time to stream the weights: the bound no engine beats on this hardware.

--calibrate fits the fixed costs instead: for each single-process numoe measurement GGUF:TOK_S
(decode tok/s) at READ_GBS (the read probe of the same machine), it prints the seconds per token
left after streaming the weights, and what that makes per layer and per routed expert.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.catalog import describe  # noqa: E402 - repo root on the path first
from cluster.placement import (  # noqa: E402
    ModelSpec,
    Plan,
    PlanOptions,
    format_plan_table,
    make_plan,
)
from cluster.predict import Calibration  # noqa: E402
from cluster.topology import Topology, load_topology  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TOPOLOGY = REPO / "deploy" / "topologies" / "ktransformers-2x6454s-4090.json"
SOURCE = "kvcache-ai/ktransformers doc/en/DeepseekR1_V3_tutorial.md"
KTRANSFORMERS_TOK_S = 13.4  # V0.2.1, 8 experts, prompt "hi", decode
LLAMACPP_TOK_S = 4.51  # V0.2 table, llama.cpp 2 x 32 cores, 8 experts, decode
MODEL = "deepseek-v3:Q4_K_M"
WEIGHTS_ONLY = Calibration(layer_overhead_s=0.0, expert_overhead_s=0.0, allreduce_latency_s=0.0,
                           gpu_layer_overhead_s=0.0, stage_handoff_s=0.0)


def compare(topology: Topology, ctx: int, depth: int) -> str:
    described = describe(MODEL)
    spec = ModelSpec(described.config, described.tensors)
    base = PlanOptions(ctx=ctx, decode_depth=depth)
    hybrid = make_plan(spec, topology, base)
    bound = make_plan(spec, topology, replace(base, calibration=WEIGHTS_ONLY))
    cpu_only = make_plan(spec, topology, replace(base, gpu="off"))
    rows = [
        ("numoe plan, CPU + GPU (predicted)", hybrid.predicted_decode_tok_s),
        ("numoe plan, CPU + GPU, weights only (bound)", bound.predicted_decode_tok_s),
        ("numoe plan, CPU only, 2-socket TP (predicted)", cpu_only.predicted_decode_tok_s),
        (f"KTransformers V0.2.1 (measured, {SOURCE})", KTRANSFORMERS_TOK_S),
        ("llama.cpp 2 x 32 cores (measured, same source)", LLAMACPP_TOK_S),
    ]
    lines = [f"`python bench/plan_ktransformers.py --ctx {ctx} --depth {depth}`", "",
             f"{MODEL}: {described.total_bytes / 1e9:.2f} GB of weights; topology: "
             f"{topology.description or 'given file'}", "", format_plan_table(hybrid), "",
             "| decode | tok/s | vs KTransformers 13.4 | vs llama.cpp 4.51 |",
             "|---|---|---|---|"]
    for label, tok_s in rows:
        lines.append(f"| {label} | {tok_s:.2f} | {tok_s / KTRANSFORMERS_TOK_S:.2f}x | "
                     f"{tok_s / LLAMACPP_TOK_S:.2f}x |")
    lines.append(f"\nprompt (compute bound): CPU + GPU {hybrid.predicted_prompt_tok_s:.1f} "
                 f"tok/s, CPU only {cpu_only.predicted_prompt_tok_s:.1f} tok/s "
                 f"(KTransformers V0.2.1 8 experts: 80-88 tok/s; llama.cpp: 10.31 tok/s)")
    return "\n".join(lines)


def calibrate(measurements: list[str]) -> str:
    from cluster.gguf import open_gguf  # noqa: PLC0415
    from cluster.model import load_model_spec  # noqa: PLC0415

    lines = ["| model | layers | measured ms/token | weights ms/token | left ms/token | "
             "per layer us | per expert us (after the per-layer default) |",
             "|---|---|---|---|---|---|---|"]
    default = Calibration()
    for text in measurements:
        path, tok_s, gbs = text.rsplit(":", 2)
        with open_gguf(path) as gguf:
            config, tensors = load_model_spec(gguf)
        node = {"id": 0, "cpus": "0-1", "memory": "1TiB", "read_bandwidth_gbs": float(gbs)}
        one_node = Topology.from_dict({"hosts": [{"name": "here", "numa_nodes": [node]}]})
        plan: Plan = make_plan(ModelSpec(config, tensors), one_node,
                               PlanOptions(ctx=512, gpu="off", calibration=WEIGHTS_ONLY))
        weights_s = 1.0 / plan.predicted_decode_tok_s
        left_s = 1.0 / float(tok_s) - weights_s
        experts = config.n_layers * config.n_experts_used
        per_expert = ((left_s - config.n_layers * default.layer_overhead_s) / experts * 1e6
                      if experts else float("nan"))
        lines.append(f"| {Path(path).name} | {config.n_layers} | {1000 / float(tok_s):.2f} | "
                     f"{1000 * weights_s:.2f} | {1000 * left_s:.2f} | "
                     f"{left_s / config.n_layers * 1e6:.0f} | {per_expert:.0f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--topology", type=Path, default=DEFAULT_TOPOLOGY)
    parser.add_argument("--ctx", type=int, default=8192, help="KV cache tokens (V0.2.1: 8K)")
    parser.add_argument("--depth", type=int, default=12,
                        help="tokens in the cache when decoding (the 'hi' run: 2 + 10)")
    parser.add_argument("--calibrate", action="append", default=[],
                        metavar="GGUF:TOK_S:READ_GBS")
    args = parser.parse_args()
    if args.calibrate:
        print(calibrate(args.calibrate))
    else:
        print(compare(load_topology(args.topology), args.ctx, args.depth))
    return 0


if __name__ == "__main__":
    sys.exit(main())
