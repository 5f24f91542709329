"""numoe against llama.cpp on one GGUF, same threads: two comparisons.

    python bench/compare_llamacpp.py sweep MODEL.gguf [...]   # sweep-bench PP/TG at KV depths
                                                              # and perplexity, with ratios
                                                              # (bench/compare_sweep.py)
    python bench/compare_llamacpp.py MODEL.gguf [--threads 2] [--pp 64] [--tg 32] [--repeats 5]
                                     [--json]                 # llama-bench pp/tg + roofline

The second, described here: end-to-end prompt and decode speed against llama-bench.

Both engines run llama-bench's two tests on the same model and thread count:
- pp: one forward pass over PP tokens from an empty KV cache (logits of the last token only);
- tg: TG single-token decode steps from an empty KV cache (logits every step).
Token ids are pseudo-random (BOS first where the model adds one), as llama-bench draws them.
Each engine warms up once (a full pp pass, one decode step), then repeats each test REPEATS
times; the figure is the median of the per-repeat tok/s.

llama.cpp runs first as a subprocess (`llama-bench -o json`), so its threads never overlap ours;
numoe runs in this process through Engine's ModelRunner (timing wraps `forward` only: no
tokenizer, no sampling). The decode roofline is read bandwidth (native read_probe over 1 GiB,
same threads, measured here) divided by the weight bytes one token reads (bench/roofline.py).

Prints a markdown table for bench/RESULTS.md (or JSON with --json) on stdout, progress on stderr.
Speeds at growing KV depths (sweep-bench) and perplexity side by side: bench/compare_sweep.py.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.roofline import (  # noqa: E402
    DecodeTraffic,
    decode_traffic,
    measure_read_bandwidth_gbs,
    roofline_tokens_per_s,
)
from bench.runner_timing import RunnerTimer, Speed  # noqa: E402 — repo root on the path first
from cluster.engine import Engine  # noqa: E402
from cluster.gguf import open_gguf  # noqa: E402
from cluster.model import load_model_spec  # noqa: E402
from native import kernels  # noqa: E402
from tests.reference import llamacpp  # noqa: E402

SEED = 1234  # token ids are drawn from np.random.default_rng(SEED)
BANDWIDTH_BUFFER_GIB = 1.0
BANDWIDTH_SAMPLES = 5


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class EngineResult:
    name: str
    prompt: Speed  # the pp test
    decode: Speed  # the tg test
    details: dict[str, Any] = field(default_factory=dict)  # build, ISA, load time


# --- llama.cpp ----------------------------------------------------------------------------


def run_llama_bench(model: Path, threads: int, pp: int, tg: int, repeats: int) -> EngineResult:
    command = [str(llamacpp.tool("llama-bench")), "-m", str(model), "-t", str(threads),
               "-p", str(pp), "-n", str(tg), "-r", str(repeats), "-o", "json", "--progress"]
    log(f"llama.cpp: {shlex.join(command)}")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log_lines = []
    assert process.stderr is not None and process.stdout is not None
    for line in process.stderr:  # llama-bench's own progress lines; the rest is load logging
        log_lines.append(line)
        if line.startswith("llama-bench:"):
            log(f"  {line.rstrip()}")
    stdout = process.stdout.read()
    if process.wait() != 0:
        tail = "".join(log_lines[-20:])
        raise SystemExit(f"llama-bench failed (exit {process.returncode}):\n{tail}")
    tests = json.loads(stdout)  # one object per test, pp and tg
    prompt_test = next(t for t in tests if t["n_prompt"] > 0 and t["n_gen"] == 0)
    decode_test = next(t for t in tests if t["n_gen"] > 0 and t["n_prompt"] == 0)
    details = {"build_commit": prompt_test["build_commit"], "cpu_info": prompt_test["cpu_info"],
               "model_type": prompt_test["model_type"], "repack": prompt_test.get("repack"),
               "avg_tok_s": {"pp": prompt_test["avg_ts"], "tg": decode_test["avg_ts"]}}
    return EngineResult(
        "llama.cpp",
        Speed(pp, [float(v) for v in prompt_test["samples_ts"]]),
        Speed(tg, [float(v) for v in decode_test["samples_ts"]]),
        details,
    )


# --- numoe --------------------------------------------------------------------------------


def run_numoe(model: Path, threads: int, pp: int, tg: int, repeats: int,
              isa: str | None) -> EngineResult:
    log(f"numoe: loading {model.name} (cpu backend, {threads} threads)")
    engine = Engine(model, backend="cpu", n_threads=threads, n_ctx=max(pp, tg), isa=isa)
    runner = engine.runner
    if max(pp, tg) > runner.n_ctx:
        raise SystemExit(f"--pp/--tg of {max(pp, tg)} tokens exceed the model's context of "
                         f"{runner.n_ctx}; pass smaller values")
    tokenizer = engine.tokenizer
    bos_id = tokenizer.bos_id if tokenizer.add_bos else None
    vocab_size = engine.config.vocab_size
    timer = RunnerTimer(runner.forward, vocab_size, bos_id, SEED)
    prompt, decode = timer.measure(pp, tg, repeats, log, "numoe")
    details = {"isa": kernels.get_isa(), "load_s": engine.load_seconds}
    engine.close()
    return EngineResult("numoe", prompt, decode, details)


# --- report -------------------------------------------------------------------------------


@dataclass
class Comparison:
    command: str
    model: Path
    architecture: str
    threads: int
    llamacpp: EngineResult
    numoe: EngineResult
    traffic: DecodeTraffic
    bandwidth_gbs: float

    @property
    def roofline_tok_s(self) -> float:
        return roofline_tokens_per_s(self.bandwidth_gbs, self.traffic)

    def as_dict(self) -> dict[str, Any]:
        engines = {}
        for result in (self.llamacpp, self.numoe):
            engines[result.name] = {
                "pp": result.prompt.as_dict(), "tg": result.decode.as_dict(),
                "tg_fraction_of_roofline": result.decode.median_tok_s / self.roofline_tok_s,
                **result.details,
            }
        return {
            "command": self.command,
            "model": str(self.model),
            "architecture": self.architecture,
            "threads": self.threads,
            "engines": engines,
            "numoe_over_llamacpp": {
                "pp": self.numoe.prompt.median_tok_s / self.llamacpp.prompt.median_tok_s,
                "tg": self.numoe.decode.median_tok_s / self.llamacpp.decode.median_tok_s,
            },
            "roofline": {
                "read_bandwidth_gbs": self.bandwidth_gbs,
                "weight_bytes_per_token": self.traffic.total_bytes,
                **asdict(self.traffic),
                "tg_tok_s": self.roofline_tok_s,
            },
        }

    def markdown(self) -> str:
        pp, tg = self.numoe.prompt.tokens, self.numoe.decode.tokens
        roofline = self.roofline_tok_s
        traffic = self.traffic
        llama, ours = self.llamacpp, self.numoe
        lines = [
            f"`{self.command}`",
            "",
            f"Model {self.model.name} ({self.architecture}), {self.threads} threads, numoe ISA "
            f"{ours.details['isa']}, llama.cpp {llama.details['build_commit']} (weight repacking "
            f"{'on' if llama.details['repack'] else 'off'}); medians of "
            f"{len(ours.prompt.samples_tok_s)} repeats. Decode roofline: read bandwidth "
            f"{self.bandwidth_gbs:.1f} GB/s / {traffic.total_bytes / 1e6:.1f} MB of weights per "
            f"token (dense {traffic.dense_bytes / 1e6:.1f}, experts "
            f"{traffic.expert_bytes / 1e6:.1f}, embedding {traffic.embedding_bytes / 1e6:.1f}) = "
            f"{roofline:.1f} tok/s.",
            "",
            f"| engine | pp{pp} tok/s | tg{tg} tok/s | pp numoe/llama.cpp | tg numoe/llama.cpp "
            f"| tg roofline tok/s | tg fraction of roofline |",
            "|---|---|---|---|---|---|---|",
        ]
        for result in (llama, ours):
            lines.append(
                f"| {result.name} | {result.prompt.median_tok_s:.2f} | "
                f"{result.decode.median_tok_s:.2f} | "
                f"{result.prompt.median_tok_s / llama.prompt.median_tok_s:.2f} | "
                f"{result.decode.median_tok_s / llama.decode.median_tok_s:.2f} | "
                f"{roofline:.1f} | {result.decode.median_tok_s / roofline:.2f} |"
            )
        return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="GGUF model file")
    parser.add_argument("--threads", type=int, default=2, help="threads for both engines")
    parser.add_argument("--pp", type=int, default=64, help="prompt tokens per pp run")
    parser.add_argument("--tg", type=int, default=32, help="decode steps per tg run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per test")
    parser.add_argument("--isa", choices=["scalar", "avx2", "avx512"], default=None,
                        help="numoe kernel ISA (default: the widest this CPU has)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    args = parser.parse_args()
    if not args.model.is_file():
        parser.error(f"model file {args.model} does not exist; pass the path of a .gguf file")
    for name in ("threads", "pp", "tg", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    return args


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "sweep":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import compare_sweep  # noqa: PLC0415

        sys.argv = [str(Path(compare_sweep.__file__)), *sys.argv[2:]]
        compare_sweep.main()
        return
    args = parse_args()
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    with open_gguf(args.model) as gguf:
        config, tensors = load_model_spec(gguf)
        traffic = decode_traffic(config, tensors)

    llama = run_llama_bench(args.model, args.threads, args.pp, args.tg, args.repeats)
    log(f"read bandwidth: read_probe over {BANDWIDTH_BUFFER_GIB:g} GiB, {args.threads} threads")
    bandwidth_gbs = measure_read_bandwidth_gbs(args.threads, BANDWIDTH_BUFFER_GIB,
                                               BANDWIDTH_SAMPLES)
    log(f"  {bandwidth_gbs:.1f} GB/s")
    ours = run_numoe(args.model, args.threads, args.pp, args.tg, args.repeats, args.isa)

    comparison = Comparison(command, args.model, config.architecture, args.threads, llama, ours,
                            traffic, bandwidth_gbs)
    if args.json:
        print(json.dumps(comparison.as_dict(), indent=2))
    else:
        print(comparison.markdown())


if __name__ == "__main__":
    main()
