"""Token sampling: turn one logits vector into the next token id.

Order of operations (llama.cpp's default chain, minus its extra samplers):

    penalties -> top_k -> top_p -> min_p -> temperature -> draw

* Penalties first, so that a penalized token can drop out of the filters below.
* Temperature last, as llama.cpp does (transformers applies it first): the set of candidate
  tokens then depends only on the model's own distribution, and temperature only reshapes the
  probabilities among the survivors. A high temperature cannot let junk from the long tail
  through top_p / min_p.
* temperature == 0 means greedy: the argmax of the penalized logits (ties -> lowest id). The
  filters are skipped because the argmax survives all of them.

Probabilities are computed in float64 so that cumulative sums over a 262k vocabulary stay exact
enough for top_p. The vocabulary is never fully sorted unless top_p needs it: top_k and the
first top_p attempt use np.argpartition.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cluster.errors import InvalidSamplingParams

# top_p first sorts only this many of the most likely candidates, growing x8 while their mass
# falls short of top_p; real distributions reach top_p = 0.95 within a few hundred tokens.
_TOP_P_FIRST_SORT = 1024


@dataclass(frozen=True)
class SamplingParams:
    """Sampling configuration. The defaults disable every filter: plain softmax sampling at
    temperature 1. Use temperature=0 for greedy decoding."""

    temperature: float = 1.0  # 0 = greedy; otherwise logits are divided by it
    top_k: int = 0  # keep the k most likely tokens (ties at the k-th kept too); 0 = off
    top_p: float = 1.0  # keep the smallest most-likely set whose mass reaches top_p; 1 = off
    min_p: float = 0.0  # keep tokens with p >= min_p * p_max; 0 = off
    repetition_penalty: float = 1.0  # CTRL-style: seen logits > 0 divided, <= 0 multiplied
    presence_penalty: float = 0.0  # OpenAI-style: subtracted once from every seen token
    frequency_penalty: float = 0.0  # OpenAI-style: subtracted once per occurrence
    seed: int | None = None  # None = fresh entropy per Sampler

    def __post_init__(self) -> None:
        _check(
            math.isfinite(self.temperature) and self.temperature >= 0,
            f"temperature={self.temperature}: must be a finite number >= 0 (0 = greedy)",
        )
        _check(
            isinstance(self.top_k, int) and self.top_k >= 0,
            f"top_k={self.top_k}: must be an integer >= 0 (0 = off)",
        )
        _check(0 < self.top_p <= 1, f"top_p={self.top_p}: must be in (0, 1] (1 = off)")
        _check(0 <= self.min_p <= 1, f"min_p={self.min_p}: must be in [0, 1] (0 = off)")
        _check(
            math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
            f"repetition_penalty={self.repetition_penalty}: must be > 0 (1 = off)",
        )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(math.isfinite(value), f"{name}={value}: must be a finite number (0 = off)")
        _check(
            self.seed is None or (isinstance(self.seed, int) and self.seed >= 0),
            f"seed={self.seed}: must be a non-negative integer or None",
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidSamplingParams(f"invalid sampling parameter {message}")


class Sampler:
    """Draws token ids from logits. Deterministic for a given seed: the same sequence of
    sample() calls returns the same sequence of ids."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self._rng = np.random.Generator(np.random.PCG64(params.seed))

    def sample(self, logits: np.ndarray, previous_token_ids: Sequence[int] = ()) -> int:
        """logits: [vocab] float; previous_token_ids: the ids the penalties count."""
        penalized = apply_penalties(logits, previous_token_ids, self.params)  # [vocab]
        if self.params.greedy:
            return int(np.argmax(penalized))  # first maximum = lowest id on ties
        token_ids, probs = _filter_and_normalize(penalized, self.params)  # [n], [n]
        # Inverse-CDF draw; searchsorted keeps it O(n) after the cumulative sum.
        cumulative = np.cumsum(probs)
        index = int(np.searchsorted(cumulative, self._rng.random() * cumulative[-1], "right"))
        return int(token_ids[min(index, len(token_ids) - 1)])


def candidate_distribution(
    logits: np.ndarray, previous_token_ids: Sequence[int], params: SamplingParams
) -> tuple[np.ndarray, np.ndarray]:
    """The distribution Sampler draws from: (token ids ascending [n] int64, probs [n] float64).
    For greedy params it is the argmax with probability 1."""
    penalized = apply_penalties(logits, previous_token_ids, params)  # [vocab]
    if params.greedy:
        return np.array([np.argmax(penalized)], dtype=np.int64), np.ones(1)
    return _filter_and_normalize(penalized, params)


