"""Tiny random hybrid SSM/attention models (Zamba2, Bamba, Nemotron-H), built from configs (no downloads).

Shapes are chosen so that every structural case is exercised: several Mamba-2 groups (``n_groups=2``),
grouped-query attention (2 query heads per KV head; Zamba2 uses multi-head attention because its per-use
k/v adapters only fit that), two shared Zamba2 blocks with per-use adapters.
"""

from __future__ import annotations

import torch
from transformers import (
    BambaConfig,
    BambaForCausalLM,
    NemotronHConfig,
    NemotronHForCausalLM,
    Zamba2Config,
    Zamba2ForCausalLM,
)

VOCAB = 128
HYBRID_FAMILIES = ("zamba2", "bamba", "nemotron_h")


def _perturb(model: torch.nn.Module) -> None:
    # Random init leaves D/dt_bias/norm weights at constants; perturb so every unit and head matters.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("D", "dt_bias", "A_log", "norm.weight", "layernorm.weight")):
                p.add_(0.3 * torch.randn_like(p))


def build_tiny_hybrid(family: str, seed: int = 0, **overrides):  # noqa: ANN003, ANN201
    torch.manual_seed(seed)
    if family == "zamba2":
        kw = dict(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=6,
            layers_block_type=["mamba", "hybrid", "mamba", "hybrid", "mamba", "hybrid"],
            mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_ngroups=2, n_mamba_heads=4,
            num_attention_heads=4, num_key_value_heads=4, intermediate_size=48, num_mem_blocks=2,
            use_shared_attention_adapter=True, adapter_rank=4, use_mem_rope=True, chunk_size=8,
            use_mamba_kernels=False, max_position_embeddings=64, pad_token_id=0,
        )
        kw.update(overrides)
        model = Zamba2ForCausalLM(Zamba2Config(**kw))
    elif family == "bamba":
        kw = dict(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=5, attn_layer_indices=[1, 3],
            num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
            mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=2, mamba_d_state=8, mamba_d_conv=4,
            mamba_expand=2, mamba_chunk_size=8, max_position_embeddings=64, pad_token_id=0,
        )
        kw.update(overrides)
        model = BambaForCausalLM(BambaConfig(**kw))
    elif family == "nemotron_h":
        kw = dict(
            vocab_size=VOCAB, hidden_size=32,
            layers_block_type=["mamba", "mlp", "attention", "mamba", "moe", "attention", "mlp"],
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=48,
            mamba_num_heads=8, mamba_head_dim=8, n_groups=2, ssm_state_size=8, conv_kernel=4, chunk_size=8,
            n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
            moe_shared_expert_intermediate_size=16, n_group=1, topk_group=1,
            max_position_embeddings=64, pad_token_id=0,
        )
        kw.update(overrides)
        model = NemotronHForCausalLM(NemotronHConfig(**kw))
    else:
        raise ValueError(family)
    _perturb(model)
    return model.eval()


def build_tiny_nemotron_moe(seed: int = 0, **overrides):  # noqa: ANN003, ANN201
    """Tiny Nemotron-H whose MoE layers use the grouped router: 8 experts in n_group=2 groups of 4, tokens
    routed to num_experts_per_tok=2 experts of the topk_group=1 best group, plus a shared expert."""
    torch.manual_seed(seed)
    kw = dict(
        vocab_size=VOCAB, hidden_size=32, layers_block_type=["mamba", "moe", "attention", "moe", "mlp"],
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=48,
        mamba_num_heads=8, mamba_head_dim=8, n_groups=2, ssm_state_size=8, conv_kernel=4, chunk_size=8,
        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, moe_shared_expert_intermediate_size=16,
        n_group=2, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5,
        max_position_embeddings=64, pad_token_id=0,
    )
    kw.update(overrides)
    model = NemotronHForCausalLM(NemotronHConfig(**kw))
    _perturb(model)
    with torch.no_grad():  # init leaves router logits near 0 and the correction bias at 0: make routing vary
        for name, p in model.named_parameters():
            if name.endswith(("gate.weight", "experts.up_proj", "experts.down_proj")):
                p.normal_(0.0, 0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.3)
    return model.eval()
