"""Command-line flags that run `numoe generate` on NUMA worker actors instead of one process.

    numoe generate MODEL -p "..." --workers 2          # 2 workers on this machine
    numoe generate MODEL -p "..." --virtual-numa 2     # split the one NUMA node in 2
    numoe generate MODEL -p "..." --topology hw.json [--ray-address HEAD:6379]

cluster/cli.py adds the flags with `add_cluster_arguments(parser)`, reads them with
`cluster_options_from_args(args)` (None: no cluster flag, run in one process) and passes
`cluster_runner_factory(options, backend=..., isa=...)` to Engine(runner_factory=...).
-t/--threads becomes the threads of each worker (default: its node's CPU count).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from cluster.errors import NumoeError

if TYPE_CHECKING:  # the flags must not slow `numoe --help` down with heavy imports
    from cluster.coordinator import ClusterRunner
    from cluster.engine import RunnerFactory
    from cluster.model import ModelConfig, TensorMap
    from cluster.topology import Topology


@dataclass(frozen=True)
class ClusterOptions:
    workers: int | None = None  # N workers on this machine's topology
    topology_file: str | None = None
    virtual_numa: int | None = None
    ray_address: str | None = None  # join this Ray cluster instead of starting one
    threads_per_worker: int | None = None  # None: each worker's node CPU count
    bind_memory: bool = True
    reduce_transport: str = "auto"  # all-reduce inside a stage: auto (shm on a host), shm, ipc, tcp


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "cluster", "run on one worker per NUMA node (Ray actors) instead of in this process")
    group.add_argument("--workers", type=int, default=None, metavar="N",
                       help="N workers on this machine's NUMA nodes (its one node split into N "
                            "virtual nodes if it has fewer)")
    group.add_argument("--topology", dest="topology_file", default=None, metavar="FILE",
                       help="JSON/YAML topology file: one worker per NUMA node it lists")
    group.add_argument("--virtual-numa", type=int, default=None, metavar="N",
                       help="split the one NUMA node into N virtual nodes, one worker each")
    group.add_argument("--ray-address", default=None, metavar="ADDR",
                       help="join this Ray cluster (every host started with its NUMA "
                            "resources) instead of starting a local one")
    group.add_argument("--reduce-transport", choices=("auto", "shm", "ipc", "tcp"),
                       default="auto",
                       help="how a host's workers all-reduce: auto = shared memory on one host, "
                            "tcp across hosts (default); or force ZeroMQ ipc/tcp")
    group.add_argument("--no-membind", dest="bind_memory", action="store_false",
                       help="do not bind workers' memory to their node (where the kernel "
                            "refuses set_mempolicy)")


def cluster_options_from_args(args: argparse.Namespace) -> ClusterOptions | None:
    """The cluster flags as frozen options; None when none was given (single process)."""
    workers, topology_file, virtual = args.workers, args.topology_file, args.virtual_numa
    if workers is None and topology_file is None and virtual is None:
        if args.ray_address is not None:
            raise NumoeError("--ray-address needs --topology FILE naming the cluster's hosts "
                             "and NUMA nodes")
        return None
    if workers is not None and (topology_file is not None or virtual is not None):
        raise NumoeError("--workers picks the topology itself; give either --workers N or "
                         "--topology FILE / --virtual-numa N")
    if workers is not None and workers < 1:
        raise NumoeError(f"--workers {workers}: give at least 1 worker")
    if virtual is not None and virtual < 1:
        raise NumoeError(f"--virtual-numa {virtual}: give at least 1 virtual node")
    threads = getattr(args, "threads", None)
    if threads is not None and threads < 1:
        raise NumoeError(f"-t/--threads {threads} must be a positive number of threads")
    return ClusterOptions(workers=workers, topology_file=topology_file, virtual_numa=virtual,
                          ray_address=args.ray_address, threads_per_worker=threads,
                          bind_memory=args.bind_memory,
                          reduce_transport=args.reduce_transport)


def resolve_topology(options: ClusterOptions) -> tuple[Topology, list[str]]:
    """The hardware the workers run on, and notes (in words) about how it was chosen."""
    from cluster import topology as topo  # noqa: PLC0415

    notes: list[str] = []
    if options.workers is not None:
        found = topo.discover_local()
        nodes = found.hosts[0].nodes
        if len(nodes) == options.workers:
            return found, notes
        if len(nodes) == 1:
            notes.append(f"this machine has 1 NUMA node; --workers {options.workers} splits its "
                         f"CPUs into {options.workers} virtual nodes")
            return topo.virtual_numa(found, options.workers), notes
        if options.workers < len(nodes):
            notes.append(f"--workers {options.workers}: using NUMA nodes "
                         f"{[node.node_id for node in nodes[:options.workers]]} of "
                         f"{len(nodes)}")
            host = found.hosts[0]
            trimmed = topo.Host(name=host.name, nodes=nodes[:options.workers])
            return topo.Topology(hosts=(trimmed,), description=found.description), notes
        raise NumoeError(f"--workers {options.workers}: this machine has {len(nodes)} NUMA "
                         f"nodes and numoe runs at most one worker per node; use --workers "
                         f"{len(nodes)} or fewer")
    found = (topo.load_topology(options.topology_file) if options.topology_file
             else topo.discover_local())
    if options.virtual_numa is not None:
        found = topo.virtual_numa(found, options.virtual_numa)
    return found, notes


def cluster_runner_factory(
    options: ClusterOptions, backend: str = "cpu", isa: str | None = None,
    kv_cache_dtype: str | None = None, notes: TextIO | None = None, n_slots: int = 1,
) -> RunnerFactory:
    """Engine's runner_factory: plan the model on the topology, start or join Ray, and start
    the workers (each keeping n_slots KV caches, one per concurrent sequence). Notes (topology
    choices, plan assumptions) go to `notes` (default stderr)."""
    topology, topology_notes = resolve_topology(options)  # bad flags fail before any model work

    def make_runner(model_path: Path, config: ModelConfig, tensors: TensorMap,
                    n_ctx: int) -> ClusterRunner:
        from cluster.coordinator import ClusterRunner  # noqa: PLC0415, F811
        from cluster.placement import ModelSpec, PlanOptions, make_plan  # noqa: PLC0415
        from cluster.ray_cluster import join_ray, start_local_ray  # noqa: PLC0415
        from worker.worker import WorkerOptions  # noqa: PLC0415

        # No GPU workers yet: the CUDA backend runs in one process only (worker/backends/
        # cupy_gpu.py), so the cluster plans CPU workers even on a topology that lists GPUs.
        plan = make_plan(ModelSpec(config, tensors), topology,
                         PlanOptions(ctx=n_ctx, gpu="off"))
        out = notes if notes is not None else sys.stderr
        for note in [*topology_notes, *plan.notes]:
            print(f"numoe: note: {note}", file=out)
        session = (join_ray(options.ray_address, topology) if options.ray_address
                   else start_local_ray(topology))
        worker_options = WorkerOptions(backend=backend, n_threads=options.threads_per_worker,
                                       n_ctx=n_ctx, n_slots=n_slots,
                                       kv_cache_dtype=kv_cache_dtype, isa=isa,
                                       bind_memory=options.bind_memory,
                                       reduce_transport=options.reduce_transport)
        return ClusterRunner(model_path, plan, n_ctx, topology=topology,
                             options=worker_options, ray_session=session, progress=out)

    return make_runner

