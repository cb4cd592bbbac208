"""Helpers for the data / evaluation / hub tests: tiny models that read the bundled tokenizer's ids."""

from __future__ import annotations

import torch

from hf_shedder.data import CalibrationSet, load_tokenizer
from tests.tiny_models import build_tiny

NEOX_VOCAB = 50304  # >= len(bundled GPT-NeoX tokenizer) = 50277, padded as the Mamba checkpoints do


def neox_tiny(family: str = "mamba", num_layers: int = 2, seed: int = 0) -> torch.nn.Module:
    """A tiny random causal LM whose vocabulary covers the bundled tokenizer (for lm-eval / text tests)."""
    model = build_tiny(family, num_layers=num_layers, seed=seed, vocab_size=NEOX_VOCAB)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 0
    return model


def tokenizer():  # noqa: ANN201
    return load_tokenizer()


def random_calib(n: int = 6, seqlen: int = 24, vocab: int = 128, seed: int = 0) -> CalibrationSet:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, seqlen), generator=g)
    return CalibrationSet(ids, torch.ones_like(ids), source="random", seed=seed)
