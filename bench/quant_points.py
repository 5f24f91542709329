"""Size-against-quality points of llama.cpp quantisations, for `numoe plot pareto`.

    python bench/quant_points.py gemma [--ctx 256] [--chunks 16] [--threads 2] [--plot]
    python bench/quant_points.py tiny-moe [--ctx 256] [--chunks 16] [--threads 2] [--plot]
    python bench/quant_points.py tiny-moe-256 [...]

gemma: Gemma 3 270M Q4_K_M (cluster.default_model) and its requantisations by
`llama-quantize --allow-requantize` to Q4_0, Q3_K_M and Q2_K; PPL and KLD against Q4_K_M.
tiny-moe: the random-weight tiny qwen3moe of tests/reference/tiny_models.py, its F32 file
quantised by `llama-quantize --pure` to Q8_0, Q6_K, Q5_K, Q4_K, Q4_0; KLD against F32 (the PPL
of random weights means nothing but is reported). Its rows are 64 or 128 wide, shorter than a
K-quant block (256), so llama-quantize falls back to a legacy type per tensor; each point lists
the tensor types its file really holds. tiny-moe-256: the same recipe with 256-wide rows
(bench/tiny_moe_256.py), so the K-quants are real.

Each point is measured by numoe (`numoe perplexity --save-logits` on the base, then
`--kl-divergence`) when numoe has kernels for every tensor type of the file, otherwise by
llama-perplexity against its own base run; "engine" (also the chart's "legend") says which.
llama.cpp's figures for every point are kept under "llamacpp" as a cross-check. Text: the
Ezekiel passage of the corpus (bench/perplexity_runs.py), the same -c and chunks for all.

Writes bench/points_<model>.json in the community's shape (name, bpw, ppl, size in GiB) plus
kld, same_top, engine; with --plot also bench/pareto_<model>.png (tiny-moe: --y kld).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.perplexity_runs import (  # noqa: E402 — repo root on the path first
    NUMOE,
    PerplexityRun,
    llamacpp_kld,
    llamacpp_perplexity,
    log,
    numoe_kld,
    numoe_perplexity,
    write_passage,
)
from cluster.gguf import open_gguf  # noqa: E402
from native import kernels  # noqa: E402
from tests.reference import llamacpp  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class PointSet:
    name: str  # file stem: points_<name>.json, pareto_<name>.png
    base_name: str  # the base point's label
    quant_types: tuple[str, ...]  # llama-quantize type names
    quantize_flags: tuple[str, ...]
    y_field: str  # the chart's y axis


SETS = {
    "gemma": PointSet("gemma", "Q4_K_M", ("Q4_0", "Q3_K_M", "Q2_K"), ("--allow-requantize",),
                      "ppl"),
    "tiny-moe": PointSet("tiny_moe", "F32", ("Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q4_0"),
                         ("--pure",), "kld"),
    "tiny-moe-256": PointSet("tiny_moe_256", "F32", ("Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q4_0"),
                             ("--pure",), "kld"),
}


def base_model(which: str) -> Path:
    if which == "gemma":
        from cluster.default_model import default_model_path  # noqa: PLC0415

        return Path(default_model_path(progress=True))
    if which == "tiny-moe-256":
        from bench.tiny_moe_256 import tiny_moe_256  # noqa: PLC0415

        return tiny_moe_256()
    from tests.reference.tiny_models import tiny_model  # noqa: PLC0415

    return tiny_model("qwen3moe").gguf["f32"]


def quantize(base: Path, quant_type: str, flags: tuple[str, ...], out: Path,
             threads: int) -> Path:
    command = [str(llamacpp.tool("llama-quantize")), *flags, str(base), str(out), quant_type,
               str(threads)]
    log(f"$ {shlex.join(command)}")
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"llama-quantize {quant_type} failed:\n{result.stderr[-2000:]}")
    return out


@dataclass(frozen=True)
class FileFacts:
    size_gib: float
    bpw: float  # bits of tensor data per parameter, over every tensor (llama.cpp's "BPW")
    types: dict[str, int]  # tensor type -> tensor count
    numoe_can_run: bool


def file_facts(path: Path) -> FileFacts:
    data_bytes = params = 0
    types: Counter[str] = Counter()
    supported = True
    with open_gguf(path) as gguf:
        for tensor in gguf.tensors.values():
            data_bytes += tensor.n_bytes
            params += math.prod(tensor.shape)
            types[tensor.type_name] += 1
            supported = supported and kernels.type_supported(tensor.ggml_type)
    return FileFacts(os.path.getsize(path) / 2**30, 8 * data_bytes / params, dict(types),
                     supported)


def point_label(quant_type: str, facts: FileFacts) -> str:
    """The requested type, and what llama-quantize fell back to when every quantised tensor
    of the file is of one other type (rows narrower than a K-quant block): "Q6_K->Q8_0".
    Mixed recipes keep their name; the tensor-type column shows what they hold."""
    quantised = set(facts.types) - {"F32", "F16", "BF16"}
    if len(quantised) == 1 and quant_type not in quantised:
        return f"{quant_type}->{quantised.pop()}"
    return quant_type


def point(name: str, facts: FileFacts, ours: PerplexityRun | None,
          theirs: PerplexityRun) -> dict[str, Any]:
    """The community's fields from the primary engine (numoe when it ran), llama.cpp's aside."""
    primary = ours or theirs
    kld = primary.kld or {"kld_mean": 0.0, "kld_unc": 0.0, "same_top": 1.0}
    return {
        "name": name, "bpw": round(facts.bpw, 4), "ppl": f"{primary.ppl:.4f} +/- "
        f"{primary.ppl_unc:.4f}", "size": round(facts.size_gib, 5),
        "kld": kld["kld_mean"], "kld_unc": kld.get("kld_unc", 0.0),
        "same_top": kld["same_top"], "engine": primary.engine, "legend": primary.engine,
        "types": facts.types,
        "llamacpp": {"ppl": theirs.ppl, "ppl_unc": theirs.ppl_unc,
                     "kld": (theirs.kld or {}).get("kld_mean", 0.0),
                     "same_top": (theirs.kld or {}).get("same_top", 1.0)},
    }


def mark_duplicate(points: list[dict[str, Any]]) -> None:
    """A fallback can give the same tensors as an earlier type (Q6_K -> Q8_0): the last point
    stays in the JSON but is skipped on the chart, where its label would cover the other's."""
    last = points[-1]
    for earlier in points[:-1]:
        if (earlier["types"], earlier["bpw"], earlier["kld"]) == \
                (last["types"], last["bpw"], last["kld"]):
            last["skip"] = True
            last["same_as"] = earlier["name"]


