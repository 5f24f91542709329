"""KL-divergence of a model against a saved base run, reported as llama-perplexity's KLD mode.

The base run's log-probabilities are stored exactly, in float32 over the whole vocabulary (a
quantized or top-k store would bias the small KLDs that separate good quants), so a model
compared with its own file gives KLD 0 exactly. The price is size: 4 bytes * vocab per scored
token, (n_ctx/2 - 1) scored tokens per chunk (Gemma 3's 262k vocab: 1 MiB per token, 127 MiB per
512-token chunk); keep the base run to a few chunks with --chunks.

File format (numoe log-prob file, version 1; all little-endian):

    offset 0   8 bytes   magic b"NUMOELP1"
    offset 8   uint32    H, the length of the JSON header
    offset 12  H bytes   JSON: {"n_ctx", "n_vocab", "n_chunk", "first", "model"}
    then       int32     tokens [n_chunk, n_ctx]: the evaluated text, as tokenized (BOS not yet
                         substituted into each chunk's first position)
    then       float32   log_probs [n_chunk, n_ctx - 1 - first, n_vocab]: natural log-softmax
                         at positions first .. n_ctx - 2 of each chunk (each predicts the next)
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, TextIO

import numpy as np

from cluster.errors import NumoeError

MAGIC = b"NUMOELP1"
_KLD_ROWS = 16


@dataclass(frozen=True)
class LogProbHeader:
    n_ctx: int
    n_vocab: int
    n_chunk: int
    first: int  # the first scored position of each chunk (n_ctx // 2)
    model: str  # the base model's file name, for messages

    @property
    def scored_per_chunk(self) -> int:
        return self.n_ctx - 1 - self.first


class LogProbWriter:
    """Streams a base run to FILE: the header and tokens at once, then one chunk at a time."""

    def __init__(self, path: str | Path, header: LogProbHeader, tokens: np.ndarray) -> None:
        self.path = Path(path)
        self.header = header
        try:
            self._file: BinaryIO = open(self.path, "wb")  # noqa: SIM115 — closed in close()
        except OSError as error:
            raise NumoeError(f"cannot write the log-prob file {self.path}: "
                             f"{error.strerror}") from None
        meta = json.dumps(vars(header)).encode()
        self._file.write(MAGIC + struct.pack("<I", len(meta)) + meta)
        self._file.write(np.ascontiguousarray(tokens, "<i4").tobytes())  # [n_chunk, n_ctx]

    def write_chunk(self, log_probs: np.ndarray) -> None:
        """log_probs: float32 [scored_per_chunk, n_vocab]."""
        self._file.write(np.ascontiguousarray(log_probs, "<f4").tobytes())

    def close(self) -> None:
        self._file.close()


def read_log_probs(path: str | Path) -> tuple[LogProbHeader, np.ndarray, np.ndarray]:
    """(header, tokens int32 [n_chunk, n_ctx], log_probs float32 [n_chunk, scored, n_vocab])
    of a base run; log_probs is memory-mapped, not read."""
    path = Path(path)
    if not path.is_file():
        raise NumoeError(f"KLD base file {path} does not exist; make one first with "
                         f"`numoe perplexity MODEL --save-logits {path}`")
    with open(path, "rb") as file:
        start = file.read(12)
        if len(start) < 12 or start[:8] != MAGIC:
            raise NumoeError(f"{path} is not a numoe log-prob file (written by numoe perplexity "
                             f"--save-logits); llama.cpp's --kl-divergence-base files differ")
        (header_len,) = struct.unpack("<I", start[8:])
        try:
            header = LogProbHeader(**json.loads(file.read(header_len)))
        except (ValueError, TypeError) as error:
            raise NumoeError(f"{path}: damaged header ({error})") from None
    tokens_offset = 12 + header_len
    log_probs_offset = tokens_offset + 4 * header.n_chunk * header.n_ctx
    expected = log_probs_offset + 4 * header.n_chunk * header.scored_per_chunk * header.n_vocab
    if path.stat().st_size != expected:
        raise NumoeError(f"{path} holds {path.stat().st_size} bytes, its header promises "
                         f"{expected}; the file is truncated or damaged: save it again")
    tokens = np.fromfile(path, "<i4", header.n_chunk * header.n_ctx, offset=tokens_offset)
    log_probs = np.memmap(path, "<f4", "r", log_probs_offset,
                         (header.n_chunk, header.scored_per_chunk, header.n_vocab))
    return header, tokens.reshape(header.n_chunk, header.n_ctx), log_probs


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float32 [T, vocab] log-probabilities; the normaliser summed in float64 as llama.cpp does."""
    top = logits.max(axis=1, keepdims=True)  # [T, 1]
    shifted = logits - top  # [T, vocab]
    log_sum = np.log(np.exp(shifted).sum(axis=1, dtype=np.float64, keepdims=True))  # [T, 1]
    return (shifted - log_sum).astype(np.float32)


