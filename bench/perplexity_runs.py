"""Perplexity and KL-divergence runs of both engines on one text, for the issue-5 benches.

numoe runs as `numoe perplexity ... --json` (a subprocess, so its threads never overlap
llama.cpp's); llama.cpp as `llama-perplexity`, whose final lines are parsed. Both read the same
UTF-8 file: the passage of the shipped corpus that tests/models/test_perplexity.py scores (the
start of Ezekiel; Gemma has all but memorised Genesis).
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cluster import corpus  # noqa: E402 — repo root on the path first
from tests.reference import llamacpp  # noqa: E402

PASSAGE_TITLE = "The Book of the Prophet Ezekiel"
PASSAGE_CHARS = 120_000  # ~30k tokens: room for 16 chunks of 512 with any of the tokenizers
NUMOE = [sys.executable, "-m", "cluster.cli"]
_FINAL = re.compile(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)")
_MEAN_KLD = re.compile(r"Mean +KLD: +([-\d.]+) ± +([\d.]+)")
_SAME_TOP = re.compile(r"Same top p: +([\d.]+) ± +([\d.]+) %")
_PPL_Q = re.compile(r"Mean PPL\(Q\) +: +([\d.]+) ± +([\d.]+)")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def write_passage(path: Path) -> Path:
    """The shared text file: PASSAGE_CHARS characters of the corpus from Ezekiel's title."""
    text = corpus.corpus_text()
    start = text.index(PASSAGE_TITLE)
    path.write_text(text[start:start + PASSAGE_CHARS], encoding="utf-8")
    return path


@dataclass
class PerplexityRun:
    engine: str  # "numoe" or "llama.cpp"
    command: list[str]
    ppl: float
    ppl_unc: float
    wall_s: float  # the whole command, model load included
    kld: dict[str, float] = field(default_factory=dict)  # kld_mean, kld_unc, same_top, ...


def _run(command: list[str], timeout_s: float) -> tuple[str, float]:
    log(f"$ {shlex.join(command)}")
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        tail = (result.stdout + result.stderr)[-3000:]
        raise SystemExit(f"{command[0]} failed (exit {result.returncode}):\n{tail}")
    return result.stdout + "\n" + result.stderr, wall


def isa_flags(isa: str | None) -> list[str]:
    """numoe's --isa flag, when a kernel instruction set is forced."""
    return [] if isa is None else ["--isa", isa]


def numoe_perplexity(model: Path, text: Path, ctx: int, chunks: int, threads: int,
                     save_logits: Path | None = None, isa: str | None = None,
                     timeout_s: float = 3600) -> PerplexityRun:
    command = [*NUMOE, "perplexity", str(model), "-f", str(text), "-c", str(ctx), "--chunks",
               str(chunks), "-t", str(threads), "--json", *isa_flags(isa)]
    if save_logits is not None:
        command += ["--save-logits", str(save_logits)]
    output, wall = _run(command, timeout_s)
    data = json.loads(output[output.index("{"):output.rindex("}") + 1])
    return PerplexityRun("numoe", command, data["ppl"], data["ppl_unc"], wall)


def numoe_kld(model: Path, base: Path, threads: int, timeout_s: float = 3600) -> PerplexityRun:
    """KLD of `model` against a numoe --save-logits base; ppl is the model's own PPL."""
    command = [*NUMOE, "perplexity", str(model), "--kl-divergence-base", str(base),
               "--kl-divergence", "-t", str(threads), "--json"]
    output, wall = _run(command, timeout_s)
    data = json.loads(output[output.index("{"):output.rindex("}") + 1])
    kld = data["kld"]
    return PerplexityRun("numoe", command, kld["ppl"], kld["ppl_unc"], wall, kld)


def llamacpp_perplexity(model: Path, text: Path, ctx: int, chunks: int, threads: int,
                        save_base: Path | None = None, timeout_s: float = 3600) -> PerplexityRun:
    """llama-perplexity; with save_base it also writes its own KLD base file."""
    command = [str(llamacpp.tool("llama-perplexity")), "-m", str(model), "-f", str(text),
               "-c", str(ctx), "--chunks", str(chunks), "-t", str(threads)]
    if save_base is not None:
        command += ["--kl-divergence-base", str(save_base)]
    output, wall = _run(command, timeout_s)
    found = _FINAL.search(output)
    if not found:
        raise SystemExit(f"no final estimate in llama-perplexity's output:\n{output[-2000:]}")
    return PerplexityRun("llama.cpp", command, float(found.group(1)), float(found.group(2)),
                         wall)


def llamacpp_kld(model: Path, base: Path, ctx: int, threads: int,
                 timeout_s: float = 3600) -> PerplexityRun:
    """llama-perplexity --kl-divergence against its own base file (the same chunks)."""
    command = [str(llamacpp.tool("llama-perplexity")), "-m", str(model), "-c", str(ctx),
               "-t", str(threads), "--kl-divergence-base", str(base), "--kl-divergence"]
    output, wall = _run(command, timeout_s)
    ppl, mean, top = _PPL_Q.search(output), _MEAN_KLD.search(output), _SAME_TOP.search(output)
    if not (ppl and mean and top):
        raise SystemExit(f"no KLD report in llama-perplexity's output:\n{output[-2000:]}")
    kld = {"kld_mean": float(mean.group(1)), "kld_unc": float(mean.group(2)),
           "same_top": float(top.group(1)) / 100, "same_top_unc": float(top.group(2)) / 100}
    return PerplexityRun("llama.cpp", command, float(ppl.group(1)), float(ppl.group(2)), wall,
                         kld)
