"""Free-running greedy agreement with llama.cpp, and how much llama.cpp agrees with itself.

    python bench/greedy_agreement.py [MODEL.gguf] [--n-new 32] [--threads 2] [--numpy]
                                     [--kv-cache-dtype float16]

The reference is llama.cpp run exactly as tests/models/test_gemma3.py runs it (n_ctx 512, the
binding's defaults: f16 KV cache, flash attention off, n_batch 512): the prompt in one batch,
then one token per decode step, always the argmax. Each row continues the same 10 prompts
(tests.models.texts.GREEDY_PROMPTS, tokenized by llama.cpp so tokenization is not a factor)
for N_NEW tokens and is compared with the reference's continuation:
- llama.cpp, reference settings again: must agree completely (the run is deterministic);
- llama.cpp with the prompt fed one token at a time;
- llama.cpp with n_batch = n_ubatch = 4;
- numoe, CPU backend: Engine.generate with temperature 0, the path users run;
- numoe, numpy reference backend (float32, with --numpy; ~2 s per decode step on 2 cores).
The two middle llama.cpp rows change only how it batches the prompt, so they measure how far its
own rounding noise moves a greedy continuation: the bar any other engine can be held to.

Columns: prompts whose N_NEW tokens are all identical, prompts whose first 8 are identical, the
mean position of the first differing token (N_NEW where none differs), and the mean next-token
KL(reference || row) over the first 256 tokens of tests.models.texts.KL_TEXT, each row's
logits computed with its own batching (the reference's in one batch). A continuation ends at
its first end-of-generation token (numoe's engine stops there), so two continuations that end
together agree.

Prints a markdown table for bench/RESULTS.md on stdout, headed by the command; progress on stderr.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cluster.engine import Engine  # noqa: E402 — repo root on the path first
from cluster.gguf import open_gguf  # noqa: E402
from cluster.sampling import SamplingParams  # noqa: E402
from cluster.tokenizer import Tokenizer  # noqa: E402
from tests.models.metrics import kl_divergence  # noqa: E402
from tests.models.texts import GREEDY_PROMPTS, KL_TEXT  # noqa: E402
from tests.reference import llamacpp  # noqa: E402

DEFAULT_MODEL = Path.home() / ".cache" / "numoe" / "models" / "gemma-3-270m-q4_k_m.gguf"
N_CTX = 512  # as tests/models/test_gemma3.py
KL_TOKENS = 256  # as tests/models/test_gemma3.py
FIRST_K = 8  # the "first tokens" column: the short-horizon agreement
SMALL_BATCH = 4  # n_batch = n_ubatch of the small-batch llama.cpp row

Continuation = list[int]  # generated token ids, [n_new] or fewer when it ended early
# (prompt ids, n_new) -> continuation, and token ids -> next-token logits [T, vocab].
Generator = Callable[[list[int], int], Continuation]
LogitsFn = Callable[[list[int]], np.ndarray]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class RowResult:
    name: str
    first_divergences: list[int] = field(default_factory=list)  # per prompt; n_new = none
    mean_kl: float = float("nan")

    def identical(self, n_tokens: int) -> int:
        """Prompts whose first n_tokens generated tokens all agree with the reference."""
        return sum(position >= n_tokens for position in self.first_divergences)


# --- llama.cpp --------------------------------------------------------------------------------


def make_llama(model: Path, threads: int, small_batch: bool = False) -> Any:
    """llama.cpp as the test fixture configures it; small_batch splits every eval into
    SMALL_BATCH-token batches (logical and physical)."""
    extra = {"n_batch": SMALL_BATCH, "n_ubatch": SMALL_BATCH} if small_batch else {}
    return llamacpp.bindings().Llama(model_path=str(model), logits_all=True, n_ctx=N_CTX,
                                     n_threads=threads, verbose=False, **extra)


def llama_feed(llama: Any, token_ids: Sequence[int], one_by_one: bool) -> None:
    """Evaluate token_ids from an empty cache: in llama's n_batch batches, or one at a time."""
    llama.reset()
    if one_by_one:
        for token_id in token_ids:
            llama.eval([token_id])
    else:
        llama.eval(list(token_ids))


