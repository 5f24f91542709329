"""Model layers: attention, MoE, norms, RoPE."""
