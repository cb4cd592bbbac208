"""Hybrid SSM/attention families (Zamba2, Bamba, Nemotron-H) and Mamba-2 head pruning.

For every unit kind of every family: the search-time mask computes what the physically pruned model
computes, the mask is fully undone, pruned models save/load through the Auto classes, and generation with
a cache (whose layer types and state sizes follow the pruned model) equals generation without one.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_shedder import Plan, PlanError, PrunedMambaForCausalLM, Unit, get_adapter, prune
from tests.tiny_hybrids import VOCAB, build_tiny_hybrid
from tests.tiny_models import build_tiny

ATOL = 1e-5

# One plan per unit kind, plus a mixed plan, per family. Layer types of the tiny models:
#   zamba2:     [mamba, hybrid, mamba, hybrid, mamba, hybrid]; shared blocks anchored at 1 (uses 1, 5) and 3
#   bamba:      [mamba, attention, mamba, attention, mamba] (every layer has an MLP)
#   nemotron_h: [mamba, mlp, attention, mamba, moe, attention, mlp]
PLANS: dict[str, dict[str, list[Unit]]] = {
    "zamba2": {
        "block": [Unit("block", 1), Unit("block", 4)],
        "ssm": [Unit("ssm", 2)],
        "ssm_heads": [Unit("ssm_heads", 3, (0, 2))],
        "hybrid": [Unit("hybrid", 3)],
        "every_hybrid_use": [Unit("hybrid", 1), Unit("hybrid", 3), Unit("hybrid", 5)],
        "every_hybrid_block": [Unit("block", 5), Unit("block", 1), Unit("block", 3)],
        "attn_heads": [Unit("attn_heads", 1, (1,)), Unit("attn_heads", 3, (0, 3))],
        "mlp_channels": [Unit("mlp_channels", 1, (0, 5, 7)), Unit("mlp_channels", 1, (9,))],
        "mixed": [Unit("attn_heads", 1, (1,)), Unit("block", 1), Unit("mlp_channels", 1, (2, 3)), Unit("ssm", 0),
                  Unit("ssm_heads", 0, (1, 3)), Unit("hybrid", 3), Unit("attn_heads", 1, (2,)), Unit("block", 4)],
        # the reference's units (more in tests/test_zamba2_reference_units.py)
        "mamba_block": [Unit("mamba_block", 1), Unit("mamba_block", 2)],
        "mha": [Unit("mha", 1)],
        "mlp": [Unit("mlp", 3)],
        "mlp_width": [Unit("mlp_width", 5, tuple(range(40, 48)))],
    },
    "bamba": {
        "block": [Unit("block", 1)],
        "ssm": [Unit("ssm", 0)],
        "every_attention_layer": [Unit("block", 3), Unit("block", 1)],
        "ssm_heads": [Unit("ssm_heads", 2, (1, 5))],
        "attn_heads": [Unit("attn_heads", 3, (2, 3))],
        "mlp_channels": [Unit("mlp_channels", 1, (0, 5, 7))],
        "mixed": [Unit("attn_heads", 1, (0, 1)), Unit("block", 1), Unit("mlp_channels", 4, (2, 3)), Unit("ssm", 0),
                  Unit("ssm_heads", 0, (1, 5)), Unit("attn_heads", 3, (1, 3)), Unit("block", 2)],
    },
    "nemotron_h": {
        "block": [Unit("block", 2), Unit("block", 4)],
        "ssm": [Unit("ssm", 0)],
        "every_attention_layer": [Unit("block", 2), Unit("block", 5)],
        "ssm_heads": [Unit("ssm_heads", 3, (1, 5)), Unit("ssm_heads", 3, (0, 4))],
        "attn_heads": [Unit("attn_heads", 5, (2, 3))],
        "mlp_channels": [Unit("mlp_channels", 1, (0, 5, 7))],
        "experts": [Unit("experts", 4, (1,))],  # more in tests/test_arch_nemotron_experts.py
        "mixed": [Unit("attn_heads", 2, (0, 1)), Unit("block", 2), Unit("mlp_channels", 6, (2, 3)), Unit("ssm", 0),
                  Unit("ssm_heads", 0, (1, 5)), Unit("attn_heads", 5, (1, 3)), Unit("block", 4)],
    },
}
CASES = [(family, name) for family, plans in PLANS.items() for name in plans]


def _x() -> torch.Tensor:
    return torch.randint(1, VOCAB, (2, 11))


def _greedy(model, prompt, **kw):
    return model.generate(prompt, max_new_tokens=6, do_sample=False, **kw).tolist()


@pytest.mark.parametrize("family", list(PLANS))
def test_every_kind_is_covered_and_layerwise_forward_matches(family):
    model = build_tiny_hybrid(family)
    adapter = get_adapter(model)
    assert set(adapter.unit_kinds) <= set(PLANS[family]) | {"block"}
    x = _x()
    torch.testing.assert_close(adapter.layerwise_logits(x), model(x).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family, name", CASES)
def test_masked_equals_physical_and_generation_with_cache(family, name):
    model = build_tiny_hybrid(family)
    adapter = get_adapter(model)
    plan = Plan(PLANS[family][name], adapter.family, adapter.num_layers())
    x = _x()
    base = model(x).logits
    with adapter.masked(plan):
        masked = model(x).logits
        layerwise = adapter.layerwise_logits(x)
        masked_gen = _greedy(model, x[:1, :4])
    torch.testing.assert_close(model(x).logits, base, atol=0, rtol=0)  # the mask is fully undone
    assert not torch.allclose(masked, base)  # the units really were removed
    torch.testing.assert_close(layerwise, masked, atol=ATOL, rtol=0)
    pruned = prune(model, plan)
    torch.testing.assert_close(pruned(x).logits, masked, atol=ATOL, rtol=0)
    # Zamba2's per-use units untie the uses they touch: their own copies are the parameters they add
    untied = getattr(getattr(pruned, "model", pruned), "shedder_untied", None) or {}
    added = untied.get("copy_params", 0) - untied.get("freed_shared_params", 0)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters()) + max(added, 0) + (added > 0)
    # Generation with the cache (layer types and state sizes from the pruned model) == without it.
    assert _greedy(pruned, x[:1, :4]) == _greedy(pruned, x[:1, :4], use_cache=False) == masked_gen


@pytest.mark.parametrize("family", list(PLANS))
def test_save_and_automodel_load(tmp_path, family):
    pruned = prune(build_tiny_hybrid(family), Plan(PLANS[family]["mixed"]))
    x = _x()
    pruned.save_pretrained(tmp_path)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(loaded, PrunedMambaForCausalLM)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    torch.testing.assert_close(loaded(x).logits, pruned(x).logits, atol=ATOL, rtol=0)
    assert _greedy(loaded, x[:1, :4]) == _greedy(pruned, x[:1, :4])


@pytest.mark.parametrize(
    "family, units, overrides",
    [
        ("bamba", [Unit("block", 1), Unit("block", 2)], {}),
        ("nemotron_h", [Unit("block", 2), Unit("block", 4)], {}),
        # uses 2 and 3 of the shared blocks stay uses 0 and 1 of blocks 0 and 1 (k % num_mem_blocks kept)
        ("zamba2", [Unit("block", 0), Unit("hybrid", 1), Unit("block", 3)], {}),
        # one shared block: any hybrid removal and a narrower shared MLP are expressible
        ("zamba2", [Unit("hybrid", 3), Unit("mlp_channels", 1, (0, 4)), Unit("block", 2)], {"num_mem_blocks": 1}),
    ],
)
def test_plain_export_when_the_config_can_express_the_plan(tmp_path, family, units, overrides):
    pruned = prune(build_tiny_hybrid(family, **overrides), Plan(units))
    x = _x()
    pruned.save_pretrained(tmp_path / "m", export="plain")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == family
    stock, info = AutoModelForCausalLM.from_pretrained(tmp_path / "m", output_loading_info=True)
    assert type(stock) is type(pruned.model)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    torch.testing.assert_close(stock(x).logits, pruned(x).logits, atol=ATOL, rtol=0)
    assert _greedy(stock, x[:1, :4]) == _greedy(pruned, x[:1, :4])


@pytest.mark.parametrize(
    "family, units",
    [
        ("zamba2", [Unit("hybrid", 1)]),  # use 1 would move from shared block 1 to block 0
        ("zamba2", [Unit("attn_heads", 1, (0,))]),
        ("bamba", [Unit("ssm_heads", 0, (0, 4))]),
        ("nemotron_h", [Unit("mlp_channels", 1, (3,))]),
    ],
)
def test_plain_export_refused_when_the_config_cannot(tmp_path, family, units):
    pruned = prune(build_tiny_hybrid(family), Plan(units))
    with pytest.raises(PlanError, match="cannot express this plan"):
        pruned.save_pretrained(tmp_path / "m", export="plain")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("family, plan", [("zamba2", "every_hybrid_use"), ("bamba", "every_attention_layer"),
                                          ("nemotron_h", "every_attention_layer")])
def test_no_attention_left_saves_and_loads_but_no_plain_export(tmp_path, family, plan):
    # Stock Transformers cannot build a cache for a model without attention; the hf_shedder checkpoint can.
    pruned = prune(build_tiny_hybrid(family), Plan(PLANS[family][plan]))
    with pytest.raises(PlanError, match="removes every attention layer"):
        pruned.save_pretrained(tmp_path / "plain", export="plain")
    assert not (tmp_path / "plain").exists()
    pruned.save_pretrained(tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    x = _x()
    torch.testing.assert_close(loaded(x).logits, pruned(x).logits, atol=ATOL, rtol=0)
    assert _greedy(loaded, x[:1, :4]) == _greedy(pruned, x[:1, :4], use_cache=False)


@pytest.mark.parametrize(
    "family, units, message",
    [
        # removing every head of a layer: remove the layer (or the shared block's uses) instead
        ("zamba2", [Unit("ssm_heads", 2, (0, 2)), Unit("ssm_heads", 2, (1, 3))], "remove the 'block' unit"),
        ("zamba2", [Unit("attn_heads", 1, (0, 1, 2, 3))], "remove the 'hybrid' unit"),
        ("bamba", [Unit("attn_heads", 1, (0, 1, 2, 3))], "remove the 'block' unit"),
        ("nemotron_h", [Unit("mlp_channels", 6, tuple(range(48)))], "remove the 'block' unit"),
        # grouped structure: query heads per KV head, Mamba-2 heads per B/C group
        ("bamba", [Unit("attn_heads", 1, (0,))], "grouped-query structure"),
        ("nemotron_h", [Unit("attn_heads", 5, (3,))], "grouped-query structure"),
        ("nemotron_h", [Unit("ssm_heads", 0, (0, 1))], "same number of heads"),
        # kinds or components a family / layer does not have
        ("bamba", [Unit("hybrid", 1)], "has no unit kind 'hybrid'"),
        ("nemotron_h", [Unit("mlp_channels", 0, (1,))], "has no 'mlp_channels' component"),
        ("bamba", [Unit("ssm", 1)], "has no 'ssm' component"),
        ("zamba2", [Unit("attn_heads", 5, (0,))], "has no 'attn_heads' component"),  # anchored at layer 1
        # a shared block whose every use is gone
        ("zamba2", [Unit("hybrid", 3), Unit("mlp_channels", 3, (0,))], "every use of the shared block"),
    ],
)
def test_bad_plans(family, units, message):
    model = build_tiny_hybrid(family)
    n_params = sum(p.numel() for p in model.parameters())
    with pytest.raises(PlanError, match=message):
        prune(model, Plan(units))
    with pytest.raises(PlanError, match=message):
        get_adapter(model).set_mask(Plan(units))
    assert sum(p.numel() for p in model.parameters()) == n_params


def test_mamba2_family_lacks_attention_kinds():
    with pytest.raises(PlanError, match="has no unit kind 'attn_heads'"):
        get_adapter(build_tiny("mamba2")).all_units(["attn_heads"])


@pytest.mark.parametrize("family", ["mamba2", "zamba2", "bamba", "nemotron_h"])
def test_search_candidates_are_valid_and_grouped(family):
    model = build_tiny("mamba2") if family == "mamba2" else build_tiny_hybrid(family)
    adapter = get_adapter(model)
    kinds = [k for k in adapter.unit_kinds if k in adapter.width_kinds]
    units = adapter.all_units(kinds)
    assert units and units == adapter.candidates(adapter.empty_plan(), kinds)  # every candidate is legal alone
    for unit in units:
        if unit.kind == "ssm_heads":  # one head from each of the two B/C groups
            heads = adapter.width_size("ssm_heads", unit.layer)
            assert len(unit.indices) == 2 and unit.indices[1] - unit.indices[0] == heads // 2
    adapter.width_groups = {"ssm_heads": 2}
    assert all(len(u.indices) == 4 for u in adapter.all_units(["ssm_heads"]))


def test_mamba2_ssm_heads_masked_equals_physical_and_parameter_count():
    model = build_tiny("mamba2")
    adapter = get_adapter(model)
    cfg = model.config
    plan = Plan([Unit("ssm_heads", 1, (0, 4)), Unit("ssm", 1), Unit("ssm_heads", 2, (3, 7)),
                 Unit("ssm_heads", 1, (2, 6)), Unit("block", 0)])
    x = torch.randint(0, VOCAB, (2, 11))
    with adapter.masked(plan):
        masked = model(x).logits
        masked_gen = _greedy(model, x[:1, :4])
    pruned = prune(model, plan)
    torch.testing.assert_close(pruned(x).logits, masked, atol=ATOL, rtol=0)
    assert _greedy(pruned, x[:1, :4]) == _greedy(pruned, x[:1, :4], use_cache=False) == masked_gen
    # Expected size, from the definition: a head owns z, x and dt rows of in_proj, x channels of conv1d,
    # A_log/D/dt_bias entries, norm weights and out_proj columns. Layer 1 also lost its SSM.
    p, d, k = cfg.head_dim, cfg.hidden_size, cfg.conv_kernel
    per_head = (2 * p + 1) * d + p * (k + 1) + 3 + p + p * d
    bc = 2 * cfg.n_groups * cfg.state_size
    layer0 = sum(q.numel() for n, q in model.named_parameters() if n.startswith("backbone.layers.0."))
    kept = cfg.num_heads - 4  # layer 1's SSM went with B/C rows + channels and the kept heads' dt/A/D
    ssm_of_pruned = (bc + kept) * d + bc * (k + 1) + 3 * kept
    removed = layer0 + 6 * per_head + ssm_of_pruned
    before = sum(q.numel() for q in model.parameters())
    assert before - sum(q.numel() for q in pruned.parameters()) == removed
    mixer = pruned.model.backbone.layers[1].mixer  # layer 2 before block 0 went
    assert mixer.num_heads == 6 and mixer.shedder_heads == (0, 1, 2, 4, 5, 6)
