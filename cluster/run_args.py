"""The flags every command that runs a model shares (generate, bench, perplexity): which model,
how many threads, which backend and instruction set, and the cluster flags; read once into a
RunTarget at the edge.

    add_model_arguments(parser)
    add_compute_arguments(parser)
    target = run_target(args)   # checks the flags, finds the default model, plans no cluster yet
    Engine(target.model_path, n_threads=target.threads, ..., runner_factory=target.runner_factory)
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cluster.cluster_cli import add_cluster_arguments
from cluster.errors import NumoeError

if TYPE_CHECKING:
    from cluster.cluster_cli import ClusterOptions
    from cluster.engine import RunnerFactory


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None,
                        help="GGUF model file (default: the embedded Gemma 3 270M Q4_K_M)")
    parser.add_argument("-m", "--model", dest="model_flag", default=None,
                        help="GGUF model file (same as the positional MODEL)")


def add_compute_arguments(parser: argparse.ArgumentParser) -> None:
    """-t, --backend, --isa and the cluster flags (--workers, --virtual-numa, --topology...)."""
    parser.add_argument("-t", "--threads", type=int, default=None,
                        help="compute threads, per worker on a cluster (default: the CPUs this "
                             "process may use)")
    parser.add_argument("--backend", choices=("cpu", "numpy"), default="cpu",
                        help="compute backend (default: %(default)s)")
    parser.add_argument("--isa", choices=("scalar", "avx2", "avx512"), default=None,
                        help="force a kernel instruction set (default: the best available)")
    add_cluster_arguments(parser)


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class RunTarget:
    model_path: Path
    threads: int
    backend: str
    isa: str | None
    cluster: ClusterOptions | None  # None: run in this process
    runner_factory: RunnerFactory | None  # the cluster's workers, or None


def _check_model_and_threads(args: argparse.Namespace) -> None:
    if args.model and args.model_flag and args.model != args.model_flag:
        raise NumoeError("two different models given (MODEL and -m); pass only one")
    if args.threads is not None and args.threads <= 0:
        raise NumoeError(f"-t/--threads {args.threads} must be a positive number of threads")


def run_target(args: argparse.Namespace) -> RunTarget:
    """Check the shared flags and resolve them: the model (the embedded default when none is
    given, assembled with a progress bar), threads, and the cluster's runner factory."""
    from cluster.cluster_cli import (  # noqa: PLC0415
        cluster_options_from_args,
        cluster_runner_factory,
    )

    _check_model_and_threads(args)
    cluster = cluster_options_from_args(args)  # bad cluster flags fail before the model loads
    runner_factory = None if cluster is None else cluster_runner_factory(
        cluster, backend=args.backend, isa=args.isa)
    model_path = args.model or args.model_flag
    if model_path is None:
        from cluster.default_model import default_model_path  # noqa: PLC0415

        model_path = default_model_path(progress=True)
    threads = args.threads if args.threads is not None else default_threads()
    return RunTarget(Path(model_path), threads, args.backend, args.isa, cluster, runner_factory)
