"""Bad plans and bad inputs fail with a clear message and change nothing."""

import pytest
import torch
from torch import nn

from hf_shedder import Plan, PlanError, Unit, UnsupportedModelError, get_adapter, prune
from tests.tiny_models import build_tiny


@pytest.mark.parametrize(
    "units, message",
    [
        ([Unit("block", 4)], "out of range"),
        ([Unit("attn_heads", 0, (1,))], "has no unit kind 'attn_heads'"),
        ([Unit("block", 1), Unit("ssm", 1)], "already removed as a whole block"),
        ([Unit("ssm", 2), Unit("ssm", 2)], "duplicate"),
        ([Unit("block", 0, (1,))], "takes no indices"),
    ],
)
def test_bad_plans(units, message):
    model = build_tiny("mamba2")
    with pytest.raises(PlanError, match=message):
        prune(model, Plan(units))
    assert model.config.num_hidden_layers == 4


def test_plan_for_other_family_or_depth():
    model = build_tiny("mamba")
    with pytest.raises(PlanError, match="made for the 'mamba2' family"):
        prune(model, Plan([Unit("block", 1)], family="mamba2"))
    with pytest.raises(PlanError, match="made for a model with 24 layers"):
        prune(model, Plan([Unit("block", 1)], family="mamba", num_layers=24))


def test_failed_mask_leaves_model_unmasked():
    model = build_tiny("mamba2")
    adapter = get_adapter(model)
    x = torch.randint(0, 100, (1, 6))
    ref = model(x).logits
    with pytest.raises(PlanError):
        adapter.set_mask(Plan([Unit("ssm", 1), Unit("block", 9)]))
    torch.testing.assert_close(model(x).logits, ref, atol=0, rtol=0)


def test_unsupported_model():
    class Tiny(nn.Module):
        pass

    with pytest.raises(UnsupportedModelError, match="no Transformers config"):
        get_adapter(Tiny())
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match="no adapter for model_type 'gpt2'"):
        get_adapter(gpt2)


def test_already_pruned_model_is_refused():
    pruned = prune(build_tiny("mamba2"), Plan([Unit("block", 1)]))
    with pytest.raises(PlanError, match="already pruned"):
        prune(pruned, Plan([Unit("block", 2)]))
