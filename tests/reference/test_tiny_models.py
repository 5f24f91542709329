"""The tiny reference models are right: llama.cpp, reading the GGUF files that its own converter
wrote, agrees with transformers, reading the saved Hugging Face model. This validates the
reference path (weights, metadata, tokenizer) independently of numoe.

Tolerances are relative to max |logit| of the reference, per position:
* F32: 1e-5 at every position (measured ~5e-7; llama.cpp runs with an F32 KV cache here,
  its default F16 cache alone costs ~5e-4).
* F16 / Q8_0: weight rounding perturbs the router input, and with 16 experts the 4th and 5th
  router logits are sometimes close enough that a position picks a different expert set (seen
  once in 16 positions for F16: 4e-2 at that position, 7e-4 elsewhere). So most positions must
  be tight and every position loose; a wrong conversion (transposed, missing norm, wrong rope)
  gives errors of order 1 everywhere.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np
import pytest

from tests.reference import llamacpp as reference_llamacpp
from tests.reference.tiny_models import (
    TinyModel,
    reference_greedy,
    reference_logits,
    tokenizer,
)

TEXT = "The quick brown fox jumps over the lazy dog. Mixture-of-experts models route tokens"
N_GREEDY = 16

# kind -> (bound for the typical position (median), bound for every position)
TOLERANCES = {
    "f32": (1e-5, 1e-5),
    "f16": (3e-3, 1e-1),
    "q8_0": (4e-2, 1.5e-1),
}


def _prompt_ids(model: TinyModel) -> list[int]:
    return tokenizer(model)(TEXT).input_ids


@pytest.fixture(scope="module", params=["qwen3moe", "qwen3"])
def model(request: pytest.FixtureRequest) -> TinyModel:
    return request.getfixturevalue(f"tiny_{request.param}")


@pytest.mark.parametrize("kind", ["f32", "f16", "q8_0"])
def test_llamacpp_logits_match_transformers(
    model: TinyModel, kind: str, llamacpp: ModuleType
) -> None:
    ids = _prompt_ids(model)
    expected = reference_logits(model, ids)  # [T, vocab]
    got = reference_llamacpp.logits(model.gguf[kind], ids)  # [T, vocab]
    assert got.shape == expected.shape
    scale = np.abs(expected).max()
    per_position = np.abs(got - expected).max(axis=1) / scale  # [T]
    typical_bound, every_bound = TOLERANCES[kind]
    assert np.median(per_position) <= typical_bound, per_position
    assert per_position.max() <= every_bound, per_position
    if kind == "f32":
        np.testing.assert_array_equal(got.argmax(axis=1), expected.argmax(axis=1))


def test_logits_are_not_flat(model: TinyModel) -> None:
    """The weight scaling keeps the reference meaningful: logits spread well beyond rounding
    noise, and the model's output depends on the context (not a function of one token)."""
    ids = _prompt_ids(model)
    logits = reference_logits(model, ids)  # [T, vocab]
    assert logits.std(axis=1).min() > 0.3
    shifted = reference_logits(model, [ids[0] + 1, *ids[1:]])
    assert np.abs(shifted[-1] - logits[-1]).max() > 0.1 * np.abs(logits[-1]).max()


def test_greedy_tokens_match_for_f32(model: TinyModel, llamacpp: ModuleType) -> None:
    prompt = _prompt_ids(model)[:6]
    expected = reference_greedy(model, prompt, N_GREEDY)
    assert len(expected) == N_GREEDY
    assert reference_llamacpp.greedy(model.gguf["f32"], prompt, N_GREEDY) == expected


def test_reference_greedy_agrees_with_full_forward(model: TinyModel) -> None:
    """generate() (KV cache) and one full forward over the result pick the same tokens."""
    prompt = _prompt_ids(model)[:6]
    generated = reference_greedy(model, prompt, 8)
    logits = reference_logits(model, prompt + generated)  # [T, vocab]
    assert logits[len(prompt) - 1 : -1].argmax(axis=1).tolist() == generated


def test_gguf_tokenizer_matches_transformers(model: TinyModel, llamacpp: ModuleType) -> None:
    llm = reference_llamacpp.load_model(model.gguf["q8_0"], n_ctx=32)
    hf_tokenizer = tokenizer(model)
    for text in [TEXT, "  spaces\tand\nnewlines  ", "numbers 1234567 and ünïcödé 日本語 🙂"]:
        expected = hf_tokenizer(text).input_ids
        assert llm.tokenize(text.encode(), add_bos=False) == expected, text
