"""The Qwen3-MoE router: top-k experts per token, and their ids on an expert-parallel worker."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RouterConfig:
    n_experts_used: int  # top-k
    normalize: bool  # renormalise the top-k softmax weights to sum to 1
    scale: float  # multiplier on the routing weights


def route(router_logits: np.ndarray, config: RouterConfig) -> tuple[np.ndarray, np.ndarray]:
    """Softmax over experts, then top-k: router_logits [T, E] -> (ids int32 [T, K],
    weights float32 [T, K])."""
    k = config.n_experts_used
    probs = np.exp(router_logits - router_logits.max(axis=-1, keepdims=True))  # [T, E]
    probs /= probs.sum(axis=-1, keepdims=True)
    ids = np.argpartition(-probs, k - 1, axis=-1)[:, :k]  # [T, K], unordered top-k
    weights = np.take_along_axis(probs, ids, axis=-1)  # [T, K]
    if config.normalize:
        weights /= weights.sum(axis=-1, keepdims=True)
    if config.scale != 1.0:
        weights *= config.scale
    return ids.astype(np.int32), weights.astype(np.float32)


def local_expert_ids(expert_ids: np.ndarray, first: int, stop: int) -> np.ndarray:
    """Global expert ids [T, K] -> ids of a worker holding experts [first, stop) only: e - first
    for those, -1 ("skip this slot", see Backend.moe) for experts held elsewhere."""
    held = (expert_ids >= first) & (expert_ids < stop)  # [T, K]
    return np.where(held, expert_ids - first, -1).astype(np.int32)  # [T, K]
