"""`numoe perplexity`: llama-perplexity's method, and its KL-divergence mode.

    numoe perplexity [MODEL.gguf] [-f TEXT] [-c 512] [-b 2048] [--chunks N] [-t N]
    numoe perplexity MODEL --save-logits base.lp --chunks 8        # a base run for KLD
    numoe perplexity QUANT --kl-divergence-base base.lp --kl-divergence

The method is llama.cpp's (tools/perplexity/perplexity.cpp, perplexity()): the whole text is
tokenized once (BOS first when the model adds one), cut into chunks of n_ctx tokens (at least
two chunks' worth is required), and each chunk runs from an empty KV cache with its first token
replaced by BOS when the model adds BOS. Only the second half is scored: positions
first = n_ctx/2 .. n_ctx-2, each predicting the token after it, so every scored token has at
least n_ctx/2 tokens of context. Running values print as [1]x,[2]y,...; the final line is
`Final estimate: PPL = X +/- Y` with llama.cpp's uncertainty, PPL * sqrt(var(nll) / (N-1)).

Without a text file the corpus shipped with numoe is used (cluster/corpus.py). The KLD file
format is in cluster/kl_divergence.py. llama.cpp's flag meanings hold: --kl-divergence-base
FILE alone saves the base run (as --save-logits FILE does), with --kl-divergence it compares.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cluster.errors import NumoeError
from cluster.run_args import (
    RunTarget,
    add_compute_arguments,
    add_model_arguments,
    run_target,
)

if TYPE_CHECKING:
    from cluster.engine import Engine, Runner
    from cluster.kl_divergence import LogProbHeader

DEFAULT_CTX = 512  # llama-perplexity's default -c
DEFAULT_BATCH = 2048  # llama.cpp's default -b


@dataclass
class NllSums:
    """Negative log-likelihood sums over the scored tokens (llama.cpp's nll, nll2, count)."""

    total: float = 0.0
    squares: float = 0.0
    count: int = 0

    def add(self, nll: np.ndarray) -> None:
        self.total += float(nll.sum())
        self.squares += float((nll * nll).sum())
        self.count += len(nll)

    @property
    def ppl(self) -> float:
        return math.exp(self.total / self.count)

    @property
    def ppl_uncertainty(self) -> float:
        mean = self.total / self.count
        variance = self.squares / self.count - mean * mean
        if variance <= 0 or self.count < 2:
            return 0.0
        return math.sqrt(variance / (self.count - 1)) * self.ppl


def chunk_logits(runner: Runner, chunk: np.ndarray, n_batch: int,
                 bos_id: int | None) -> np.ndarray:
    """Logits float32 [n_ctx - 1 - first, vocab] at the scored positions of one chunk.

    The chunk runs from position 0 (a fresh sequence: the KV cache is overwritten) in calls of
    at most n_batch tokens; a call is also cut at `first`, so the first half costs no LM head."""
    n_ctx = len(chunk)
    first = n_ctx // 2
    ids = np.array(chunk, np.int64)  # [n_ctx]
    if bos_id is not None:
        ids[0] = bos_id  # llama.cpp: "add BOS token for the first batch of each chunk"
    scored: list[np.ndarray] = []
    start = 0
    while start < n_ctx:
        end = min(start + n_batch, n_ctx)
        if start < first < end:
            end = first
        if end <= first:
            runner.forward(ids[start:end], start, logits="last")  # only fills the KV cache
        else:
            scored.append(np.asarray(runner.forward(ids[start:end], start, logits="all"),
                                     np.float32))  # [end - start, vocab]
        start = end
    return np.concatenate(scored)[:-1]  # the last position predicts beyond the chunk


def check_ctx(n_ctx: int, model_ctx: int | None = None) -> None:
    if n_ctx < 4 or n_ctx % 2:
        raise NumoeError(f"-c/--ctx-size {n_ctx}: perplexity needs an even context of at least "
                         f"4 tokens (the second half of each chunk is scored); try -c 512")
    if model_ctx is not None and n_ctx > model_ctx:
        raise NumoeError(f"-c/--ctx-size {n_ctx} is more than the model's context "
                         f"({model_ctx} tokens); give -c {model_ctx} or less")


def text_tokens(engine: Engine, text_file: str | None) -> tuple[np.ndarray, str]:
    """The evaluated text as token ids (llama.cpp's common_tokenize(text, add_special=true,
    parse_special=false)), and a name for it."""
    if text_file is None:
        from cluster import corpus  # noqa: PLC0415

        text, name = corpus.corpus_text(), corpus.NAME
    else:
        path = Path(text_file)  # its existence was checked before the model loaded
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise NumoeError(f"-f {text_file} is not UTF-8 text ({error.reason} at byte "
                             f"{error.start})") from None
        name = str(path)
    ids = engine.tokenizer.encode(text, add_special=True, parse_special=False)
    return np.asarray(ids, np.int32), name


def run_perplexity(args: argparse.Namespace) -> int:
    from cluster.kl_divergence import (  # noqa: PLC0415
        TABLE_HEADER,
        KLDStats,
        LogProbHeader,
        LogProbWriter,
        chunk_line,
        log_softmax,
        print_report,
        read_log_probs,
        summary,
    )

    save_path, base_path = _check_args(args)
    target = run_target(args)  # the shared flags, checked before the base file is read
    model_path = target.model_path
    compare = args.kl_divergence
    base = read_log_probs(base_path) if compare else None  # checked before the model loads
    engine = _open_engine(target, base[0].n_ctx if base else args.ctx_size)
    err = sys.stderr
    out = sys.stderr if args.json else sys.stdout  # --json: stdout holds only the JSON
    writer: LogProbWriter | None = None
    try:
        vocab = engine.config.vocab_size
        if base is not None:
            header, tokens, base_log_probs = base
            tokens = _base_tokens(args, engine, header, tokens, base_path)
        else:
            tokens = _text_chunks(args, engine)
        n_chunk, n_ctx = tokens.shape
        first = n_ctx // 2
        n_batch = min(args.batch_size, n_ctx)
        tokenizer = engine.tokenizer
        bos_id = tokenizer.bos_id if tokenizer.add_bos else None
        if save_path is not None:
            writer = LogProbWriter(save_path, LogProbHeader(
                n_ctx=n_ctx, n_vocab=vocab, n_chunk=n_chunk, first=first,
                model=model_path.name), tokens)
            print(f"numoe: saving log-probabilities to {save_path} "
                  f"({4 * vocab * (n_ctx - 1 - first) * n_chunk / 2**20:.0f} MiB)", file=err)
        print(f"numoe: calculating perplexity over {n_chunk} chunks, n_ctx={n_ctx}, "
              f"batch_size={n_batch}", file=err)
        sums, kld = NllSums(), KLDStats()
        started = time.perf_counter()
        for chunk in range(n_chunk):
            logits = chunk_logits(engine.runner, tokens[chunk], n_batch, bos_id)
            log_probs = log_softmax(logits)  # [n_ctx - 1 - first, vocab]
            del logits
            targets = tokens[chunk, first + 1:].astype(np.int64)  # what each position predicts
            sums.add(-log_probs[np.arange(len(targets)), targets].astype(np.float64))
            if writer is not None:
                writer.write_chunk(log_probs)
            if chunk == 0:
                seconds = time.perf_counter() - started
                print(f"numoe: {seconds:.2f} seconds per pass - ETA "
                      f"{seconds * n_chunk / 60:.2f} minutes", file=err)
                if base is not None:
                    print(TABLE_HEADER, file=out)
            if base is not None:
                kld.add_chunk(log_probs, np.asarray(base_log_probs[chunk]), targets)
                print(chunk_line(chunk + 1, kld), file=out, flush=True)
            else:
                print(f"[{chunk + 1}]{sums.ppl:.4f},", end="", file=out, flush=True)
        print(file=out)
        result: dict[str, object] = {"model": str(model_path), "n_ctx": n_ctx,
                                     "n_chunk": n_chunk, "tokens_scored": sums.count,
                                     "ppl": sums.ppl, "ppl_unc": sums.ppl_uncertainty}
        if base is None:
            print(f"Final estimate: PPL = {sums.ppl:.4f} +/- {sums.ppl_uncertainty:.5f}",
                  file=out)
        elif kld.count < 100:
            print(f"numoe: only {kld.count} tokens scored; llama.cpp reports KLD statistics "
                  f"from 100 on (give more --chunks or a larger -c)", file=err)
        else:
            print_report(kld, out)
        if base is not None and kld.count:
            result["kld"] = summary(kld)
        if args.json:
            print(json.dumps(result, indent=2))
    finally:
        if writer is not None:
            writer.close()
        engine.close()
    return 0


def _base_tokens(args: argparse.Namespace, engine: Engine, header: LogProbHeader,
                 tokens: np.ndarray, base_path: str) -> np.ndarray:
    """The chunks a KLD run scores, int32 [n_chunk, n_ctx]: the base run's own tokens."""
    vocab = engine.config.vocab_size
    if header.n_vocab != vocab:
        raise NumoeError(f"{base_path} was saved with a {header.n_vocab}-token vocabulary "
                         f"({header.model}), this model has {vocab}; KLD compares models that "
                         f"share one vocabulary")
    if args.ctx_size is not None and args.ctx_size != header.n_ctx:
        raise NumoeError(f"{base_path} was saved with -c {header.n_ctx}; give the same -c or "
                         f"leave -c out")
    check_ctx(header.n_ctx, engine.n_ctx)
    n_chunk = header.n_chunk if args.chunks is None else min(args.chunks, header.n_chunk)
    print(f"numoe: KLD against {base_path} ({header.model}): {n_chunk} chunks, "
          f"n_ctx={header.n_ctx}", file=sys.stderr)
    return tokens[:n_chunk]


def _text_chunks(args: argparse.Namespace, engine: Engine) -> np.ndarray:
    """The chunks a perplexity run scores, int32 [n_chunk, n_ctx]: the text, tokenized."""
    n_ctx = args.ctx_size or DEFAULT_CTX
    check_ctx(n_ctx, engine.config.context_length)
    started = time.perf_counter()
    ids, text_name = text_tokens(engine, args.file)
    print(f"numoe: tokenized {text_name}: {len(ids)} tokens in "
          f"{time.perf_counter() - started:.2f} s", file=sys.stderr)
    if len(ids) < 2 * n_ctx:
        raise NumoeError(f"the text tokenizes to {len(ids)} tokens; perplexity with -c {n_ctx} "
                         f"needs at least {2 * n_ctx} (two chunks, as llama-perplexity); give a "
                         f"longer text or a smaller -c")
    n_chunk_max = len(ids) // n_ctx
    n_chunk = n_chunk_max if args.chunks is None else min(args.chunks, n_chunk_max)
    return ids[:n_chunk * n_ctx].reshape(n_chunk, n_ctx)


def _check_args(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """(file to save log-probs to, base file to compare with); flag errors."""
    if args.batch_size < 1:
        raise NumoeError(f"-b/--batch-size {args.batch_size} must be at least 1 token")
    if args.chunks is not None and args.chunks < 1:
        raise NumoeError(f"--chunks {args.chunks} must be at least 1 (leave it out for all)")
    if args.file is not None and not Path(args.file).is_file():
        raise NumoeError(f"-f {args.file}: no such text file; give a UTF-8 text file, or "
                         f"leave -f out to use the shipped corpus")
    if args.ctx_size is not None:
        check_ctx(args.ctx_size)  # before the model loads; its own limit is checked after
    save, base = args.save_logits, args.kl_divergence_base
    if args.kl_divergence:
        if base is None:
            raise NumoeError("--kl-divergence needs --kl-divergence-base FILE, a base run saved "
                             "with --save-logits FILE")
        if save is not None:
            raise NumoeError("--save-logits and --kl-divergence: save the base run first, then "
                             "compare in a second run")
        if args.file is not None:
            raise NumoeError("--kl-divergence scores the tokens stored in the base file; leave "
                             "-f out")
    elif base is not None:  # llama.cpp: --kl-divergence-base FILE alone saves the base run
        if save is not None and save != base:
            raise NumoeError("--save-logits and --kl-divergence-base name two files; give one")
        save = base
    return save, base if args.kl_divergence else None


def _open_engine(target: RunTarget, n_ctx: int | None) -> Engine:
    from cluster.engine import Engine  # noqa: PLC0415

    # The KV cache needs one chunk; an odd or tiny -c is refused later with a clearer message.
    return Engine(target.model_path, backend=target.backend, n_threads=target.threads,
                  n_ctx=max(n_ctx or DEFAULT_CTX, 1), isa=target.isa,
                  runner_factory=target.runner_factory)


def add_perplexity_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "perplexity", help="perplexity of a model over a text, or its KL-divergence from a "
                           "base run, as llama-perplexity measures them",
        description="llama-perplexity's method: chunks of -c tokens, each scored on its second "
                    "half. Results on stdout, progress on stderr.",
    )
    add_model_arguments(parser)
    parser.add_argument("-f", "--file", default=None, metavar="FILE",
                        help="UTF-8 text to evaluate (default: the shipped corpus, the King "
                             "James Bible)")
    parser.add_argument("-c", "--ctx-size", type=int, default=None,
                        help=f"tokens per chunk (default: {DEFAULT_CTX}; with --kl-divergence, "
                             f"the base file's)")
    parser.add_argument("-b", "--batch-size", type=int, default=DEFAULT_BATCH,
                        help="tokens per forward call within a chunk (default: %(default)s)")
    parser.add_argument("--chunks", type=int, default=None, metavar="N",
                        help="evaluate the first N chunks only (default: all)")
    parser.add_argument("--save-logits", default=None, metavar="FILE",
                        help="save the log-probabilities of every scored token (float32, whole "
                             "vocabulary) as a KLD base")
    parser.add_argument("--kl-divergence-base", default=None, metavar="FILE",
                        help="the base run's file: saved to when given alone (as llama.cpp), "
                             "compared with under --kl-divergence")
    parser.add_argument("--kl-divergence", action="store_true",
                        help="report the KL-divergence from the base run, its percentiles and "
                             "top-token agreement")
    parser.add_argument("--json", action="store_true",
                        help="print the results as JSON on stdout (the table goes to stderr)")
    add_compute_arguments(parser)
    parser.set_defaults(handler=run_perplexity)