def apply_penalties(
    logits: np.ndarray, previous_token_ids: Sequence[int], params: SamplingParams
) -> np.ndarray:
    """Repetition, presence and frequency penalties over the given ids; returns a new [vocab]
    float32 array (the input is never modified)."""
    if logits.ndim != 1:
        raise ValueError(f"logits must be one vector [vocab], got shape {logits.shape}")
    out = np.array(logits, dtype=np.float32)  # [vocab] copy
    no_penalty = (
        params.repetition_penalty == 1.0
        and params.presence_penalty == 0.0
        and params.frequency_penalty == 0.0
    )
    if no_penalty or len(previous_token_ids) == 0:
        return out
    seen, counts = np.unique(np.asarray(previous_token_ids, dtype=np.int64), return_counts=True)
    if seen[0] < 0 or seen[-1] >= out.shape[0]:
        raise ValueError(f"previous token ids must lie in [0, {out.shape[0]}): got {seen}")
    values = out[seen]  # [n_seen]
    if params.repetition_penalty != 1.0:
        values = np.where(
            values > 0, values / params.repetition_penalty, values * params.repetition_penalty
        )
    values -= params.presence_penalty + params.frequency_penalty * counts.astype(np.float32)
    out[seen] = values
    return out


def _filter_and_normalize(
    logits: np.ndarray, params: SamplingParams
) -> tuple[np.ndarray, np.ndarray]:
    """top_k -> top_p -> min_p -> temperature over penalized logits [vocab]; returns the
    surviving ids (ascending) and their probabilities after temperature."""
    if 0 < params.top_k < logits.shape[0]:
        token_ids = np.flatnonzero(logits >= _kth_largest(logits, params.top_k))  # [n]
        values = logits[token_ids].astype(np.float64)  # [n] candidate logits, ids ascending
    else:
        values = logits.astype(np.float64)  # [n]
        token_ids = np.arange(values.shape[0], dtype=np.int64)  # [n]

    if params.top_p < 1.0:
        keep = _top_p_mask(_softmax(values), params.top_p)
        token_ids, values = token_ids[keep], values[keep]

    if params.min_p > 0.0:
        # p / p_max = exp(logit - max_logit): no normalization needed.
        keep = np.exp(values - values.max()) >= params.min_p
        token_ids, values = token_ids[keep], values[keep]

    return token_ids, _softmax(values / params.temperature)


def _kth_largest(values: np.ndarray, k: int) -> float:
    """The k-th largest of values [n] (0 < k < n), exactly. A full partition of a 262k
    vocabulary costs milliseconds per token, so for small k it partitions only the values at
    or above the k-th largest of every 32nd one: those k sampled values are in the array,
    so at least k values pass, the k largest among them."""
    n = values.shape[0]
    stride = 32
    if n >= 64 * stride and k <= n // stride:
        sample = values[::stride]
        bound = np.partition(sample, sample.shape[0] - k)[-k]
        candidates = values[values >= bound]  # >= k of them, the k largest included
        return float(np.partition(candidates, candidates.shape[0] - k)[-k])
    return float(np.partition(values, n - k)[-k])


def _top_p_mask(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Keep a token if the mass of the tokens ranked above it is < top_p (so the token that
    crosses top_p is kept, and always at least the most likely one). probs: [n] -> mask [n]."""
    n = probs.shape[0]
    sort_size = min(_TOP_P_FIRST_SORT, n)
    while True:
        if sort_size < n:
            # The sort_size most likely, in arbitrary order, then sorted among themselves.
            head = np.argpartition(-probs, sort_size - 1)[:sort_size]
            head = head[np.argsort(-probs[head], kind="stable")]
        else:
            head = np.argsort(-probs, kind="stable")  # stable: ties -> lower id first
        cumulative = np.cumsum(probs[head])  # [sort_size]
        mass_above = np.concatenate(([0.0], cumulative[:-1]))  # [sort_size]
        # Done when the head holds the crossing token: the rest are then all cut.
        if sort_size == n or cumulative[-1] >= top_p:
            break
        sort_size = min(8 * sort_size, n)
    mask = np.zeros(n, dtype=bool)
    mask[head[mass_above < top_p]] = True
    return mask


def _softmax(values: np.ndarray) -> np.ndarray:
    exp = np.exp(values - values.max())
    return exp / exp.sum()
