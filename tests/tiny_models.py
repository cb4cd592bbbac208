"""Tiny random models of each supported family, built from configs (no downloads)."""

from __future__ import annotations

import torch
from transformers import (
    FalconMambaConfig,
    FalconMambaForCausalLM,
    Mamba2Config,
    Mamba2ForCausalLM,
    MambaConfig,
    MambaForCausalLM,
)

VOCAB = 128


def build_tiny(family: str, num_layers: int = 4, seed: int = 0, vocab_size: int = VOCAB, **overrides):  # noqa: ANN003, ANN201
    torch.manual_seed(seed)
    if family == "mamba":
        cfg = MambaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=num_layers, state_size=8,
                          expand=2, **overrides)
        model = MambaForCausalLM(cfg)
    elif family == "falcon_mamba":
        cfg = FalconMambaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=num_layers, state_size=8,
                                expand=2, **overrides)
        model = FalconMambaForCausalLM(cfg)
    elif family == "mamba2":
        cfg = Mamba2Config(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=num_layers, num_heads=8,
                           head_dim=8, state_size=16, n_groups=2, expand=2, chunk_size=8, **overrides)
        model = Mamba2ForCausalLM(cfg)
    else:
        raise ValueError(family)
    # Random init leaves some mixer params near-degenerate; perturb so every unit matters.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("D", "dt_bias", "norm.weight")):
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()