@dataclass
class KLDStats:
    """Running sums over scored tokens, as llama.cpp's kl_divergence_result."""

    nll: list[float] = field(default_factory=list)  # -log p(token) under the model
    nll_base: list[float] = field(default_factory=list)  # ... under the base
    kld: list[float] = field(default_factory=list)  # KL(base || model) per token
    p_diff: list[float] = field(default_factory=list)  # p(token) - p_base(token)
    same_top: int = 0  # tokens whose most likely next token is the same in both

    @property
    def count(self) -> int:
        return len(self.kld)

    def add_chunk(self, log_probs: np.ndarray, base: np.ndarray, targets: np.ndarray) -> None:
        """log_probs, base: float32 [T, vocab]; targets: int [T], the tokens that followed."""
        rows = np.arange(len(targets))
        kld = np.empty(len(targets))  # [T]
        for a in range(0, len(targets), _KLD_ROWS):  # row blocks bound the float64 temporaries
            block = base[a:a + _KLD_ROWS].astype(np.float64)  # [rows, vocab]
            # sum_v p_base (log p_base - log p): exactly 0 when the two runs are identical.
            kld[a:a + _KLD_ROWS] = (np.exp(block) * (block - log_probs[a:a + _KLD_ROWS])).sum(1)
        nll = -log_probs[rows, targets].astype(np.float64)  # [T]
        nll_base = -base[rows, targets].astype(np.float64)  # [T]
        self.nll.extend(nll.tolist())
        self.nll_base.extend(nll_base.tolist())
        self.kld.extend(kld.tolist())
        self.p_diff.extend((np.exp(-nll) - np.exp(-nll_base)).tolist())
        self.same_top += int((log_probs.argmax(axis=1) == base.argmax(axis=1)).sum())


def _mean_and_uncertainty(values: list[float]) -> tuple[float, float]:
    """llama.cpp's mean_and_uncertainty: the mean and its standard error (0 under 11 values)."""
    count = len(values)
    if count < 1:
        return 0.0, 0.0
    array = np.asarray(values, np.float64)
    mean = float(array.mean())
    variance = float((array * array).mean()) - mean * mean
    return mean, math.sqrt(variance / (count - 1)) if variance > 0 and count > 10 else 0.0


def _covariance(a: list[float], b: list[float]) -> float:
    count = len(a)
    if count < 10:
        return 0.0
    x, y = np.asarray(a), np.asarray(b)
    return float((x * y).mean() - x.mean() * y.mean()) / (count - 1)


def _percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """llama.cpp's linear interpolation between neighbouring sorted values."""
    position = fraction * (len(sorted_values) - 1)
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    weight = position - low
    return float((1 - weight) * sorted_values[low] + weight * sorted_values[high])


def same_top_fraction(stats: KLDStats) -> tuple[float, float]:
    share = stats.same_top / stats.count
    spread = math.sqrt(share * (1 - share) / (stats.count - 1)) if stats.count > 1 else 0.0
    return share, spread


def chunk_line(chunk: int, stats: KLDStats) -> str:
    """One row of llama.cpp's per-chunk KLD table."""
    log_ppl, log_ppl_unc = _mean_and_uncertainty(stats.nll)
    log_base, log_base_unc = _mean_and_uncertainty(stats.nll_base)
    cov = _covariance(stats.nll, stats.nll_base)
    ratio_unc = math.sqrt(max(log_ppl_unc ** 2 + log_base_unc ** 2 - 2 * cov, 0.0))
    kld, kld_unc = _mean_and_uncertainty(stats.kld)
    p_mse, p_mse_unc = _mean_and_uncertainty([d * d for d in stats.p_diff])
    p_rms = math.sqrt(p_mse)
    p_rms_unc = 0.5 / p_rms * p_mse_unc if p_rms > 0 else 0.0
    top, top_unc = same_top_fraction(stats)
    return (f"{chunk:4d}    {math.exp(log_ppl):9.4f} ± {math.exp(log_ppl) * log_ppl_unc:9.4f}"
            f"    {log_ppl - log_base:10.5f} ± {ratio_unc:10.5f}"
            f"    {kld:10.5f} ± {kld_unc:10.5f}"
            f"    {100 * p_rms:6.3f} ± {100 * p_rms_unc:6.3f} %"
            f"    {100 * top:6.3f} ± {100 * top_unc:6.3f} %")


TABLE_HEADER = ("chunk             PPL               ln(PPL(Q)/PPL(base))          "
                "KL Divergence              Δp RMS            Same top p")


