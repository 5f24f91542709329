"""cluster.sampling against independent references.

* transformers' logits processors (RepetitionPenalty, TopK, TopP, MinP, Temperature), applied in
  numoe's order to the same logits: same surviving tokens, probabilities within 1e-5.
* llama.cpp's penalties sampler (the only reference with presence/frequency penalties).
* Draws: reproducible per seed, inside the surviving set, frequencies close to the reference.
"""

from __future__ import annotations

import ctypes
from types import ModuleType

import numpy as np
import pytest
import torch
from transformers import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from cluster.errors import NumoeError
from cluster.sampling import Sampler, SamplingParams, apply_penalties, candidate_distribution

GEMMA3_VOCAB = 262_144


def _logits(vocab: int, scale: float, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(vocab) * scale).astype(np.float32)


def _transformers_distribution(
    logits: np.ndarray, previous: list[int], params: SamplingParams
) -> tuple[np.ndarray, np.ndarray]:
    """Surviving ids (ascending) and their probabilities, by transformers' processors in the
    order numoe documents: penalties -> top_k -> top_p -> min_p -> temperature."""
    scores = torch.from_numpy(logits.copy())[None]  # [1, vocab]
    input_ids = torch.tensor([previous or [0]], dtype=torch.long)  # [1, n]
    processors: list = []
    if params.repetition_penalty != 1.0 and previous:
        processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.top_k > 0:
        processors.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        processors.append(TopPLogitsWarper(params.top_p))
    if params.min_p > 0.0:
        processors.append(MinPLogitsWarper(params.min_p))
    processors.append(TemperatureLogitsWarper(params.temperature))
    for processor in processors:
        scores = processor(input_ids, scores)
    probs = torch.softmax(scores, dim=-1)[0].double().numpy()  # [vocab]
    survivors = np.flatnonzero(torch.isfinite(scores[0]).numpy())
    return survivors, probs[survivors]


# (params, logit scale): scale 1 gives a flat distribution over 262k tokens (top_p then needs
# a full sort), scale 4 a peaked one (top_p stops within the first partial sort).
DISTRIBUTION_CASES = [
    (SamplingParams(temperature=1.0), 3.0),
    (SamplingParams(temperature=0.7, top_k=40), 3.0),
    (SamplingParams(temperature=1.3, top_p=0.9), 1.0),
    (SamplingParams(temperature=0.6, top_p=0.9), 4.0),
    (SamplingParams(temperature=0.8, min_p=0.05), 3.0),
    (SamplingParams(temperature=1.0, repetition_penalty=1.5, top_k=100), 3.0),
    (
        SamplingParams(temperature=0.9, repetition_penalty=1.3, top_k=500, top_p=0.8, min_p=0.02),
        3.0,
    ),
]


def _previous_ids(logits: np.ndarray) -> list[int]:
    """History that matters: the 5 most likely tokens (some twice), and 3 negative-logit ones."""
    top = np.argsort(-logits)[:5].tolist()
    negative = np.flatnonzero(logits < 0)[:3].tolist()
    return [*top, top[0], *negative, top[1]]


@pytest.mark.parametrize("params,scale", DISTRIBUTION_CASES)
def test_distribution_matches_transformers(params: SamplingParams, scale: float) -> None:
    logits = _logits(GEMMA3_VOCAB, scale, seed=1)  # [vocab]
    previous = _previous_ids(logits)
    expected_ids, expected_probs = _transformers_distribution(logits, previous, params)
    ids, probs = candidate_distribution(logits, previous, params)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_allclose(probs, expected_probs, rtol=0, atol=1e-5)
    assert abs(probs.sum() - 1) < 1e-9


