"""Shared fixtures: tiny random models built from configs; the network is never reached."""

from __future__ import annotations

import os

# Set before transformers/datasets/huggingface_hub are imported by any test module.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.tiny_models import build_tiny  # noqa: E402

# Tiny models are dominated by per-op overhead; one thread avoids oversubscribing small CI machines.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(params=["mamba", "mamba2"])
def tiny_ssm(request):  # noqa: ANN001, ANN201
    """A tiny random Mamba-1 or Mamba-2 causal LM (eval mode, float32)."""
    return build_tiny(request.param)
