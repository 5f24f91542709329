"""Sweep-bench speeds at several KV depths and perplexity, numoe against llama.cpp, one GGUF.

    python bench/compare_sweep.py MODEL.gguf [--threads 2] [-c 1024] [-ub 256] [--tg 64]
        [--repeats 3] [--ppl-ctx 256] [--chunks 8] [--isa ISA] [--out-dir DIR] [--plot]

Same model, same threads, same text, each engine as a subprocess (never overlapping):
- sweep: `numoe bench -c C -ub UB -n TG` (depths 0, UB, 2 UB, ... while PP fits in C), run
  REPEATS times; llama.cpp: `llama-bench -p UB -n TG -ub UB -d <the same depths> -r REPEATS`
  (each of its tests fills the cache to the depth untimed, then times PP prompt tokens or TG
  decode steps: sweep-bench's two measurements). Every figure is the median over repeats.
- perplexity: `numoe perplexity` and `llama-perplexity` with the same -c and --chunks over the
  corpus passage of tests/models/test_perplexity.py (bench/perplexity_runs.py).

Writes into DIR numoe_sweep.json and llamacpp_sweep.json, the medians (`numoe plot sweep`
reads both: the llama-bench results are converted into the sweep JSON shape of
cluster/sweep_results.py); beside them the single runs (numoe_sweep_run<i>.json,
llama_bench_raw.json), comparison.json, and with --plot sweep.png. Prints a markdown table of
ratios numoe/llama.cpp on stdout, progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.perplexity_runs import (  # noqa: E402 — repo root on the path first
    NUMOE,
    PerplexityRun,
    isa_flags,
    llamacpp_perplexity,
    log,
    numoe_perplexity,
    write_passage,
)
from cluster.sweep_results import SweepResult, SweepRow, load_sweep  # noqa: E402
from tests.reference import llamacpp  # noqa: E402


def sweep_depths(ctx: int, ubatch: int, tg: int) -> list[int]:
    """numoe bench's depths (cluster/sweep_bench.py Sweep.depths), for llama-bench's -d."""
    return list(range(0, ctx - max(ubatch, tg) + 1, ubatch))


def median_rows(sweeps: list[list[SweepRow]]) -> list[SweepRow]:
    """Row by row (same depths in every sweep), the median time of each test."""
    rows = []
    for same_depth in zip(*sweeps, strict=True):
        first = same_depth[0]
        t_pp = statistics.median(row.t_pp for row in same_depth)
        t_tg = statistics.median(row.t_tg for row in same_depth)
        rows.append(SweepRow(pp=first.pp, tg=first.tg, n_kv=first.n_kv, t_pp=t_pp,
                             speed_pp=first.pp / t_pp, t_tg=t_tg, speed_tg=first.tg / t_tg))
    return rows


def run_numoe_sweeps(args: argparse.Namespace, out_dir: Path) -> SweepResult:
    results = []
    for repeat in range(args.repeats):
        out = out_dir / f"numoe_sweep_run{repeat + 1}.json"
        command = [*NUMOE, "bench", str(args.model), "-c", str(args.ctx), "-ub",
                   str(args.ubatch), "-n", str(args.tg), "-t", str(args.threads), "--json",
                   str(out), *isa_flags(args.isa)]
        log(f"numoe sweep {repeat + 1}/{args.repeats}: $ {shlex.join(command)}")
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        results.append(load_sweep(out))
    merged = results[0]
    merged.rows = median_rows([result.rows for result in results])
    merged.label = f"numoe{' ' + args.isa if args.isa else ''} (median of {args.repeats})"
    return merged


def run_llama_bench_sweep(args: argparse.Namespace, depths: list[int],
                          out_dir: Path) -> SweepResult:
    command = [str(llamacpp.tool("llama-bench")), "-m", str(args.model), "-t", str(args.threads),
               "-p", str(args.ubatch), "-n", str(args.tg), "-ub", str(args.ubatch),
               "-d", ",".join(map(str, depths)), "-r", str(args.repeats), "-o", "json"]
    log(f"llama.cpp sweep: $ {shlex.join(command)}")
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"llama-bench failed (exit {result.returncode}):\n"
                         f"{result.stderr[-3000:]}")
    (out_dir / "llama_bench_raw.json").write_text(result.stdout, encoding="utf-8")
    return sweep_from_llama_bench(json.loads(result.stdout), args.model, args.ctx)


def sweep_from_llama_bench(tests: list[dict[str, Any]], model: Path, ctx: int) -> SweepResult:
    """llama-bench -o json with -d depths, as a sweep: at each depth its pp test gives T_PP and
    its tg test T_TG (median of the repeats' times)."""
    by_depth: dict[int, dict[str, dict[str, Any]]] = {}
    for test in tests:
        kind = "pp" if test["n_gen"] == 0 else "tg"
        by_depth.setdefault(int(test["n_depth"]), {})[kind] = test
    rows = []
    for depth in sorted(by_depth):
        pp_test, tg_test = by_depth[depth]["pp"], by_depth[depth]["tg"]
        t_pp = statistics.median(pp_test["samples_ns"]) / 1e9
        t_tg = statistics.median(tg_test["samples_ns"]) / 1e9
        pp, tg = int(pp_test["n_prompt"]), int(tg_test["n_gen"])
        rows.append(SweepRow(pp=pp, tg=tg, n_kv=depth, t_pp=t_pp, speed_pp=pp / t_pp,
                             t_tg=t_tg, speed_tg=tg / t_tg))
    first = tests[0]
    return SweepResult(
        engine="llama.cpp", model=model.name, model_size_bytes=os.path.getsize(model),
        n_kv_max=ctx, n_batch=int(first["n_batch"]), n_ubatch=int(first["n_ubatch"]),
        n_threads=int(first["n_threads"]), backend=first["backends"],
        topology=f"llama-bench {first['build_commit']}, repack "
                 f"{'on' if first.get('repack') else 'off'}",
        label=f"llama.cpp {first['build_commit']} (median of {len(first['samples_ns'])})",
        rows=rows)


def ratio_table(ours: SweepResult, theirs: SweepResult, ppl: tuple[PerplexityRun, ...],
                ppl_settings: str) -> str:
    lines = ["| measurement | numoe | llama.cpp | numoe / llama.cpp |", "|---|---|---|---|"]
    theirs_by_depth = {row.n_kv: row for row in theirs.rows}
    paired = [(row, theirs_by_depth[row.n_kv]) for row in ours.rows
              if row.n_kv in theirs_by_depth]
    for kind in ("pp", "tg"):  # every prompt row, then every decode row
        for row, other in paired:
            mine, its = getattr(row, f"speed_{kind}"), getattr(other, f"speed_{kind}")
            lines.append(f"| S_{kind.upper()} t/s, {kind.upper()} {getattr(row, kind)} at N_KV "
                         f"{row.n_kv} | {mine:.2f} | {its:.2f} | {mine / its:.2f} |")
    numoe_run, llama_run = ppl
    lines.append(f"| PPL ({ppl_settings}) | {numoe_run.ppl:.4f} ± {numoe_run.ppl_unc:.4f} | "
                 f"{llama_run.ppl:.4f} ± {llama_run.ppl_unc:.4f} | "
                 f"{numoe_run.ppl / llama_run.ppl:.4f} ({relative_difference(ppl):+.2%}) |")
    lines.append(f"| perplexity run, wall s (load included) | {numoe_run.wall_s:.1f} | "
                 f"{llama_run.wall_s:.1f} | {numoe_run.wall_s / llama_run.wall_s:.2f} |")
    return "\n".join(lines)


def relative_difference(ppl: tuple[PerplexityRun, ...]) -> float:
    numoe_run, llama_run = ppl
    return (numoe_run.ppl - llama_run.ppl) / llama_run.ppl


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="GGUF model file")
    parser.add_argument("--threads", type=int, default=2, help="threads for both engines")
    parser.add_argument("-c", "--ctx", type=int, default=1024, help="sweep context (tokens)")
    parser.add_argument("-ub", "--ubatch", type=int, default=256,
                        help="prompt tokens per sweep step, and the step between depths")
    parser.add_argument("--tg", type=int, default=64, help="decode steps per sweep step")
    parser.add_argument("--repeats", type=int, default=3, help="sweeps per engine")
    parser.add_argument("--ppl-ctx", type=int, default=256, help="perplexity -c")
    parser.add_argument("--chunks", type=int, default=8, help="perplexity --chunks")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="where the JSON files go (default: a temporary directory)")
    parser.add_argument("--isa", choices=["scalar", "avx2", "avx512"], default=None,
                        help="numoe kernel ISA (default: the widest this CPU has)")
    parser.add_argument("--plot", action="store_true", help="also draw DIR/sweep.png")
    args = parser.parse_args()
    if not args.model.is_file():
        parser.error(f"model file {args.model} does not exist; pass the path of a .gguf file")
    for name in ("threads", "ctx", "ubatch", "tg", "repeats", "ppl_ctx", "chunks"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.ctx < max(args.ubatch, args.tg):
        parser.error(f"-c {args.ctx} leaves no room for one step of -ub {args.ubatch}")
    return args


def main() -> None:
    args = parse_args()
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="compare_sweep_"))
    out_dir.mkdir(parents=True, exist_ok=True)
    depths = sweep_depths(args.ctx, args.ubatch, args.tg)

    theirs = run_llama_bench_sweep(args, depths, out_dir)
    ours = run_numoe_sweeps(args, out_dir)  # each run's file stays beside the medians
    with tempfile.TemporaryDirectory(prefix="compare_sweep_") as scratch:
        work = Path(scratch)
        text = write_passage(work / "passage.txt")
        ppl = (numoe_perplexity(args.model, text, args.ppl_ctx, args.chunks, args.threads,
                                isa=args.isa),
               llamacpp_perplexity(args.model, text, args.ppl_ctx, args.chunks, args.threads))

    (out_dir / "numoe_sweep.json").write_text(ours.to_json() + "\n", encoding="utf-8")
    (out_dir / "llamacpp_sweep.json").write_text(theirs.to_json() + "\n", encoding="utf-8")
    ppl_settings = f"-c {args.ppl_ctx}, {args.chunks} chunks"
    table = ratio_table(ours, theirs, ppl, ppl_settings)
    summary = {
        "command": command, "model": str(args.model), "threads": args.threads,
        "depths": depths, "repeats": args.repeats, "table": table,
        "ppl": {run.engine: {"ppl": run.ppl, "ppl_unc": run.ppl_unc, "wall_s": run.wall_s,
                             "command": shlex.join(run.command)} for run in ppl},
        "ppl_relative_difference": relative_difference(ppl),
    }
    (out_dir / "comparison.json").write_text(json.dumps(summary, indent=2) + "\n",
                                             encoding="utf-8")
    if args.plot:
        subprocess.run([*NUMOE, "plot", "sweep", str(out_dir / "numoe_sweep.json"),
                        str(out_dir / "llamacpp_sweep.json"), "-o", str(out_dir / "sweep.png"),
                        "--title", f"{args.model.name}, {args.threads} threads"], check=True,
                       stdout=sys.stderr)
    print(f"`{command}`\n\nModel {args.model.name}, {args.threads} threads, sweep -c {args.ctx} "
          f"-ub {args.ubatch} TG {args.tg}, medians of {args.repeats} repeats; perplexity "
          f"{ppl_settings} over the Ezekiel passage. Files in {out_dir}.\n\n{table}")


if __name__ == "__main__":
    main()
