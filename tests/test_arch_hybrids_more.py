"""Jamba, GraniteMoeHybrid and Falcon-H1: masked == physical for every unit kind, save/load, generation,
plain export and plan errors (tiny random models, CPU)."""

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    FalconH1ForCausalLM,
    GraniteMoeHybridForCausalLM,
    JambaForCausalLM,
)

from hf_shedder import Plan, PlanError, PrunedMambaForCausalLM, Unit, get_adapter, prune
from tests.tiny_hybrids_more import VOCAB, build_tiny_hybrid

# Masked and physical models compute the same function with differently shaped weights.
ATOL = 1e-5

# Layouts: see tests/tiny_hybrids_more.py (jamba: attention at 1 and 4, MoE at 1 and 3;
# granite: attention at 1 and 4, MoE everywhere; falcon_h1: 4 parallel attention + Mamba-2 layers).
PLANS = {
    "jamba": {
        "block_attention": [Unit("block", 1)],
        "block_mamba": [Unit("block", 2)],
        "every_attention_layer": [Unit("block", 1), Unit("block", 4)],
        "ssm": [Unit("ssm", 3)],
        "attn_heads_kv_group": [Unit("attn_heads", 1, (2, 3))],
        "attn_heads_one_per_group": [Unit("attn_heads", 4, (0, 2))],
        "mlp_channels": [Unit("mlp_channels", 0, (1, 5, 7)), Unit("mlp_channels", 0, (2,))],
        "experts": [Unit("experts", 3, (1,)), Unit("experts", 3, (0,))],
        "mixed": [Unit("ssm", 2), Unit("attn_heads", 1, (0, 1)), Unit("experts", 1, (2,)), Unit("block", 0),
                  Unit("mlp_channels", 4, (3, 4)), Unit("block", 3)],
    },
    "granitemoehybrid": {
        "block_attention": [Unit("block", 4)],
        "block_mamba": [Unit("block", 0)],
        "every_attention_layer": [Unit("block", 1), Unit("block", 4)],
        "ssm": [Unit("ssm", 2)],
        "ssm_heads": [Unit("ssm_heads", 2, (0, 4)), Unit("ssm_heads", 2, (3, 7))],
        "ssm_heads_then_ssm": [Unit("ssm_heads", 3, (1, 5)), Unit("ssm", 3)],
        "attn_heads_kv_group": [Unit("attn_heads", 1, (0, 1))],
        "attn_heads_one_per_group": [Unit("attn_heads", 4, (1, 3))],
        "mlp_channels": [Unit("mlp_channels", 0, (1, 5, 7)), Unit("mlp_channels", 0, (2,))],
        "experts": [Unit("experts", 3, (1,)), Unit("experts", 3, (0,))],
        "mixed": [Unit("ssm", 2), Unit("attn_heads", 1, (0, 1)), Unit("experts", 1, (2,)), Unit("block", 0),
                  Unit("mlp_channels", 4, (3, 4)), Unit("ssm_heads", 3, (2, 6)), Unit("block", 4)],
    },
    "falcon_h1": {
        "block": [Unit("block", 1)],
        "attn": [Unit("attn", 0)],
        "every_attention_branch": [Unit("attn", i) for i in range(4)],
        "mamba": [Unit("mamba", 1)],
        "every_mamba_branch": [Unit("mamba", i) for i in range(4)],
        "ssm_heads_ssm_then_mamba": [Unit("ssm_heads", 2, (0, 4)), Unit("ssm", 2), Unit("mamba", 2)],
        "both_branches": [Unit("attn", 3), Unit("mamba", 3)],  # the layer keeps its MLP
        "ssm": [Unit("ssm", 2)],
        "ssm_heads": [Unit("ssm_heads", 2, (0, 4)), Unit("ssm_heads", 2, (3, 7))],
        "ssm_then_ssm_heads": [Unit("ssm", 3), Unit("ssm_heads", 3, (1, 5))],
        "attn_heads_kv_group": [Unit("attn_heads", 1, (2, 3))],
        "attn_heads_then_attn": [Unit("attn_heads", 0, (0, 2)), Unit("attn", 0)],
        "mlp_channels": [Unit("mlp_channels", 0, (1, 5, 7)), Unit("mlp_channels", 0, (2,))],
        "mixed": [Unit("ssm", 2), Unit("attn_heads", 1, (0, 1)), Unit("attn", 2), Unit("block", 0),
                  Unit("mlp_channels", 3, (3, 4)), Unit("ssm_heads", 3, (2, 6)), Unit("mamba", 1)],
    },
}
CASES = [(family, name) for family, plans in PLANS.items() for name in plans]


def _x():
    return torch.randint(1, VOCAB, (2, 11))


