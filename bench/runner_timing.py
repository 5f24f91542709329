"""Timing of anything with ModelRunner's `forward(ids, start, logits)` contract, the way
llama-bench times its two tests (shared by compare_llamacpp.py and cluster_decode.py).

pp: one forward pass over PP pseudo-random token ids from an empty KV cache (last logits only);
tg: TG single-token decode steps from an empty KV cache. Each test starts at position 0, so the
runner overwrites its cache from the start and attends only to what this pass wrote.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Forward = Callable[..., np.ndarray]  # forward(token_ids, start, logits="last") -> logits


@dataclass
class Speed:
    """Tokens per second of one test, one value per repeat."""

    tokens: int  # tokens per repeat (PP or TG)
    samples_tok_s: list[float] = field(default_factory=list)

    @property
    def median_tok_s(self) -> float:
        return statistics.median(self.samples_tok_s)

    @property
    def mean_tok_s(self) -> float:
        return statistics.fmean(self.samples_tok_s)

    def as_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "median_tok_s": self.median_tok_s,
                "mean_tok_s": self.mean_tok_s, "samples_tok_s": self.samples_tok_s}


def random_token_ids(rng: np.random.Generator, count: int, vocab_size: int,
                     bos_id: int | None) -> list[int]:
    """llama-bench's ids: uniform over the vocabulary, the first one BOS if the model adds it."""
    ids = [int(i) for i in rng.integers(0, vocab_size, count)]
    if bos_id is not None:
        ids[0] = bos_id
    return ids


class RunnerTimer:
    def __init__(self, forward: Forward, vocab_size: int, bos_id: int | None, seed: int) -> None:
        self.forward = forward
        self.vocab_size = vocab_size
        self.bos_id = bos_id
        self.rng = np.random.default_rng(seed)

    def prompt_seconds(self, pp: int) -> float:
        ids = random_token_ids(self.rng, pp, self.vocab_size, self.bos_id)
        started = time.perf_counter()
        self.forward(ids, 0, logits="last")
        return time.perf_counter() - started

    def decode_seconds(self, tg: int) -> float:
        ids = random_token_ids(self.rng, tg, self.vocab_size, self.bos_id)
        started = time.perf_counter()
        for position, token_id in enumerate(ids):
            self.forward([token_id], position, logits="last")
        return time.perf_counter() - started

    def measure(self, pp: int, tg: int, repeats: int, log: Callable[[str], None],
                label: str) -> tuple[Speed, Speed]:
        """One warm-up of each test, then `repeats` timed runs of each (pp skipped if 0)."""
        prompt = Speed(pp)
        if pp > 0:
            log(f"  {label}: warmup prompt run")
            self.prompt_seconds(pp)
            for repeat in range(repeats):
                prompt.samples_tok_s.append(pp / self.prompt_seconds(pp))
                log(f"  {label}: prompt run {repeat + 1}/{repeats}: "
                    f"{prompt.samples_tok_s[-1]:.2f} tok/s")
        log(f"  {label}: warmup generation run")
        self.decode_seconds(1)
        decode = Speed(tg)
        for repeat in range(repeats):
            decode.samples_tok_s.append(tg / self.decode_seconds(tg))
            log(f"  {label}: generation run {repeat + 1}/{repeats}: "
                f"{decode.samples_tok_s[-1]:.2f} tok/s")
        return prompt, decode
