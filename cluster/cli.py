"""The `numoe` command line. Flags follow llama.cpp's names so users can carry their habits over.

    numoe generate [MODEL.gguf] -p "Once upon a time" -n 64 -t 2

Subcommands are argparse sub-parsers; each has a `_run_<name>(args) -> int` handler. User errors
(NumoeError) print one line on stderr and exit 1; tracebacks are for bugs.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from cluster.errors import NumoeError
from cluster.perplexity import add_perplexity_parser
from cluster.plot import add_plot_parser
from cluster.run_args import (
    add_compute_arguments,
    add_model_arguments,
    run_target,
)
from cluster.serve_cli import add_serve_parser
from cluster.sweep_bench import add_bench_parser

if TYPE_CHECKING:
    from cluster.engine import GenerationStats
    from cluster.topology import Topology

# llama.cpp's sampling defaults (common/common.h), so `numoe generate` behaves like llama-cli.
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_K = 40
DEFAULT_TOP_P = 0.95
DEFAULT_MIN_P = 0.05
DEFAULT_REPEAT_PENALTY = 1.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="numoe", description="NUMA-aware inference for Mixture-of-Experts models in GGUF"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate = commands.add_parser(
        "generate", help="generate text from a prompt, streamed to stdout",
        description="Generate text from a prompt. Timings go to stderr.",
    )
    add_model_arguments(generate)
    generate.add_argument("-p", "--prompt", required=True, help="prompt text")
    generate.add_argument("-n", "--n-predict", type=int, default=64,
                          help="tokens to generate at most (default: %(default)s)")
    generate.add_argument("-c", "--ctx-size", type=int, default=None,
                          help="context size in tokens (default: min(4096, the model's))")
    generate.add_argument("--temp", type=float, default=DEFAULT_TEMPERATURE,
                          help="temperature, 0 = greedy (default: %(default)s)")
    generate.add_argument("--top-k", type=int, default=DEFAULT_TOP_K,
                          help="top-k, 0 = off (default: %(default)s)")
    generate.add_argument("--top-p", type=float, default=DEFAULT_TOP_P,
                          help="top-p, 1 = off (default: %(default)s)")
    generate.add_argument("--min-p", type=float, default=DEFAULT_MIN_P,
                          help="min-p, 0 = off (default: %(default)s)")
    generate.add_argument("--repeat-penalty", type=float, default=DEFAULT_REPEAT_PENALTY,
                          help="repetition penalty over the last 64 tokens, 1 = off "
                               "(default: %(default)s)")
    generate.add_argument("--seed", type=int, default=-1,
                          help="sampling seed, -1 = random (default: %(default)s)")
    add_compute_arguments(generate)
    generate.set_defaults(handler=_run_generate)

    topology = commands.add_parser(
        "topology", help="print the hardware topology (hosts, NUMA nodes, CPUs, memory, GPUs)",
        description="Print this machine's topology, or the one described by --topology FILE.",
    )
    topology.add_argument("--topology", dest="topology_file", default=None, metavar="FILE",
                          help="JSON/YAML topology file (default: discover this machine)")
    topology.add_argument("--virtual-numa", type=int, default=None, metavar="N",
                          help="split the one NUMA node into N virtual nodes")
    topology.add_argument("--json", action="store_true", help="print JSON instead of a table")
    topology.set_defaults(handler=_run_topology)

    membw = commands.add_parser(
        "membw", help="measure each NUMA node's read/copy/triad bandwidth, threads pinned to it",
        description="STREAM-style bandwidth of this machine's memory, one run per NUMA node "
                    "with one thread pinned to each of the node's CPUs.",
    )
    membw.add_argument("--topology", dest="topology_file", default=None, metavar="FILE",
                       help="topology file; it must describe this machine's CPUs")
    membw.add_argument("--virtual-numa", type=int, default=None, metavar="N",
                       help="split the one NUMA node into N virtual nodes")
    membw.add_argument("--mib", type=int, default=256,
                       help="MiB per array, 3 arrays (default: %(default)s)")
    membw.add_argument("--repeats", type=int, default=5,
                       help="timed repeats, the best counts (default: %(default)s)")
    membw.add_argument("--json", action="store_true", help="print JSON instead of a table")
    membw.set_defaults(handler=_run_membw)

    plan = commands.add_parser(
        "plan", help="plan which worker (NUMA node or GPU) holds which tensor slices, with "
                     "memory and predicted tok/s",
        description="Placement of a GGUF model, or of a built-in description such as "
                    "deepseek-v3:Q4_K_M, from metadata alone: tensor parallel across a host's "
                    "NUMA nodes, a GPU for what every token reads, pipeline stages across "
                    "hosts; per-worker memory (weights + KV cache), bytes read per decode "
                    "token and predicted decode / prompt tok/s.",
    )
    plan.add_argument("model", nargs="?", default=None,
                      help="GGUF model file (only its metadata is read), or NAME:QUANT of a "
                           "built-in description (see --list-models)")
    plan.add_argument("--list-models", action="store_true",
                      help="list the built-in model descriptions and quant recipes, then exit")
    plan.add_argument("--topology", dest="topology_file", default=None, metavar="FILE",
                      help="JSON/YAML topology file (default: discover this machine)")
    plan.add_argument("--virtual-numa", type=int, default=None, metavar="N",
                      help="split the one NUMA node into N virtual nodes")
    plan.add_argument("-c", "--ctx", type=int, default=4096,
                      help="context tokens of KV cache per worker (default: %(default)s)")
    plan.add_argument("-ot", "--override-tensor", action="append", default=[],
                      metavar="REGEX=TARGET",
                      help="pin tensors whose name REGEX finds whole to numaN or gpuN, or keep "
                           "them off the GPU with cpu (repeatable; the first match wins)")
    plan.add_argument("--strategy", choices=("tensor_parallel", "expert_parallel"),
                      default="tensor_parallel",
                      help="how a host's NUMA nodes share the routed experts "
                           "(default: %(default)s)")
    plan.add_argument("--layer-split", default=None, metavar="N,N,...",
                      help="layers per host, in host order (default: as even as can be)")
    plan.add_argument("--gpu", choices=("auto", "on", "off"), default="auto",
                      help="use a host's GPU for attention, dense and shared-expert layers, "
                           "the LM head and the KV cache: auto = when it fits "
                           "(default: %(default)s)")
    plan.add_argument("--bandwidth", type=float, default=None, metavar="GBS",
                      help="read GB/s per NUMA node where the topology gives none (default: "
                           "50; `numoe membw` measures it)")
    plan.add_argument("--depth", type=int, default=0, metavar="N",
                      help="tokens already in the KV cache for the decode prediction "
                           "(default: %(default)s)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(handler=_run_plan)
    add_serve_parser(commands)
    add_perplexity_parser(commands)
    add_bench_parser(commands)
    add_plot_parser(commands)
    return parser


def _run_plan(args: argparse.Namespace) -> int:
    import json  # noqa: PLC0415
    from dataclasses import replace  # noqa: PLC0415

    from cluster import catalog  # noqa: PLC0415
    from cluster.placement import (  # noqa: PLC0415
        ModelSpec,
        PlanOptions,
        format_plan_table,
        make_plan,
        parse_override,
    )

    if args.list_models:
        print(catalog.format_catalog())
        return 0
    if args.model is None:
        raise NumoeError("plan: give a GGUF file or a built-in NAME:QUANT (numoe plan "
                         "--list-models lists them)")
    if os.path.exists(args.model) or not catalog.looks_like_catalog_name(args.model):
        from cluster.gguf import open_gguf  # noqa: PLC0415
        from cluster.model import load_model_spec  # noqa: PLC0415

        with open_gguf(args.model) as gguf:  # only the metadata and tensor index are read
            spec = ModelSpec(*load_model_spec(gguf))
    else:  # a built-in description, e.g. deepseek-v3:Q4_K_M
        described = catalog.describe(args.model)
        spec = ModelSpec(described.config, described.tensors)
    layer_split: tuple[int, ...] = ()
    if args.layer_split:
        try:
            layer_split = tuple(int(part) for part in args.layer_split.split(","))
        except ValueError as error:
            raise NumoeError(f"--layer-split {args.layer_split!r}: give comma-separated layer "
                             f"counts, one per host, e.g. 31,30") from error
    if args.bandwidth is not None and args.bandwidth <= 0:
        raise NumoeError(f"--bandwidth {args.bandwidth}: give a positive number of GB/s")
    options = PlanOptions(ctx=args.ctx, strategy=args.strategy, layer_split=layer_split,
                          gpu=args.gpu, decode_depth=args.depth,
                          overrides=tuple(parse_override(text) for text in args.override_tensor))
    if args.bandwidth is not None:
        options = replace(options, default_bandwidth_gbs=args.bandwidth)
    result = make_plan(spec, _topology_from_args(args), options)
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_plan_table(result))
    return 0


def _topology_from_args(args: argparse.Namespace) -> Topology:
    """The hardware a subcommand works on: --topology FILE, else this machine, then split by
    --virtual-numa N when given. Shared by plan, membw and topology."""
    from cluster import topology as topo  # noqa: PLC0415

    found = (topo.load_topology(args.topology_file) if args.topology_file
             else topo.discover_local())
    if args.virtual_numa is not None:
        found = topo.virtual_numa(found, args.virtual_numa)
    return found


def _run_membw(args: argparse.Namespace) -> int:
    import json  # noqa: PLC0415

    from cluster import topology as topo  # noqa: PLC0415
    from worker import numa  # noqa: PLC0415

    found = _topology_from_args(args)
    usable = os.sched_getaffinity(0)
    if args.topology_file:
        foreign = sorted({cpu for host in found.hosts for node in host.nodes
                          for cpu in node.cpus} - usable)
        if len(found.hosts) != 1 or foreign:
            raise NumoeError(
                f"membw measures this machine; --topology {args.topology_file} describes "
                f"{len(found.hosts)} host(s) with CPUs this process cannot run on "
                f"({topo.format_cpu_list(foreign) or 'none'}); drop --topology to measure the "
                f"local nodes")
    if args.mib < 1 or args.repeats < 1:
        raise NumoeError("membw: --mib and --repeats must be >= 1")
    rows = []
    for host in found.hosts:
        for node in host.nodes:
            result = numa.membw(node.cpus, args.mib << 20, args.repeats)
            rows.append({"host": host.name, "node": node.node_id,
                         "cpus": topo.format_cpu_list(node.cpus),
                         "read_gbs": round(result.read_gbs, 2),
                         "copy_gbs": round(result.copy_gbs, 2),
                         "triad_gbs": round(result.triad_gbs, 2)})
    if args.json:
        print(json.dumps({"mib_per_array": args.mib, "repeats": args.repeats, "nodes": rows},
                         indent=2))
        return 0
    print(f"{'host':<20} {'node':>4} {'cpus':<12} {'read GB/s':>10} {'copy GB/s':>10} "
          f"{'triad GB/s':>10}")
    for row in rows:
        print(f"{row['host']:<20} {row['node']:>4} {row['cpus']:<12} {row['read_gbs']:>10.2f} "
              f"{row['copy_gbs']:>10.2f} {row['triad_gbs']:>10.2f}")
    return 0


def _run_topology(args: argparse.Namespace) -> int:
    from cluster import topology as topo  # noqa: PLC0415

    found = _topology_from_args(args)
    print(found.to_json() if args.json else topo.format_topology_table(found))
    return 0


def _run_generate(args: argparse.Namespace) -> int:
    # Imported here so `numoe --help` stays instant.
    from cluster.engine import DEFAULT_CTX, Engine  # noqa: PLC0415
    from cluster.sampling import SamplingParams  # noqa: PLC0415

    if args.n_predict < 0:
        raise NumoeError(f"-n/--n-predict {args.n_predict} must be >= 0")
    target = run_target(args)
    sampling = SamplingParams(
        temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        repetition_penalty=args.repeat_penalty, seed=None if args.seed < 0 else args.seed,
    )
    with Engine(target.model_path, backend=target.backend, n_threads=target.threads,
                n_ctx=args.ctx_size or DEFAULT_CTX, isa=target.isa,
                runner_factory=target.runner_factory) as engine:
        generation = engine.generate(args.prompt, max_tokens=args.n_predict, sampling=sampling)
        for piece in generation:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        stats = generation.stats
        where = (f"{target.threads} threads" if target.cluster is None else
                 f"{len(engine.runner.plan.workers)} workers")
        _print_timings(engine.load_seconds, stats, where, target.backend)
    return 0


def _print_timings(load_seconds: float, stats: GenerationStats, where: str,
                   backend: str) -> None:
    def line(label: str, seconds: float, count: int, unit: str, rate: float) -> str:
        per_token_ms = 1000 * seconds / count if count else 0.0
        return (f"numoe: {label:>15} = {1000 * seconds:10.2f} ms / {count:5d} {unit} "
                f"({per_token_ms:8.2f} ms per token, {rate:8.2f} tokens per second)")

    err = sys.stderr
    print(f"numoe: {'load time':>15} = {1000 * load_seconds:10.2f} ms "
          f"(backend {backend}, {where})", file=err)
    print(line("prompt eval time", stats.prompt_seconds, stats.prompt_tokens, "tokens",
               stats.prompt_tokens_per_s), file=err)
    print(line("eval time", stats.generation_seconds, stats.decode_steps, "runs  ",
               stats.generation_tokens_per_s), file=err)
    print(f"numoe: {'generated':>15} = {stats.generated_tokens} tokens "
          f"(stopped by {stats.stop_reason or 'nothing'})", file=err)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except NumoeError as error:
        message = " ".join(str(error).split())  # one line, whatever the message holds
        print(f"numoe: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("numoe: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `numoe generate ... | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
