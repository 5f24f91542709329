"""Feed-forward blocks: the dense gated FFN and the Qwen3-MoE router + routed experts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from worker.backends.base import Activation, Backend


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


def moe_block(
    backend: Backend,
    x: np.ndarray,
    router: np.ndarray,
    gate: Any,
    up: Any,
    down: Any,
    config: RouterConfig,
    activation: Activation,
) -> np.ndarray:
    """x [T, H] -> routed experts' weighted sum [T, H]; one backend call for all experts."""
    router_logits = x @ router.T  # [T, H] @ [H, E] -> [T, E]
    expert_ids, expert_weights = route(router_logits, config)
    return backend.moe(x, expert_ids, expert_weights, gate, up, down, activation)