def llama_generator(llama: Any, one_by_one: bool) -> Generator:
    def generate(prompt_ids: list[int], n_new: int) -> Continuation:
        llama_feed(llama, prompt_ids, one_by_one)
        tokens: Continuation = []
        for _ in range(n_new):
            token = int(np.argmax(llama.scores[llama.n_tokens - 1]))
            tokens.append(token)
            llama.eval([token])
        return tokens

    return generate


def llama_logits_fn(llama: Any, one_by_one: bool) -> LogitsFn:
    def logits(token_ids: list[int]) -> np.ndarray:
        llama_feed(llama, token_ids, one_by_one)
        return np.array(llama.scores[: len(token_ids)], dtype=np.float64)  # [T, vocab]

    return logits


# --- numoe ------------------------------------------------------------------------------------


def numoe_generator(engine: Engine) -> Generator:
    def generate(prompt_ids: list[int], n_new: int) -> Continuation:
        generation = engine.generate(prompt_ids, max_tokens=n_new,
                                     sampling=SamplingParams(temperature=0))
        for _ in generation:  # runs it; the text pieces are not needed
            pass
        return list(generation.token_ids)

    return generate


def numoe_logits_fn(engine: Engine) -> LogitsFn:
    def logits(token_ids: list[int]) -> np.ndarray:
        return engine.runner.forward(token_ids, 0, logits="all")  # [T, vocab]

    return logits


# --- comparison -------------------------------------------------------------------------------


def until_stop(tokens: Continuation, stop_ids: frozenset[int]) -> Continuation:
    """The continuation up to and including its first end-of-generation token."""
    for index, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[: index + 1]
    return tokens


def first_divergence(reference: Continuation, other: Continuation, n_new: int,
                     stop_ids: frozenset[int]) -> int:
    """Index of the first generated token that differs; n_new when none does."""
    ours, theirs = until_stop(other, stop_ids), until_stop(reference, stop_ids)
    for index, (a, b) in enumerate(zip(theirs, ours, strict=False)):
        if a != b:
            return index
    # Equal prefixes end together: both at the same end-of-generation token, or both at n_new.
    return n_new


def measure_row(name: str, generate: Generator, logits: LogitsFn,
                prompts: list[list[int]], reference: list[Continuation],
                kl_ids: list[int], reference_kl_logits: np.ndarray, n_new: int,
                stop_ids: frozenset[int]) -> RowResult:
    started = time.perf_counter()
    row = RowResult(name)
    for prompt_ids, expected in zip(prompts, reference, strict=True):
        row.first_divergences.append(
            first_divergence(expected, generate(prompt_ids, n_new), n_new, stop_ids))
    row.mean_kl = float(kl_divergence(reference_kl_logits, logits(kl_ids)).mean())
    log(f"  {name}: first divergences {row.first_divergences}, KL {row.mean_kl:.5f} "
        f"({time.perf_counter() - started:.1f} s)")
    return row


