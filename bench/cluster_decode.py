"""Decode speed through the cluster against the single process, and the plan's prediction.

    python bench/cluster_decode.py [MODEL.gguf] [--workers 2] [--tg 32] [--pp 0] [--repeats 5]

Default MODEL: the MoE benchmark model (bench/make_moe_model.py). Runs, one after the other:

1. the single-process engine with W threads (W = --workers, one thread per CPU);
2. the cluster: W NUMA-pinned Ray workers, one thread each, on W "virtual" NUMA nodes (this
   machine has one memory node, so they share its bandwidth), all-reducing over ZeroMQ;
3. the plan's predicted decode tok/s for that cluster, with each virtual node's read bandwidth
   set to its share of the bandwidth all W CPUs read together (measured here first, native
   read_probe over 1 GiB with W threads).

Prints the ratio cluster / single process (the cluster's overhead: on one memory node there is
no NUMA gain to win) and measured / predicted. Decode as llama-bench's tg: TG single-token
steps from an empty cache; medians of REPEATS after a warm-up (bench/runner_timing.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.roofline import measure_read_bandwidth_gbs  # noqa: E402 — repo root on the path first
from bench.runner_timing import RunnerTimer, Speed  # noqa: E402
from cluster.coordinator import ClusterRunner  # noqa: E402
from cluster.engine import Engine  # noqa: E402
from cluster.placement import ModelSpec, Plan, PlanOptions, make_plan  # noqa: E402
from cluster.ray_cluster import start_local_ray  # noqa: E402
from cluster.topology import Topology, discover_local, virtual_numa  # noqa: E402
from worker.worker import WorkerOptions  # noqa: E402

SEED = 1234
DEFAULT_MODEL = Path.home() / ".cache/numoe/bench-models/qwen3moe-bench-Q4_K_M.gguf"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cluster_topology(n_workers: int, total_read_gbs: float) -> Topology:
    """W virtual nodes, each credited with its share of the bandwidth they read together."""
    topology = virtual_numa(discover_local(), n_workers)
    host = topology.hosts[0]
    nodes = tuple(dataclasses.replace(node, read_bandwidth_gbs=total_read_gbs / n_workers)
                  for node in host.nodes)
    return dataclasses.replace(topology, hosts=(dataclasses.replace(host, nodes=nodes),))


def measure(args: argparse.Namespace) -> tuple[Speed, Speed, list[float], Plan, float,
                                             list[dict]]:
    """Both runners stay up; their tg runs alternate (single, cluster, single, ...) so drift in
    this shared machine's load hits both alike. Returns both speeds, the per-pair ratios, the
    plan, the bandwidth and the workers' counters."""
    model: Path = args.model
    n_ctx = max(args.tg, args.pp, 16)
    log(f"read bandwidth, {args.workers} threads ...")
    total_read_gbs = measure_read_bandwidth_gbs(args.workers)
    log(f"  {total_read_gbs:.1f} GB/s")

    log(f"single process: {model.name}, {args.workers} threads")
    engine = Engine(model, backend="cpu", n_threads=args.workers, n_ctx=n_ctx)
    tokenizer = engine.tokenizer
    bos_id = tokenizer.bos_id if tokenizer.add_bos else None
    vocab_size = engine.config.vocab_size
    spec = ModelSpec(engine.config, _tensors(model))
    topology = cluster_topology(args.workers, total_read_gbs)
    plan = make_plan(spec, topology, PlanOptions(ctx=n_ctx, gpu="off", strategy=args.strategy))
    log(f"cluster: {args.workers} pinned workers x 1 thread")
    session = start_local_ray(topology)
    single, clustered, ratios = Speed(args.tg), Speed(args.tg), []
    try:
        runner = ClusterRunner(model, plan, n_ctx, topology=topology,
                               options=WorkerOptions(n_threads=1))
        try:
            timers = {"single": RunnerTimer(engine.runner.forward, vocab_size, bos_id, SEED),
                      "cluster": RunnerTimer(runner.forward, vocab_size, bos_id, SEED)}
            for timer in timers.values():
                timer.decode_seconds(2)  # warm-up
            for repeat in range(args.repeats):
                pair = {}
                for label, timer in timers.items():
                    pair[label] = args.tg / timer.decode_seconds(args.tg)
                    log(f"  {label}: generation run {repeat + 1}/{args.repeats}: "
                        f"{pair[label]:.2f} tok/s")
                single.samples_tok_s.append(pair["single"])
                clustered.samples_tok_s.append(pair["cluster"])
                ratios.append(pair["cluster"] / pair["single"])
            stats = runner.worker_stats()
        finally:
            runner.close()
    finally:
        session.close()
        engine.close()
    return single, clustered, ratios, plan, total_read_gbs, stats


def _tensors(model: Path) -> dict:
    from cluster.gguf import open_gguf  # noqa: PLC0415
    from cluster.model import load_model_spec  # noqa: PLC0415

    with open_gguf(model) as file:
        return load_model_spec(file)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, nargs="?", default=DEFAULT_MODEL)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tg", type=int, default=32)
    parser.add_argument("--pp", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--strategy", default="tensor_parallel",
                        choices=("tensor_parallel", "expert_parallel"))
    args = parser.parse_args()
    if not args.model.exists():
        raise SystemExit(f"{args.model} not found; make it with python bench/make_moe_model.py")
    single, clustered, ratios, plan, total_read_gbs, stats = measure(args)

    predicted = plan.predicted_decode_tok_s
    print(f"`python {shlex.join(sys.argv)}`\n")
    print(f"Model {args.model.name}, {args.workers} threads, {plan.strategy}; read bandwidth "
          f"of {args.workers} threads {total_read_gbs:.1f} GB/s (each virtual node credited "
          f"{total_read_gbs / args.workers:.1f}); medians of {args.repeats} repeats of "
          f"tg{args.tg}.\n")
    print(f"Runs alternate single/cluster; the ratio is the median of the {args.repeats} "
          f"per-pair ratios.\n")
    print("| run | tg tok/s | ratio to single process | measured / plan prediction |")
    print("|---|---|---|---|")
    print(f"| single process, {args.workers} threads | {single.median_tok_s:.2f} | 1.00 | |")
    print(f"| cluster, {args.workers} pinned workers x 1 thread | {clustered.median_tok_s:.2f} "
          f"| {statistics.median(ratios):.2f} "
          f"| {clustered.median_tok_s / predicted:.2f} |")
    print(f"| plan prediction for the cluster | {predicted:.2f} | | |")
    print("\nWorker counters over the whole run (warm-ups and timed runs):\n")
    print("| rank | steps | step s | kernel s | all-reduce s | all-reduce calls |")
    print("|---|---|---|---|---|---|")
    for worker in stats:
        forward = worker["forward"]
        print(f"| {worker['rank']} | {worker['steps']} | {worker['step_seconds']:.2f} | "
              f"{forward['kernel_seconds']:.2f} | {forward['all_reduce_seconds']:.3f} | "
              f"{forward['all_reduce_calls']} |")


if __name__ == "__main__":
    main()