def summary(stats: KLDStats) -> dict[str, float]:
    """The final figures as a flat dict (the --json output and the printed report)."""
    log_ppl, log_ppl_unc = _mean_and_uncertainty(stats.nll)
    log_base, log_base_unc = _mean_and_uncertainty(stats.nll_base)
    kld, kld_unc = _mean_and_uncertainty(stats.kld)
    p_diff, p_diff_unc = _mean_and_uncertainty(stats.p_diff)
    top, top_unc = same_top_fraction(stats)
    klds = np.sort(np.asarray(stats.kld))
    out = {"count": stats.count,
           "ppl": math.exp(log_ppl), "ppl_unc": math.exp(log_ppl) * log_ppl_unc,
           "ppl_base": math.exp(log_base), "ppl_base_unc": math.exp(log_base) * log_base_unc,
           "ln_ppl_ratio": log_ppl - log_base,
           "kld_mean": kld, "kld_unc": kld_unc,
           "kld_max": float(klds[-1]), "kld_median": float(np.median(klds)),
           "kld_min": float(klds[0]),
           "p_diff_mean": p_diff, "p_diff_unc": p_diff_unc,
           "same_top": top, "same_top_unc": top_unc}
    for label, fraction in KLD_PERCENTILES:
        out[f"kld_{label}"] = _percentile(klds, fraction)
    return out


KLD_PERCENTILES = (("99.9", 0.999), ("99.0", 0.990), ("95.0", 0.950), ("90.0", 0.900),
                   ("10.0", 0.100), ("5.0", 0.050), ("1.0", 0.010), ("0.1", 0.001))


def print_report(stats: KLDStats, out: TextIO) -> None:
    """llama-perplexity's closing KLD report (its three sections, same labels)."""
    s = summary(stats)
    print("====== Perplexity statistics ======", file=out)
    print(f"Mean PPL(Q)                   : {s['ppl']:10.6f} ± {s['ppl_unc']:10.6f}", file=out)
    print(f"Mean PPL(base)                : {s['ppl_base']:10.6f} ± {s['ppl_base_unc']:10.6f}",
          file=out)
    log_ppl_unc = s["ppl_unc"] / s["ppl"]
    log_base_unc = s["ppl_base_unc"] / s["ppl_base"]
    cov = _covariance(stats.nll, stats.nll_base)
    if log_ppl_unc > 0 and log_base_unc > 0:
        print(f"Cor(ln(PPL(Q)), ln(PPL(base))): {100 * cov / (log_ppl_unc * log_base_unc):6.2f}%",
              file=out)
    ratio_unc = math.sqrt(max(log_ppl_unc ** 2 + log_base_unc ** 2 - 2 * cov, 0.0))
    ratio = math.exp(s["ln_ppl_ratio"])
    print(f"Mean ln(PPL(Q)/PPL(base))     : {s['ln_ppl_ratio']:10.6f} ± {ratio_unc:10.6f}",
          file=out)
    print(f"Mean PPL(Q)/PPL(base)         : {ratio:10.6f} ± {ratio * ratio_unc:10.6f}", file=out)
    print(file=out)
    print("====== KL divergence statistics ======", file=out)
    print(f"Mean    KLD: {s['kld_mean']:10.6f} ± {s['kld_unc']:10.6f}", file=out)
    print(f"Maximum KLD: {s['kld_max']:10.6f}", file=out)
    for label in ("99.9", "99.0", "95.0", "90.0"):
        print(f"{label + '%':<8}KLD: {s['kld_' + label]:10.6f}", file=out)
    print(f"Median  KLD: {s['kld_median']:10.6f}", file=out)
    for label in ("10.0", "5.0", "1.0", "0.1"):
        print(f"{label + '%':>5}   KLD: {s['kld_' + label]:10.6f}", file=out)
    print(f"Minimum KLD: {s['kld_min']:10.6f}", file=out)
    print(file=out)
    print("====== Token probability statistics ======", file=out)
    print(f"Mean    Δp: {100 * s['p_diff_mean']:6.3f} ± {100 * s['p_diff_unc']:5.3f} %",
          file=out)
    p_diffs = np.sort(np.asarray(stats.p_diff))
    print(f"Maximum Δp: {100 * p_diffs[-1]:6.3f}%", file=out)
    for label, fraction in P_DIFF_PERCENTILES:
        name = "Median " if fraction == 0.5 else f"{label + '%':>5}  "
        print(f"{name} Δp: {100 * _percentile(p_diffs, fraction):6.3f}%", file=out)
    print(f"Minimum Δp: {100 * p_diffs[0]:6.3f}%", file=out)
    mse, mse_unc = _mean_and_uncertainty([d * d for d in stats.p_diff])
    rms_unc = 0.5 / math.sqrt(mse) * mse_unc if mse > 0 else 0.0
    print(f"RMS Δp    : {100 * math.sqrt(mse):6.3f} ± {100 * rms_unc:5.3f} %", file=out)
    print(f"Same top p: {100 * s['same_top']:6.3f} ± {100 * s['same_top_unc']:5.3f} %", file=out)


P_DIFF_PERCENTILES = (("99.9", 0.999), ("99.0", 0.990), ("95.0", 0.950), ("90.0", 0.900),
                      ("75.0", 0.750), ("50.0", 0.5), ("25.0", 0.250), ("10.0", 0.100),
                      ("5.0", 0.050), ("1.0", 0.010), ("0.1", 0.001))
