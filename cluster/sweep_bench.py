"""`numoe bench MODEL`: prompt and decode speed at growing KV-cache depths, the way
ik_llama.cpp's `llama-sweep-bench` measures them, so the two tables can be read side by side.

    numoe bench MODEL.gguf -c 2048 -ub 512 -t 16 [--virtual-numa 2] [--json out.json]

For N_KV = 0, ub, 2 ub, ... while the context has room (llama-sweep-bench's loop):
  1. TG single-token decode steps at positions N_KV, N_KV + 1, ... (T_TG, S_TG = TG / T_TG);
     the next step overwrites them, as llama-sweep-bench removes them from the cache;
  2. PP = ub prompt tokens at position N_KV, in forward passes of at most -b tokens
     (T_PP, S_PP = PP / T_PP); they stay in the cache, so the next step starts at N_KV + PP.
Token ids are pseudo-random ordinary tokens (no control tokens), like llama-bench's. The
runner's cache is positional: a sweep starting at position 0 starts from an empty cache.
Each row is printed as soon as it is measured; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, TextIO

from cluster.errors import NumoeError
from cluster.run_args import (
    RunTarget,
    add_compute_arguments,
    add_model_arguments,
    run_target,
)
from cluster.sweep_results import TABLE_HEADER, TABLE_SEPARATOR, SweepResult, SweepRow

if TYPE_CHECKING:
    import numpy as np

    from cluster.engine import Engine, Runner

DEFAULT_CTX = 2048
DEFAULT_UBATCH = 512
DEFAULT_BATCH = 2048  # llama.cpp's n_batch default


def add_bench_parser(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser(
        "bench", help="sweep-bench: prompt and decode speed at growing KV-cache depths",
        description="Prompt (PP) and decode (TG) speed at KV depths 0, ub, 2 ub, ... up to "
                    "the context size, as ik_llama.cpp's llama-sweep-bench measures them.",
    )
    add_model_arguments(bench)
    bench.add_argument("-c", "--ctx-size", type=int, default=DEFAULT_CTX,
                       help="context to fill, in tokens (default: %(default)s)")
    bench.add_argument("-ub", "--ubatch-size", type=int, default=DEFAULT_UBATCH,
                       help="prompt tokens per step, the step between KV depths "
                            "(default: %(default)s)")
    bench.add_argument("-b", "--batch-size", type=int, default=DEFAULT_BATCH,
                       help="most tokens in one forward pass (default: %(default)s)")
    bench.add_argument("-n", "--n-predict", "--tg", dest="tg", type=int, default=None,
                       help="decode steps per step (default: ubatch-size / 4)")
    bench.add_argument("--no-warmup", dest="warmup", action="store_false",
                       help="skip the one-token warm-up pass")
    bench.add_argument("-wb", "--warmup-batch", action="store_true",
                       help="also run one untimed ubatch-sized prompt before measuring")
    bench.add_argument("--seed", type=int, default=1234,
                       help="seed of the random token ids (default: %(default)s)")
    bench.add_argument("--json", dest="json_file", default=None, metavar="FILE",
                       help="also write the result as JSON to FILE (- for stdout, the table "
                            "then goes to stderr); `numoe plot sweep` reads it")
    bench.add_argument("--label", default="",
                       help="legend text for `numoe plot sweep` (default: the engine name)")
    add_compute_arguments(bench)
    bench.set_defaults(handler=run_bench)


def _check_sizes(args: argparse.Namespace) -> None:
    for flag, value in (("-c/--ctx-size", args.ctx_size), ("-ub/--ubatch-size",
                        args.ubatch_size), ("-b/--batch-size", args.batch_size)):
        if value < 1:
            raise NumoeError(f"{flag} {value} must be a positive number of tokens")
    if args.tg is not None and args.tg < 1:
        raise NumoeError(f"-n/--tg {args.tg} must be a positive number of decode steps")


def run_bench(args: argparse.Namespace) -> int:
    _check_sizes(args)
    target = run_target(args)
    table_out = sys.stderr if args.json_file == "-" else sys.stdout
    json_out = None
    if args.json_file and args.json_file != "-":
        try:  # opened now, so a bad path fails before the minutes of measuring
            json_out = open(args.json_file, "w", encoding="utf-8")  # noqa: SIM115
        except OSError as error:
            raise NumoeError(f"cannot write --json {args.json_file}: {error.strerror}") \
                from error
    try:
        result = _sweep(args, target, table_out)
    except BaseException:
        if json_out is not None:  # no half-written or empty result left behind
            json_out.close()
            os.unlink(args.json_file)
        raise
    if json_out is None and args.json_file == "-":
        print(result.to_json(), flush=True)
    elif json_out is not None:
        with json_out:
            json_out.write(result.to_json() + "\n")
        print(f"numoe: wrote {args.json_file}", file=sys.stderr)
    return 0


def _sweep(args: argparse.Namespace, target: RunTarget, table_out: TextIO) -> SweepResult:
    """Open the model, print the table row by row, and return the result."""
    from cluster.engine import Engine  # noqa: PLC0415

    pp = args.ubatch_size
    tg = args.tg if args.tg is not None else max(pp // 4, 1)
    with Engine(target.model_path, backend=target.backend, n_threads=target.threads,
                n_ctx=args.ctx_size, isa=target.isa,
                runner_factory=target.runner_factory) as engine:
        if engine.n_ctx < max(pp, tg):
            raise NumoeError(
                f"the context ({engine.n_ctx} tokens) is smaller than one step "
                f"(-ub {pp}, TG {tg}); raise -c/--ctx-size or lower -ub/--ubatch-size "
                f"(the model allows up to {engine.config.context_length})")
        result = SweepResult(
            engine="numoe", model=target.model_path.name,
            model_size_bytes=target.model_path.stat().st_size, n_kv_max=engine.n_ctx,
            n_batch=args.batch_size, n_ubatch=pp,
            n_threads=target.threads if target.cluster is None else (args.threads or 0),
            backend=target.backend, topology=describe_placement(engine.runner, target.threads),
            label=args.label)
        print(f"\nmain: n_kv_max = {result.n_kv_max}, n_batch = {result.n_batch}, "
              f"n_ubatch = {pp}, n_threads = {result.n_threads}, backend = {args.backend}, "
              f"topology = {result.topology}\n", file=table_out)
        print(TABLE_HEADER, file=table_out)
        print(TABLE_SEPARATOR, file=table_out, flush=True)
        token_ids = OrdinaryTokens(engine, args.seed)
        sweep = Sweep(engine.runner, token_ids, engine.n_ctx, pp, tg, args.batch_size)
        sweep.warm_up(args.warmup, args.warmup_batch)
        for row in sweep.rows(lambda text: print(f"numoe: {text}", file=sys.stderr,
                                                 flush=True)):
            result.rows.append(row)
            print(row.table_line(), file=table_out, flush=True)
    return result


class OrdinaryTokens:
    """Pseudo-random token ids drawn from the ordinary (non-control) part of the vocabulary,
    so no id triggers special handling (llama-bench draws from the whole vocabulary)."""

    def __init__(self, engine: Engine, seed: int) -> None:
        import numpy as np  # noqa: PLC0415 — `numoe --help` stays instant

        from cluster.tokenizer import TOKEN_NORMAL  # noqa: PLC0415

        tokenizer = engine.tokenizer
        vocab = min(engine.config.vocab_size, tokenizer.vocab_size)
        self.ids = np.flatnonzero(tokenizer.token_types[:vocab] == TOKEN_NORMAL)  # [n_ordinary]
        if len(self.ids) == 0:
            self.ids = np.arange(vocab)
        self.rng = np.random.default_rng(seed)

    def draw(self, count: int) -> np.ndarray:
        return self.rng.choice(self.ids, size=count)  # int64 [count]


class Sweep:
    """The measuring loop, over anything with Runner's forward(ids, start, logits)."""

    def __init__(self, runner: Runner, tokens: OrdinaryTokens, n_ctx: int, pp: int, tg: int,
                 n_batch: int) -> None:
        self.runner, self.tokens = runner, tokens
        self.n_ctx, self.pp, self.tg = n_ctx, pp, tg
        self.chunk = min(n_batch, pp)  # llama.cpp clamps the ubatch to the batch

    def warm_up(self, one_token: bool, whole_batch: bool) -> None:
        """Untimed passes that page the weights in and size the buffers."""
        if one_token:
            self.runner.forward(self.tokens.draw(1), 0, logits="last")
        if whole_batch:
            self.prompt_seconds(0)

    def prompt_seconds(self, n_kv: int) -> float:
        ids = self.tokens.draw(self.pp)  # [pp]
        started = time.perf_counter()
        for offset in range(0, self.pp, self.chunk):
            self.runner.forward(ids[offset:offset + self.chunk], n_kv + offset, logits="last")
        return time.perf_counter() - started

    def decode_seconds(self, n_kv: int) -> float:
        ids = self.tokens.draw(self.tg)  # [tg]
        started = time.perf_counter()
        for step in range(self.tg):
            self.runner.forward(ids[step:step + 1], n_kv + step, logits="last")
        return time.perf_counter() - started

    def depths(self) -> range:
        """KV depths with room for both tests: the prompt and the decode steps fit."""
        return range(0, self.n_ctx - max(self.pp, self.tg) + 1, self.pp)

    def rows(self, log: Callable[[str], None]) -> Iterator[SweepRow]:
        """Yields one row per depth, as it is measured."""
        depths = self.depths()
        for step, n_kv in enumerate(depths, start=1):
            log(f"step {step}/{len(depths)}: N_KV = {n_kv}, {self.tg} decode steps")
            t_tg = self.decode_seconds(n_kv)
            log(f"step {step}/{len(depths)}: N_KV = {n_kv}, {self.pp} prompt tokens")
            t_pp = self.prompt_seconds(n_kv)
            yield SweepRow(pp=self.pp, tg=self.tg, n_kv=n_kv, t_pp=t_pp,
                           speed_pp=self.pp / t_pp, t_tg=t_tg, speed_tg=self.tg / t_tg)


def describe_placement(runner: Runner, threads: int) -> str:
    """Where the sweep ran, in words: this process, or the cluster runner's workers."""
    from cluster.coordinator import ClusterRunner  # noqa: PLC0415
    from cluster.topology import format_cpu_list  # noqa: PLC0415

    if not isinstance(runner, ClusterRunner):
        return f"1 process, {threads} threads"
    workers = [f"{worker.host}/node{worker.node_id} cpus {format_cpu_list(worker.cpus)} "
               f"layers {worker.layers[0]}-{worker.layers[1] - 1}"
               for worker in runner.plan.workers]
    return f"{len(workers)} workers ({'; '.join(workers)})"