def measure(args: argparse.Namespace, point_set: PointSet, work: Path) -> list[dict[str, Any]]:
    base = base_model(args.model)
    text = write_passage(work / "passage.txt")
    numoe_base, llama_base = work / "numoe_base.lp", work / "llamacpp_base.kld"
    base_facts = file_facts(base)
    ours_base = numoe_perplexity(base, text, args.ctx, args.chunks, args.threads, numoe_base) \
        if base_facts.numoe_can_run else None
    theirs_base = llamacpp_perplexity(base, text, args.ctx, args.chunks, args.threads, llama_base)
    points = [point(point_set.base_name, base_facts, ours_base, theirs_base)]
    for quant_type in point_set.quant_types:
        path = quantize(base, quant_type, point_set.quantize_flags,
                        work / f"{base.stem}-{quant_type}.gguf", args.threads)
        facts = file_facts(path)
        log(f"{quant_type}: {facts.size_gib:.4f} GiB, {facts.bpw:.3f} bpw, types {facts.types}, "
            f"numoe {'can' if facts.numoe_can_run else 'cannot'} run it")
        ours = numoe_kld(path, numoe_base, args.threads) \
            if facts.numoe_can_run and ours_base is not None else None
        theirs = llamacpp_kld(path, llama_base, args.ctx, args.threads)
        points.append(point(point_label(quant_type, facts), facts, ours, theirs))
        mark_duplicate(points)
        path.unlink()
    return points


def markdown(points: list[dict[str, Any]]) -> str:
    lines = ["| name | bpw | size GiB | PPL | KLD | same top | engine | tensor types | "
             "llama.cpp PPL | llama.cpp KLD |", "|---|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        types = ", ".join(f"{name} {count}" for name, count in sorted(p["types"].items()))
        name = f"{p['name']} (= {p['same_as']}, not drawn)" if p.get("skip") else p["name"]
        lines.append(f"| {name} | {p['bpw']:.3f} | {p['size']:.4f} | {p['ppl']} | "
                     f"{p['kld']:.5f} ± {p['kld_unc']:.5f} | {100 * p['same_top']:.2f}% | "
                     f"{p['engine']} | {types} | {p['llamacpp']['ppl']:.4f} | "
                     f"{p['llamacpp']['kld']:.5f} |")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(SETS), help="which point set")
    parser.add_argument("--ctx", type=int, default=256, help="perplexity -c")
    parser.add_argument("--chunks", type=int, default=16, help="perplexity --chunks")
    parser.add_argument("--threads", type=int, default=2, help="threads for both engines")
    parser.add_argument("--plot", action="store_true", help="also draw bench/pareto_<set>.png")
    args = parser.parse_args()
    for name in ("ctx", "chunks", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    return args


def main() -> None:
    args = parse_args()
    point_set = SETS[args.model]
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    with tempfile.TemporaryDirectory(prefix="quant_points_") as scratch:
        points = measure(args, point_set, Path(scratch))
    out = BENCH_DIR / f"points_{point_set.name}.json"
    out.write_text(json.dumps(points, indent=2) + "\n", encoding="utf-8")
    log(f"wrote {out}")
    if args.plot:
        chart = BENCH_DIR / f"pareto_{point_set.name}.png"
        subprocess.run([*NUMOE, "plot", "pareto", str(out), "-o", str(chart), "--y",
                        point_set.y_field, "--title", f"{point_set.name}: {point_set.y_field} "
                        f"against size (-c {args.ctx}, {args.chunks} chunks)"], check=True,
                       stdout=sys.stderr)
    print(f"`{command}`\n\n{markdown(points)}")


if __name__ == "__main__":
    main()
