"""The MoE router: top-k experts per token (Qwen3-MoE's softmax, DeepSeek-V3's grouped sigmoid),
and their ids on an expert-parallel worker."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cluster.model import ExpertGating


@dataclass(frozen=True)
class RouterConfig:
    n_experts_used: int  # top-k
    normalize: bool  # renormalise the top-k weights to sum to 1
    scale: float  # multiplier on the routing weights
    # The defaults are Qwen3-MoE's router; DeepSeek-V3 sets all three (llama.cpp build_moe_ffn).
    gating: ExpertGating = ExpertGating.SOFTMAX  # expert scores from the router logits
    n_expert_groups: int = 1  # experts split into this many equal groups; 1 = no grouping
    n_expert_groups_used: int = 1  # groups each token may pick experts from


def route(router_logits: np.ndarray, config: RouterConfig,
          score_bias: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Gate scores, then top-k: router_logits [T, E] -> (ids int32 [T, K], weights float32 [T, K]).

    `score_bias` [E] (DeepSeek-V3's e_score_correction_bias, GGUF blk.N.exp_probs_b) is a
    per-layer tensor, so it travels beside the per-model config. It only steers which experts
    are chosen; the weights are the unbiased scores of the chosen experts.
    """
    k = config.n_experts_used
    scores = _gate_scores(router_logits, config.gating)  # [T, E]
    selection = scores if score_bias is None else scores + score_bias  # [T, E]
    if config.n_expert_groups > 1:
        selection = _keep_best_groups(selection, config.n_expert_groups,
                                      config.n_expert_groups_used)
    ids = np.argpartition(-selection, k - 1, axis=-1)[:, :k]  # [T, K], unordered top-k
    weights = np.take_along_axis(scores, ids, axis=-1)  # [T, K]
    if config.normalize:
        weights /= weights.sum(axis=-1, keepdims=True)
    if config.scale != 1.0:
        weights *= config.scale
    return ids.astype(np.int32), weights.astype(np.float32)


def _gate_scores(router_logits: np.ndarray, gating: ExpertGating) -> np.ndarray:
    """router_logits [T, E] -> per-expert scores [T, E] (softmax over experts, or sigmoid)."""
    if gating is ExpertGating.SIGMOID:
        return 1.0 / (1.0 + np.exp(-router_logits))
    probs = np.exp(router_logits - router_logits.max(axis=-1, keepdims=True))  # [T, E]
    probs /= probs.sum(axis=-1, keepdims=True)
    return probs


def _keep_best_groups(selection: np.ndarray, n_groups: int, n_groups_used: int) -> np.ndarray:
    """Group-limited routing (DeepSeek-V3): a group's score is the sum of its two best expert
    scores; experts outside the `n_groups_used` best groups get -inf, so top-k never picks them.
    selection [T, E] -> masked copy [T, E]."""
    n_tokens, n_experts = selection.shape
    grouped = selection.reshape(n_tokens, n_groups, n_experts // n_groups)  # [T, G, E/G]
    best_two = np.partition(grouped, -2, axis=-1)[..., -2:]  # [T, G, 2]
    group_scores = best_two.sum(axis=-1)  # [T, G]
    kept = np.argpartition(-group_scores, n_groups_used - 1, axis=-1)[:, :n_groups_used]
    keep = np.zeros((n_tokens, n_groups), dtype=bool)  # [T, G]
    np.put_along_axis(keep, kept, True, axis=-1)
    masked = np.where(keep[:, :, None], grouped, -np.inf)  # [T, G, E/G]
    return masked.reshape(n_tokens, n_experts)


def local_expert_ids(expert_ids: np.ndarray, first: int, stop: int) -> np.ndarray:
    """Global expert ids [T, K] -> ids of a worker holding experts [first, stop) only: e - first
    for those, -1 ("skip this slot", see Backend.moe) for experts held elsewhere."""
    held = (expert_ids >= first) & (expert_ids < stop)  # [T, K]
    return np.where(held, expert_ids - first, -1).astype(np.int32)  # [T, K]