def markdown(command: str, model: Path, threads: int, n_new: int,
             rows: list[RowResult]) -> str:
    n_prompts = len(rows[0].first_divergences)
    first_k = min(FIRST_K, n_new)
    lines = [
        f"`{command}`",
        "",
        f"Model {model.name}, {threads} threads, {n_prompts} prompts "
        f"(tests.models.texts.GREEDY_PROMPTS, llama.cpp's tokens), {n_new} greedy tokens each. "
        f"Reference: llama.cpp as the Gemma 3 test runs it (n_ctx {N_CTX}, f16 KV cache, flash "
        f"attention off, prompt in one batch, then one token per step). KL: mean next-token "
        f"KL(reference || row) over the first {KL_TOKENS} tokens of KL_TEXT.",
        "",
        f"| row | {n_new}/{n_new} identical | first {first_k} identical | mean first divergence "
        f"| mean KL | first divergence per prompt |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.name} | {row.identical(n_new)}/{n_prompts} | "
            f"{row.identical(first_k)}/{n_prompts} | {np.mean(row.first_divergences):.1f} | "
            f"{row.mean_kl:.4f} | {' '.join(map(str, row.first_divergences))} |"
        )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, nargs="?", default=DEFAULT_MODEL,
                        help=f"GGUF model file (default: {DEFAULT_MODEL})")
    parser.add_argument("--n-new", type=int, default=32, help="greedy tokens per prompt")
    parser.add_argument("--threads", type=int, default=2, help="threads for both engines")
    parser.add_argument("--numpy", action="store_true",
                        help="add the numpy reference backend row (slow: ~2 s per decode "
                        "step, over 12 minutes at --n-new 32)")
    parser.add_argument("--kv-cache-dtype", choices=["float32", "float16"], default=None,
                        help="numoe's KV cache type (default: the backend's activation type)")
    args = parser.parse_args()
    if not args.model.is_file():
        parser.error(f"model file {args.model} does not exist; pass the path of a .gguf file")
    if args.n_new < 1 or args.threads < 1:
        parser.error("--n-new and --threads must be at least 1")
    if args.n_new + 64 > N_CTX:
        parser.error(f"--n-new {args.n_new} leaves too little of the {N_CTX}-token context "
                     f"for the prompts; use at most {N_CTX - 64}")
    return args


def main() -> None:
    args = parse_args()
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    n_new, threads = args.n_new, args.threads

    log(f"llama.cpp reference: n_ctx {N_CTX}, {threads} threads, binding defaults")
    reference_llama = make_llama(args.model, threads)
    prompts = [list(reference_llama.tokenize(text.encode(), add_bos=True, special=True))
               for text in GREEDY_PROMPTS]
    kl_ids = list(reference_llama.tokenize(KL_TEXT.encode(), add_bos=True,
                                           special=True))[:KL_TOKENS]
    reference_generate = llama_generator(reference_llama, one_by_one=False)
    reference = [reference_generate(prompt_ids, n_new) for prompt_ids in prompts]
    reference_kl_logits = llama_logits_fn(reference_llama, one_by_one=False)(kl_ids)  # [256, V]

    with open_gguf(args.model) as gguf:
        stop_ids = Tokenizer.from_gguf(gguf).end_of_generation_ids
    rows: list[RowResult] = []

    def measure(name: str, generate: Generator, logits: LogitsFn) -> None:
        log(f"{name} ...")
        rows.append(measure_row(name, generate, logits, prompts, reference, kl_ids,
                                reference_kl_logits, n_new, stop_ids))

    # First: a deterministic reference must reproduce itself, or no row below means anything.
    measure("llama.cpp, reference settings again", reference_generate,
            llama_logits_fn(reference_llama, one_by_one=False))
    measure("llama.cpp, prompt fed one token at a time",
            llama_generator(reference_llama, one_by_one=True),
            llama_logits_fn(reference_llama, one_by_one=True))
    del reference_llama
    small_batch_llama = make_llama(args.model, threads, small_batch=True)
    measure(f"llama.cpp, n_batch = n_ubatch = {SMALL_BATCH}",
            llama_generator(small_batch_llama, one_by_one=False),
            llama_logits_fn(small_batch_llama, one_by_one=False))
    del small_batch_llama

    kv_note = f", {args.kv_cache_dtype} KV cache" if args.kv_cache_dtype else ""
    for backend in ["cpu", "numpy"] if args.numpy else ["cpu"]:
        with Engine(args.model, backend=backend, n_threads=threads, n_ctx=N_CTX,
                    kv_cache_dtype=args.kv_cache_dtype) as engine:
            label = "CPU backend" if backend == "cpu" else "numpy reference backend (float32)"
            measure(f"numoe, {label}{kv_note}", numoe_generator(engine), numoe_logits_fn(engine))

    print(markdown(command, args.model, threads, n_new, rows))

if __name__ == "__main__":
    main()
