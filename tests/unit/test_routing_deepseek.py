"""DeepSeek-V3's router (sigmoid scores, score-correction bias, group-limited top-k) against
transformers' DeepseekV3TopkRouter, the reference implementation of the HF checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

from cluster.model import ExpertGating
from worker.layers.ffn import RouterConfig, route

N_TOKENS = 64
HIDDEN = 32


def _reference_router(n_experts: int, top_k: int, n_groups: int, n_groups_used: int,
                      normalize: bool, scale: float, seed: int) -> DeepseekV3TopkRouter:
    config = DeepseekV3Config(
        hidden_size=HIDDEN, n_routed_experts=n_experts, num_experts_per_tok=top_k,
        n_group=n_groups, topk_group=n_groups_used, norm_topk_prob=normalize,
        routed_scaling_factor=scale)
    router = DeepseekV3TopkRouter(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        router.weight.copy_(torch.randn(n_experts, HIDDEN, generator=generator))
        # A bias as large as the sigmoid scores, so it really changes which experts win.
        router.e_score_correction_bias.copy_(torch.rand(n_experts, generator=generator) - 0.5)
    return router


@pytest.mark.parametrize(
    ("n_experts", "top_k", "n_groups", "n_groups_used", "normalize", "scale"),
    [
        (16, 4, 4, 2, True, 2.5),  # the tiny test model's shape
        (256, 8, 8, 4, True, 2.5),  # DeepSeek-V3 / R1
        (32, 6, 1, 1, False, 1.0),  # no grouping, no renormalisation
        (64, 8, 8, 3, False, 1.5),
    ],
)
def test_grouped_sigmoid_routing_matches_transformers(
        n_experts: int, top_k: int, n_groups: int, n_groups_used: int, normalize: bool,
        scale: float) -> None:
    router = _reference_router(n_experts, top_k, n_groups, n_groups_used, normalize, scale,
                               seed=n_experts + top_k)
    hidden = torch.randn(N_TOKENS, HIDDEN, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        logits, ref_weights, ref_ids = router(hidden)  # [T, E], [T, K], [T, K]
    config = RouterConfig(n_experts_used=top_k, normalize=normalize, scale=scale,
                          gating=ExpertGating.SIGMOID, n_expert_groups=n_groups,
                          n_expert_groups_used=n_groups_used)
    bias = router.e_score_correction_bias.numpy()  # [E]
    ids, weights = route(logits.numpy(), config, score_bias=bias)

    assert ids.shape == weights.shape == (N_TOKENS, top_k)
    ref_ids, ref_weights = ref_ids.numpy(), ref_weights.numpy()
    for token in range(N_TOKENS):  # top-k order is unspecified on both sides: compare as sets
        assert set(ids[token]) == set(ref_ids[token]), token
        ours = dict(zip(ids[token], weights[token], strict=True))
        theirs = np.array([ours[e] for e in ref_ids[token]])
        np.testing.assert_allclose(theirs, ref_weights[token], rtol=0, atol=1e-6)


def test_bias_changes_the_choice_but_not_the_weights() -> None:
    """Guards the test above against a bias too small to matter: with the bias some experts
    change, and each chosen expert's weight is its unbiased sigmoid score."""
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((N_TOKENS, 16)).astype(np.float32)
    bias = (rng.random(16) - 0.5).astype(np.float32)
    config = RouterConfig(n_experts_used=4, normalize=False, scale=1.0,
                          gating=ExpertGating.SIGMOID, n_expert_groups=4, n_expert_groups_used=2)
    ids, weights = route(logits, config, score_bias=bias)
    unbiased_ids, _ = route(logits, config)
    assert any(set(a) != set(b) for a, b in zip(ids, unbiased_ids, strict=True))
    sigmoid = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    np.testing.assert_allclose(weights, np.take_along_axis(sigmoid, ids, axis=-1), atol=1e-6)


def test_groups_limit_the_choice() -> None:
    """Every chosen expert lies in one of the n_expert_groups_used best groups."""
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((N_TOKENS, 32)).astype(np.float32)
    config = RouterConfig(n_experts_used=4, normalize=True, scale=1.0,
                          gating=ExpertGating.SIGMOID, n_expert_groups=8, n_expert_groups_used=2)
    ids, _ = route(logits, config)
    groups_per_token = {len(set(row // 4)) for row in ids}
    assert max(groups_per_token) <= 2
