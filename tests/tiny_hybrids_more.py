"""Tiny random Jamba / GraniteMoeHybrid / Falcon-H1 models built from configs (no downloads)."""

from __future__ import annotations

import torch
from transformers import (
    FalconH1Config,
    FalconH1ForCausalLM,
    GraniteMoeHybridConfig,
    GraniteMoeHybridForCausalLM,
    JambaConfig,
    JambaForCausalLM,
)

VOCAB = 128

# Layer layouts (5 layers):
#   jamba:    0 mamba/dense, 1 attn/MoE, 2 mamba/dense, 3 mamba/MoE, 4 attn/dense
#   granite:  0 mamba, 1 attn, 2 mamba, 3 mamba, 4 attn; every layer MoE + shared MLP
#   falcon_h1: every layer attention || Mamba-2, then an MLP
GRANITE_TYPES = ["mamba", "attention", "mamba", "mamba", "attention"]


def build_tiny_hybrid(family: str, seed: int = 0, **overrides):  # noqa: ANN003, ANN201
    torch.manual_seed(seed)
    if family == "jamba":
        kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=5,
                  num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                  expert_layer_period=2, expert_layer_offset=1, attn_layer_period=3, attn_layer_offset=1,
                  mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4, use_mamba_kernels=False,
                  max_position_embeddings=128, pad_token_id=0)
        model = JambaForCausalLM(JambaConfig(**{**kw, **overrides}))
    elif family == "granitemoehybrid":
        kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=24, shared_intermediate_size=40,
                  num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                  num_experts_per_tok=2, layer_types=GRANITE_TYPES, mamba_n_heads=8, mamba_n_groups=2,
                  mamba_d_state=8, mamba_d_head=8, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=8,
                  position_embedding_type="rope", max_position_embeddings=128, embedding_multiplier=1.5,
                  logits_scaling=2.0, residual_multiplier=0.7, attention_multiplier=0.3, pad_token_id=0)
        model = GraniteMoeHybridForCausalLM(GraniteMoeHybridConfig(**{**kw, **overrides}))
    elif family == "falcon_h1":
        kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, mamba_d_ssm=64, mamba_n_heads=8, mamba_d_head=8,
                  mamba_n_groups=2, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=8,
                  max_position_embeddings=128, lm_head_multiplier=0.8, embedding_multiplier=1.3,
                  mlp_multipliers=[0.9, 1.1], key_multiplier=0.7, attention_out_multiplier=0.6,
                  attention_in_multiplier=1.2, ssm_multipliers=[1.1, 0.9, 1.2, 0.8, 1.05], ssm_in_multiplier=1.1,
                  ssm_out_multiplier=0.9, pad_token_id=0)
        model = FalconH1ForCausalLM(FalconH1Config(**{**kw, **overrides}))
    else:
        raise ValueError(family)
    # Random init leaves some mixer params near-degenerate; perturb so every unit matters.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("D", "dt_bias", "norm.weight", "layernorm.weight")):
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()