def _greedy(model, prompt, **kw):
    return model.generate(prompt, max_new_tokens=6, do_sample=False, **kw).tolist()


@pytest.mark.parametrize("family", list(PLANS))
def test_layerwise_forward_matches_model(family):
    model = build_tiny_hybrid(family)
    x = _x()
    torch.testing.assert_close(get_adapter(model).layerwise_logits(x), model(x).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family, name", CASES)
def test_masked_equals_physical_and_generation(family, name):
    model = build_tiny_hybrid(family)
    adapter = get_adapter(model)
    plan = Plan(PLANS[family][name], adapter.family, adapter.num_layers())
    x = _x()
    base = model(x).logits
    with adapter.masked(plan):
        masked = model(x).logits
        layerwise = adapter.layerwise_logits(x)
        masked_gen = _greedy(model, x[:1, :4])
    torch.testing.assert_close(model(x).logits, base, atol=0, rtol=0)  # masks are fully undone
    assert not torch.allclose(masked, base, atol=1e-4)  # the units really were removed
    torch.testing.assert_close(layerwise, masked, atol=ATOL, rtol=0)
    pruned = prune(model, plan)
    torch.testing.assert_close(pruned(x).logits, masked, atol=ATOL, rtol=0)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    # Generation with the hybrid cache equals greedy decoding without a cache, also with no attention left.
    assert _greedy(pruned, x[:1, :4]) == _greedy(pruned, x[:1, :4], use_cache=False) == masked_gen


def test_generation_with_left_padding_after_head_and_layer_removal():
    model = build_tiny_hybrid("granitemoehybrid")
    pruned = prune(model, Plan([Unit("attn_heads", 1, (2, 3)), Unit("block", 4)]))
    x = _x()[:, :5]
    mask = torch.ones_like(x)
    x[1, :2], mask[1, :2] = 0, 0
    batched = pruned.generate(x, attention_mask=mask, max_new_tokens=4, do_sample=False)
    alone = pruned.generate(x[1:, 2:], max_new_tokens=4, do_sample=False)
    assert batched[1, -4:].tolist() == alone[0, -4:].tolist()


@pytest.mark.parametrize("family", list(PLANS))
def test_save_automodel_load_same_logits(tmp_path, family):
    pruned = prune(build_tiny_hybrid(family), Plan(PLANS[family]["mixed"]))
    x = _x()
    pruned.save_pretrained(tmp_path)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(loaded, PrunedMambaForCausalLM)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    torch.testing.assert_close(loaded(x).logits, pruned(x).logits, atol=ATOL, rtol=0)
    assert _greedy(loaded, x[:1, :3]) == _greedy(pruned, x[:1, :3])


@pytest.mark.parametrize("family, cls, blocks, config_check", [
    # Jamba: [m, a, m, m, a] minus layer 0 is [a, m, m, a]: attention every 3rd layer from 0.
    ("jamba", JambaForCausalLM, [0], lambda c: c.layers_block_type == ["attention", "mamba", "mamba", "attention"]),
    ("granitemoehybrid", GraniteMoeHybridForCausalLM, [0, 3], lambda c: c.layer_types == [
        "full_attention", "linear_attention", "full_attention"]),
    ("falcon_h1", FalconH1ForCausalLM, [1, 2], lambda c: c.num_hidden_layers == 2),
])
def test_plain_export_of_block_plans(tmp_path, family, cls, blocks, config_check):
    pruned = prune(build_tiny_hybrid(family), Plan([Unit("block", b) for b in blocks]))
    x = _x()
    pruned.save_pretrained(tmp_path, export="plain")
    stock, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert type(stock) is cls and config_check(stock.config)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    torch.testing.assert_close(stock(x).logits, pruned(x).logits, atol=ATOL, rtol=0)
    assert _greedy(stock, x[:1, :3]) == _greedy(pruned, x[:1, :3])


@pytest.mark.parametrize("family, units, match", [
    # [m, a, m, m, a] minus layers 2, 3 -> [m, a, a]: no attention period/offset describes it.
    ("jamba", [Unit("block", 2), Unit("block", 3)], "only whole-block removal"),
    ("jamba", [Unit("block", 1), Unit("block", 4)], "removes every attention layer"),
    ("granitemoehybrid", [Unit("block", 1), Unit("block", 4)], "removes every attention layer"),
    ("falcon_h1", [Unit("attn", 1)], "only whole-block removal"),
    ("falcon_h1", [Unit("mamba", 1)], "only whole-block removal"),
    ("granitemoehybrid", [Unit("experts", 0, (1,))], "only whole-block removal"),
])
def test_plain_export_refuses_what_the_config_cannot_express(tmp_path, family, units, match):
    pruned = prune(build_tiny_hybrid(family), Plan(units))
    with pytest.raises(PlanError, match=match):
        pruned.save_pretrained(tmp_path / "m", export="plain")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("family, units, match", [
    ("jamba", [Unit("attn_heads", 1, (0, 1, 2, 3))], r"remove all 4 attn_heads.*'block' unit"),
    ("jamba", [Unit("attn_heads", 1, (0, 1)), Unit("attn_heads", 1, (2, 3))], "remove the 'block' unit"),
    ("falcon_h1", [Unit("attn_heads", 2, (0, 1, 2, 3))], "remove the 'attn' unit"),
    ("granitemoehybrid", [Unit("ssm_heads", 0, tuple(range(8)))], "remove all 8 ssm_heads"),
    ("jamba", [Unit("attn_heads", 1, (0,))], "grouped-query"),
    ("granitemoehybrid", [Unit("attn_heads", 4, (3,))], "grouped-query"),
    ("falcon_h1", [Unit("attn_heads", 0, (1,))], "grouped-query"),
    ("granitemoehybrid", [Unit("ssm_heads", 2, (0,))], "same number of heads"),
    ("jamba", [Unit("attn", 1)], "no unit kind 'attn'"),
    ("jamba", [Unit("ssm_heads", 0, (0,))], "no unit kind 'ssm_heads'"),
    ("falcon_h1", [Unit("experts", 0, (0,))], "no unit kind 'experts'"),
    ("granitemoehybrid", [Unit("hybrid", 1)], "no unit kind 'hybrid'"),
    ("jamba", [Unit("ssm", 1)], "layer 1 has no 'ssm'"),
    ("jamba", [Unit("experts", 0, (0,))], "layer 0 has no 'experts'"),
    ("granitemoehybrid", [Unit("attn_heads", 0, (0, 1))], "layer 0 has no 'attn_heads'"),
    ("jamba", [Unit("experts", 1, (0, 1, 2, 3))], r"remove all 4 experts.*'block'"),
    ("jamba", [Unit("experts", 3, (0, 1, 2))], "at least 2 experts must remain"),
    ("granitemoehybrid", [Unit("experts", 2, (0,)), Unit("experts", 2, (1, 3))], "at least 2 experts must remain"),
    ("falcon_h1", [Unit("attn", 1), Unit("attn_heads", 1, (0, 1))], "attention of layer 1 was already removed"),
    ("falcon_h1", [Unit("block", 1), Unit("attn", 1)], "already removed as a whole block"),
    ("falcon_h1", [Unit("mamba", 1), Unit("ssm", 1)], "Mamba branch of layer 1 was already removed"),
    ("falcon_h1", [Unit("mamba", 1), Unit("ssm_heads", 1, (0, 4))], "Mamba branch of layer 1 was already removed"),
    ("falcon_h1", [Unit("ssm_heads", 2, tuple(range(8)))], r"remove all 8 ssm_heads.*'mamba' unit"),
])
def test_plan_errors(family, units, match):
    model = build_tiny_hybrid(family)
    adapter = get_adapter(model)
    with pytest.raises(PlanError, match=match):
        adapter.validate(Plan(units))
    with pytest.raises(PlanError, match=match):
        prune(model, Plan(units))


@pytest.mark.parametrize("family", list(PLANS))
def test_search_candidates_are_valid_and_cover_every_kind(family):
    model = build_tiny_hybrid(family)
    adapter = get_adapter(model)
    assert {u.kind for u in adapter.candidates(adapter.empty_plan(), adapter.unit_kinds)} == set(adapter.unit_kinds)
    plan = Plan(PLANS[family]["mixed"], adapter.family, adapter.num_layers())
    units = adapter.candidates(plan, adapter.unit_kinds)
    x = _x()
    for unit in units[:: max(1, len(units) // 12)]:  # a spread of them: each must mask and undo cleanly
        with adapter.masked(plan.extended(unit)):
            assert torch.isfinite(model(x).logits).all()
    # attention-head candidates take whole KV groups, so any of them is valid on an unpruned layer
    for unit in adapter.all_units(["attn_heads"]):
        adapter.validate(Plan([unit]))


@pytest.mark.parametrize("family", ["falcon_h1", "jamba"])
def test_remote_code_export_loads_without_hf_shedder(tmp_path, family):
    from tests.test_save_load import _run_without_hf_shedder, assert_only_own_family_code

    pruned = prune(build_tiny_hybrid(family), Plan(PLANS[family]["mixed"]))
    x = _x()
    pruned.save_pretrained(tmp_path / "m", export="remote_code")
    assert_only_own_family_code(tmp_path / "m", family)
    name, diff = _run_without_hf_shedder(tmp_path / "m", x, pruned(x).logits, remote=True)
    assert name == "PrunedMambaForCausalLM" and diff <= ATOL
