"""Comparison measures between a reference's logits and ours."""

from __future__ import annotations

import numpy as np

from worker.model_runner import ModelRunner


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def kl_divergence(reference: np.ndarray, ours: np.ndarray) -> np.ndarray:
    """KL(reference || ours) of the next-token distributions, per position: [T]."""
    log_p, log_q = log_softmax(reference), log_softmax(ours)
    return (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)


def max_relative_error(reference: np.ndarray, ours: np.ndarray) -> float:
    """max |ours - reference| / max |reference| over every element."""
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def top1_margin(logits: np.ndarray) -> np.ndarray:
    """Gap between the largest and second-largest logit, per position: [T]."""
    top2 = np.partition(logits, -2, axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0]


def greedy_decode(runner: ModelRunner, prompt_ids: list[int], n_new: int) -> list[int]:
    """Free-running greedy continuation through a ModelRunner: one prompt batch, then one
    decode step (T = 1, the KV-cache path) per token."""
    logits = runner.forward(prompt_ids, 0)[0]
    out: list[int] = []
    position = len(prompt_ids)
    for _ in range(n_new):
        token = int(np.argmax(logits))
        out.append(token)
        logits = runner.forward([token], position)[0]
        position += 1
    return out
