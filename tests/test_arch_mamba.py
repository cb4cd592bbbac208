"""Masked (search-time) and physically pruned Mamba / Mamba-2 models compute the same function."""

import copy

import pytest
import torch

from hf_shedder import Plan, Unit, get_adapter, prune
from tests.tiny_models import VOCAB, build_tiny

# Masked and physical models run the same code on the same weight values: in float32 we allow 1e-5.
ATOL = 1e-5

PLANS = {
    "block": [Unit("block", 1)],
    "ssm": [Unit("ssm", 2)],
    "two_blocks": [Unit("block", 3), Unit("block", 0)],
    "mixed": [Unit("ssm", 1), Unit("block", 2), Unit("ssm", 0)],
    "ssm_then_block_same_layer": [Unit("ssm", 1), Unit("block", 1), Unit("ssm", 3)],
}


def _inputs():
    return torch.randint(0, VOCAB, (2, 11))


@pytest.mark.parametrize("family", ["mamba", "mamba2", "falcon_mamba"])
def test_layerwise_forward_matches_model(family):
    model = build_tiny(family)
    x = _inputs()
    ref = model(x).logits
    torch.testing.assert_close(get_adapter(model).layerwise_logits(x), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["mamba", "mamba2", "falcon_mamba"])
@pytest.mark.parametrize("name", list(PLANS))
def test_masked_equals_physical(family, name):
    model = build_tiny(family)
    adapter = get_adapter(model)
    plan = Plan(PLANS[name], adapter.family, adapter.num_layers())
    x = _inputs()
    base = model(x).logits
    with adapter.masked(plan):
        masked = model(x).logits
        masked_gen = model.generate(x[:1, :4], max_new_tokens=6, do_sample=False)
    torch.testing.assert_close(model(x).logits, base, atol=0, rtol=0)  # masks are fully undone
    assert not torch.allclose(masked, base)  # the unit really was removed
    pruned = prune(model, plan)
    torch.testing.assert_close(pruned(x).logits, masked, atol=ATOL, rtol=0)
    gen_cache = pruned.generate(x[:1, :4], max_new_tokens=6, do_sample=False)
    gen_nocache = pruned.generate(x[:1, :4], max_new_tokens=6, do_sample=False, use_cache=False)
    assert gen_cache.tolist() == masked_gen.tolist() == gen_nocache.tolist()


def test_block_removal_is_identity_on_residual():
    model = build_tiny("mamba2")
    adapter = get_adapter(model)
    x = _inputs()
    hidden, ctx = adapter.embed(x, None)
    with adapter.masked(Plan([Unit("block", 2)])):
        assert torch.equal(adapter.run_layer(2, hidden, ctx), hidden)


def _removed_numel(model, plan):
    """Expected removed parameter count, from the base state dict and the method's definition."""
    sd = dict(model.named_parameters())
    cfg = model.config
    total = 0
    blocks = {u.layer for u in plan if u.kind == "block"}
    for u in plan:
        if u.kind == "block":
            total += sum(p.numel() for n, p in sd.items() if n.startswith(f"backbone.layers.{u.layer}."))
        elif u.kind == "ssm" and u.layer not in blocks:
            pre = f"backbone.layers.{u.layer}.mixer."
            if cfg.model_type == "mamba2":
                bc = 2 * cfg.n_groups * cfg.state_size
                total += sum(sd[pre + n].numel() for n in ("A_log", "D", "dt_bias"))
                total += (bc + cfg.num_heads) * cfg.hidden_size  # in_proj rows of B, C, dt
                total += bc * cfg.conv_kernel + bc  # conv1d weight + bias channels of B, C
            else:
                total += sum(p.numel() for n, p in sd.items() if n.startswith(pre) and
                             n[len(pre):].split(".")[0] in ("x_proj", "dt_proj", "A_log", "D"))
    return total


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_parameter_counts_drop_by_removed_weights(family):
    model = build_tiny(family)
    before = sum(p.numel() for p in model.parameters())
    for units in PLANS.values():
        plan = Plan(units)
        after = sum(p.numel() for p in prune(model, plan).parameters())
        assert before - after == _removed_numel(model, plan), units


def test_prune_does_not_touch_the_base_model():
    model = build_tiny("mamba2")
    state = copy.deepcopy(model.state_dict())
    prune(model, Plan([Unit("ssm", 1), Unit("block", 0)]))
    assert model.config.num_hidden_layers == 4
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
