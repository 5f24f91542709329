"""An exact reference for a Gemma 3 GGUF: transformers' Gemma3ForCausalLM (float64, eager
attention) holding the file's weights dequantized by gguf-py.

It checks numoe's forward pass semantics (sliding windows, RoPE bases, norms, GeGLU, embedding
scale) independently of both numoe and llama.cpp. The only mapping done here is undoing
llama.cpp's converter, which stores Gemma's RMSNorm weights as (1 + w).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cluster.gguf import open_gguf
from worker.backends.base import WeightData
from worker.backends.numpy_ref import dequantize_tensor

_LAYER_TENSORS = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def load_hf_gemma3(path: Path, sliding_window: int | None = None) -> Any:
    """The model in `path`; `sliding_window` overrides the file's window (to test masking with
    short texts)."""
    import torch  # noqa: PLC0415 — heavy, test-only
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig  # noqa: PLC0415

    gguf = open_gguf(path)
    meta = gguf.metadata

    def weight(name: str) -> Any:
        info = gguf.tensors[name]
        data = WeightData(name, info.ggml_type, info.shape, gguf.tensor_data(name))
        return torch.from_numpy(dequantize_tensor(data).astype(np.float64))

    n_layers = int(meta["gemma3.block_count"])
    head_dim = int(meta["gemma3.attention.key_length"])
    config = Gemma3TextConfig(
        vocab_size=gguf.tensors["token_embd.weight"].shape[0],
        hidden_size=int(meta["gemma3.embedding_length"]),
        intermediate_size=int(meta["gemma3.feed_forward_length"]),
        num_hidden_layers=n_layers,
        num_attention_heads=int(meta["gemma3.attention.head_count"]),
        num_key_value_heads=int(meta["gemma3.attention.head_count_kv"]),
        head_dim=head_dim,
        query_pre_attn_scalar=head_dim,
        rms_norm_eps=float(meta["gemma3.attention.layer_norm_rms_epsilon"]),
        sliding_window=sliding_window or int(meta["gemma3.attention.sliding_window"]),
        max_position_embeddings=int(meta["gemma3.context_length"]),
        # Gemma 3's published pattern: five local layers, then one global.
        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                     for i in range(n_layers)],
        rope_parameters={
            "full_attention": {"rope_theta": float(meta["gemma3.rope.freq_base"]),
                               "rope_type": "default"},
            "sliding_attention": {"rope_theta": 10_000.0, "rope_type": "default"},
        },
        final_logit_softcapping=None,
        tie_word_embeddings=True,
        attn_implementation="eager",
    )
    model = Gemma3ForCausalLM(config).to(torch.float64).eval()
    state = {"model.embed_tokens.weight": weight("token_embd.weight"),
             "model.norm.weight": weight("output_norm.weight") - 1.0}
    for layer in range(n_layers):
        for hf_name, gguf_name in _LAYER_TENSORS.items():
            value = weight(f"blk.{layer}.{gguf_name}.weight")
            if hf_name.endswith("norm"):
                value = value - 1.0  # the converter stored 1 + w
            state[f"model.layers.{layer}.{hf_name}.weight"] = value
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True)
    gguf.close()
    return model


def hf_logits(model: Any, token_ids: list[int]) -> np.ndarray:
    """[T, vocab] float64 logits for every position."""
    import torch  # noqa: PLC0415

    with torch.no_grad():
        out = model(torch.tensor([token_ids]), use_cache=False)
    return out.logits[0].numpy()
