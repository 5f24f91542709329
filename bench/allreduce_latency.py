"""Latency of one decode-size all-reduce between 2 workers on this host, per transport.

Two processes, each pinned to its own CPU, reduce float32 [1, H] partials for H in --hidden,
--warmup times untimed and then --iters times, each call timed alone on rank 0 (time from
entering all_reduce to holding the sum, waiting for the peer included). Prints a markdown
table headed by the command line. Every result is checked against the rank-order sum.

`python bench/allreduce_latency.py [--iters 5000] [--warmup 500] [--hidden 2048 4096 7168]
[--transports ipc tcp shm] [--cpus 0 1]`
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cluster.protocol import ReduceSite  # noqa: E402
from worker.allreduce import ReduceEndpoint  # noqa: E402

WORLD = 2


def make_endpoint(transport: str, rank: int) -> Any:
    if transport == "shm":
        from worker.shm_allreduce import ShmReduceEndpoint  # noqa: PLC0415

        return ShmReduceEndpoint(rank, WORLD, timeout_s=30.0)
    return ReduceEndpoint(rank, WORLD, transport=transport, timeout_s=30.0)


def run_rank(rank: int, cpu: int, args: argparse.Namespace, conn: Any) -> None:
    """One worker: pin, connect every transport, time the reductions, send timings to parent."""
    os.sched_setaffinity(0, {cpu})
    endpoints = {t: make_endpoint(t, rank) for t in args.transports}
    conn.send({t: e.address for t, e in endpoints.items()})
    addresses = conn.recv()  # {transport: [address of rank 0, address of rank 1]}
    timings: dict[tuple[str, int], np.ndarray] = {}
    step = 0
    for transport, endpoint in endpoints.items():
        endpoint.connect(addresses[transport])
        for hidden in args.hidden:
            partials = [np.full((1, hidden), r + 1.5, np.float32) for r in range(WORLD)]
            expected = partials[0] + partials[1]  # [1, H]
            elapsed_ns = np.empty(args.iters, np.int64)
            for i in range(args.warmup + args.iters):
                step += 1
                started = time.perf_counter_ns()
                total = endpoint.all_reduce(partials[rank], ReduceSite(step % 2), 0, step)
                finished = time.perf_counter_ns()
                if i >= args.warmup:
                    elapsed_ns[i - args.warmup] = finished - started
            if not np.array_equal(total, expected):
                raise AssertionError(f"{transport} H={hidden}: wrong sum")
            timings[(transport, hidden)] = elapsed_ns
        endpoint.close()
    conn.send(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=5000)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--hidden", type=int, nargs="+", default=[2048, 4096, 7168])
    parser.add_argument("--transports", nargs="+", default=["ipc", "tcp", "shm"],
                        choices=["ipc", "tcp", "shm"])
    parser.add_argument("--cpus", type=int, nargs=2, default=None,
                        help="CPU of rank 0 and of rank 1 (default: the first two allowed)")
    args = parser.parse_args()
    allowed = sorted(os.sched_getaffinity(0))
    cpus = args.cpus or allowed[:2]
    if len(set(cpus)) < 2:
        raise SystemExit("need two distinct CPUs; pass --cpus A B")

    ctx = mp.get_context("spawn")
    pipes = [ctx.Pipe() for _ in range(WORLD)]
    procs = [ctx.Process(target=run_rank, args=(rank, cpus[rank], args, pipes[rank][1]))
             for rank in range(WORLD)]
    for proc in procs:
        proc.start()
    addresses = [pipes[rank][0].recv() for rank in range(WORLD)]
    by_transport = {t: [addresses[r][t] for r in range(WORLD)] for t in args.transports}
    for parent_end, _ in pipes:
        parent_end.send(by_transport)
    timings = pipes[0][0].recv()
    pipes[1][0].recv()
    for proc in procs:
        proc.join()

    print(f"`python bench/allreduce_latency.py {' '.join(sys.argv[1:])}`".replace(" `", "`"))
    print()
    machine = platform.processor() or platform.machine()
    print(f"2 ranks on CPUs {cpus[0]} and {cpus[1]} ({machine}), T=1, {args.iters} timed calls "
          f"after {args.warmup} warm-up, rank 0's view")
    print()
    print("| transport | H | bytes | median µs | p99 µs |")
    print("|---|---|---|---|---|")
    for (transport, hidden), elapsed_ns in timings.items():
        median, p99 = np.percentile(elapsed_ns / 1000.0, [50, 99])
        print(f"| {transport} | {hidden} | {4 * hidden} | {median:.1f} | {p99:.1f} |")


if __name__ == "__main__":
    main()