def test_penalties_match_llamacpp(llamacpp: ModuleType) -> None:
    vocab = 5000
    logits = _logits(vocab, 3.0, seed=2)
    previous = _previous_ids(logits) + [17, 17, 17, 4242]
    params = SamplingParams(repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.25)

    sampler = llamacpp.llama_sampler_init_penalties(
        vocab, len(previous), params.repetition_penalty,
        params.frequency_penalty, params.presence_penalty,
    )  # fmt: skip
    for token in previous:
        llamacpp.llama_sampler_accept(sampler, token)
    token_data = np.zeros(vocab, dtype=[("id", np.int32), ("logit", np.float32), ("p", np.float32)])
    token_data["id"] = np.arange(vocab)
    token_data["logit"] = logits
    candidates = llamacpp.llama_token_data_array(
        data=token_data.ctypes.data_as(ctypes.POINTER(llamacpp.llama_token_data)),
        size=vocab,
        selected=-1,
        sorted=False,
    )
    llamacpp.llama_sampler_apply(sampler, ctypes.byref(candidates))
    llamacpp.llama_sampler_free(sampler)
    assert candidates.size == vocab
    expected = np.empty(vocab, dtype=np.float32)
    expected[token_data["id"]] = token_data["logit"]

    got = apply_penalties(logits, previous, params)
    assert not np.array_equal(got, logits)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_greedy_is_penalized_argmax() -> None:
    logits = _logits(GEMMA3_VOCAB, 3.0, seed=3)
    best = int(np.argmax(logits))
    previous = [best, best]
    params = SamplingParams(temperature=0.0, repetition_penalty=10.0)
    scores = RepetitionPenaltyLogitsProcessor(10.0)(
        torch.tensor([previous]), torch.from_numpy(logits.copy())[None]
    )
    expected = int(torch.argmax(scores[0]))
    assert expected != best  # the penalty must matter for this test to mean anything
    assert Sampler(params).sample(logits, previous) == expected
    assert Sampler(SamplingParams(temperature=0.0)).sample(logits, previous) == best


def test_greedy_ties_pick_the_lowest_id() -> None:
    logits = np.zeros(100, dtype=np.float32)
    logits[[70, 9, 42]] = 5.0
    assert Sampler(SamplingParams(temperature=0.0)).sample(logits) == 9


def test_seeded_draws_are_reproducible() -> None:
    logits = _logits(GEMMA3_VOCAB, 1.5, seed=4)
    params = SamplingParams(temperature=1.0, top_k=1000, seed=1234)
    first = [Sampler(params).sample(logits) for _ in range(3)]
    one, two = Sampler(params), Sampler(params)
    sequence_one = [one.sample(logits) for _ in range(20)]
    assert sequence_one == [two.sample(logits) for _ in range(20)]
    assert len(set(sequence_one)) > 1  # a broad distribution: draws do vary within a sequence
    assert first == [sequence_one[0]] * 3
    other_seed = Sampler(SamplingParams(temperature=1.0, top_k=1000, seed=99))
    assert [other_seed.sample(logits) for _ in range(20)] != sequence_one


def test_draws_stay_in_the_surviving_set() -> None:
    logits = _logits(GEMMA3_VOCAB, 2.0, seed=5)
    params = SamplingParams(temperature=2.0, top_k=5, seed=0)
    allowed = set(np.argsort(-logits)[:5].tolist())
    sampler = Sampler(params)
    draws = {sampler.sample(logits) for _ in range(200)}
    assert draws <= allowed
    assert len(draws) == 5  # at temperature 2 all five show up in 200 draws


def test_empirical_frequencies_match_reference() -> None:
    vocab, n_draws = 64, 20_000
    logits = _logits(vocab, 1.5, seed=6)
    previous = _previous_ids(logits)
    params = SamplingParams(
        temperature=0.8, top_k=40, top_p=0.95, min_p=0.01, repetition_penalty=1.2, seed=7
    )
    expected_ids, expected_probs = _transformers_distribution(logits, previous, params)
    expected = np.zeros(vocab)
    expected[expected_ids] = expected_probs
    sampler = Sampler(params)
    counts = np.bincount(
        [sampler.sample(logits, previous) for _ in range(n_draws)], minlength=vocab
    )
    total_variation = 0.5 * np.abs(counts / n_draws - expected).sum()
    # Sampling noise alone gives E[TV] <= 0.5 * sqrt(2 * k / (pi * n)) ~ 0.016 for k = 40.
    assert total_variation < 0.03, total_variation
    assert counts[expected == 0].sum() == 0


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"temperature": -0.1}, "temperature=-0.1"),
        ({"temperature": float("nan")}, "temperature=nan"),
        ({"top_k": -1}, "top_k=-1"),
        ({"top_p": 0.0}, "top_p=0.0: must be in (0, 1]"),
        ({"top_p": 1.5}, "top_p=1.5"),
        ({"min_p": -0.1}, "min_p=-0.1: must be in [0, 1]"),
        ({"min_p": 2.0}, "min_p=2.0"),
        ({"repetition_penalty": 0.0}, "repetition_penalty=0.0: must be > 0"),
        ({"presence_penalty": float("inf")}, "presence_penalty=inf"),
        ({"seed": -3}, "seed=-3"),
    ],
)
def test_invalid_params_raise_clear_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(NumoeError) as caught:
        SamplingParams(**kwargs)
    assert message in str(caught.value)
