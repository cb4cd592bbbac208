"""The bundled reference models (hf_shedder/assets/reference/) load offline with stock Transformers and
have learned the language: their validation perplexity is far below that of the same config at random init."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

import hf_shedder

ASSETS = os.path.join(os.path.dirname(hf_shedder.__file__), "assets")
REFERENCE = os.path.join(ASSETS, "reference")
TOKENIZER = os.path.join(ASSETS, "tokenizer", "gpt-neox-20b", "tokenizer.json")
WINDOW, WINDOWS = 256, 2  # a slice of the validation text keeps the pure-PyTorch path to a few seconds
# Trained tiny models reach a few hundred at most; random init sits near the vocabulary size (~5e4).
RATIO = 10.0


def _validation_ids() -> torch.Tensor:
    tok = PreTrainedTokenizerFast(tokenizer_file=TOKENIZER, eos_token="<|endoftext|>")
    with open(os.path.join(REFERENCE, "validation.txt"), encoding="utf-8") as f:
        ids = tok(f.read())["input_ids"]
    assert len(ids) >= WINDOW * WINDOWS
    return torch.tensor(ids[: WINDOW * WINDOWS]).view(WINDOWS, WINDOW)


@torch.no_grad()
def _ppl(model: torch.nn.Module, ids: torch.Tensor) -> float:
    model.eval()
    return math.exp(model(input_ids=ids, labels=ids, use_cache=False).loss.item())


@pytest.mark.parametrize(
    "name, model_type", [("mamba", "mamba"), ("mamba2", "mamba2"), ("hybrid", "zamba2")]
)
def test_reference_model_beats_random_init(name: str, model_type: str) -> None:
    path = os.path.join(REFERENCE, name)
    for fname in os.listdir(path):
        assert os.path.getsize(os.path.join(path, fname)) < 16 * 1024 * 1024, fname
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert model.config.model_type == model_type
    assert model.config.num_hidden_layers >= 16
    assert model.config.tie_word_embeddings

    torch.manual_seed(0)
    random_model = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    ids = _validation_ids()
    trained, random = _ppl(model, ids), _ppl(random_model, ids)
    assert math.isfinite(trained)
    assert trained * RATIO < random, f"{name}: trained ppl {trained:.1f} vs random init {random:.1f}"


def test_reference_cards_match_checkpoints() -> None:
    # Each card's metrics were written by the recipe for exactly these weights.
    for name in ("mamba", "mamba2", "hybrid"):
        with open(os.path.join(REFERENCE, name, "training_metrics.json")) as f:
            metrics = json.load(f)
        assert metrics["arch"] == name
        assert metrics["val_ppl_checkpoint_fp32"] * RATIO < metrics["val_ppl_random_init"]
        assert os.path.isfile(os.path.join(REFERENCE, name, "README.md"))
