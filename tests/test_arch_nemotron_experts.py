"""Nemotron-H MoE experts as a unit kind: the router mask computes what a smaller grouped router computes.

Tiny model (tests.tiny_hybrids.build_tiny_nemotron_moe): layers [mamba, moe, attention, moe, mlp]; 8 experts
per MoE layer in n_group=2 router groups (experts 0-3 and 4-7), top-2 experts from the topk_group=1 best group.
"""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from transformers import AutoModelForCausalLM, NemotronHForCausalLM

from hf_shedder import Plan, PlanError, PrunedMambaForCausalLM, Unit, get_adapter, prune
from tests.tiny_hybrids import VOCAB, build_tiny_hybrid, build_tiny_nemotron_moe

ATOL = 1e-5

PLANS = {
    # uneven across MoE layers (layer 1 keeps 4 experts, layer 3 keeps 6), mixed with other kinds
    "mixed": [Unit("experts", 1, (0, 4)), Unit("attn_heads", 2, (0, 1)), Unit("experts", 3, (2, 7)),
              Unit("experts", 1, (6, 3)), Unit("ssm_heads", 0, (1, 5)), Unit("mlp_channels", 4, (2, 3))],
    # every kept MoE layer keeps the same experts count (layer 3 goes as a block): a stock config says it
    "uniform": [Unit("experts", 1, (1, 5)), Unit("block", 3), Unit("experts", 1, (2, 4))],
}


def _x() -> torch.Tensor:
    return torch.randint(1, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))


def _greedy(model, prompt, **kw):
    return model.generate(prompt, max_new_tokens=6, do_sample=False, **kw).tolist()


def _routes(model: torch.nn.Module, layer: int, x: torch.Tensor) -> set[int]:
    """Experts (as numbered in the given model) the router of ``layer`` picks for some token of ``x``."""
    picked: set[int] = set()
    gate = model.model.layers[layer].mixer.gate
    handle = gate.register_forward_hook(lambda m, i, out: picked.update(out[2].flatten().tolist()))
    model(x)
    handle.remove()
    return picked


@pytest.mark.parametrize("name", list(PLANS))
def test_masked_equals_physical_and_generation_with_cache(name):
    model = build_tiny_nemotron_moe()
    adapter = get_adapter(model)
    plan = Plan(PLANS[name], adapter.family, adapter.num_layers())
    x = _x()
    gone = {e for u in plan if u.kind == "experts" and u.layer == 1 for e in u.indices}
    base = model(x).logits
    assert gone & _routes(model, 1, x)  # the removed experts were in use
    with adapter.masked(plan):
        masked = model(x).logits
        layerwise = adapter.layerwise_logits(x)
        masked_gen = _greedy(model, x[:1, :4])
        assert not gone & _routes(model, 1, x)
    torch.testing.assert_close(model(x).logits, base, atol=0, rtol=0)  # the mask is fully undone
    assert not torch.allclose(masked, base)
    torch.testing.assert_close(layerwise, masked, atol=ATOL, rtol=0)
    pruned = prune(model, plan)
    torch.testing.assert_close(pruned(x).logits, masked, atol=ATOL, rtol=0)
    moe = pruned.model.model.layers[1].mixer
    assert moe.experts.up_proj.shape[0] == moe.gate.weight.shape[0] == moe.gate.e_score_correction_bias.shape[0] == 4
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    assert _greedy(pruned, x[:1, :4]) == _greedy(pruned, x[:1, :4], use_cache=False) == masked_gen


def test_save_and_automodel_load(tmp_path):
    pruned = prune(build_tiny_nemotron_moe(), Plan(PLANS["mixed"]))
    x = _x()
    pruned.save_pretrained(tmp_path)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(loaded, PrunedMambaForCausalLM)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    torch.testing.assert_close(loaded(x).logits, pruned(x).logits, atol=ATOL, rtol=0)
    assert _greedy(loaded, x[:1, :4]) == _greedy(pruned, x[:1, :4])


def test_plain_export_when_every_moe_layer_keeps_as_many_experts(tmp_path):
    # A stock model built from the saved config (n_routed_experts=4, same groups) computes the same logits:
    # the sliced router is a genuine smaller grouped router.
    pruned = prune(build_tiny_nemotron_moe(), Plan(PLANS["uniform"]))
    x = _x()
    pruned.save_pretrained(tmp_path / "m", export="plain")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "nemotron_h" and config["n_routed_experts"] == 4
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert type(stock) is NemotronHForCausalLM
    torch.testing.assert_close(stock(x).logits, pruned(x).logits, atol=ATOL, rtol=0)
    assert _greedy(stock, x[:1, :4]) == _greedy(pruned, x[:1, :4])

    uneven = prune(build_tiny_nemotron_moe(), Plan(PLANS["mixed"][:1]))  # layer 3 still has 8 experts
    with pytest.raises(PlanError, match="cannot express this plan"):
        uneven.save_pretrained(tmp_path / "u", export="plain")
    assert not (tmp_path / "u").exists()


def test_search_candidates_take_one_expert_per_group():
    adapter = get_adapter(build_tiny_nemotron_moe())
    units = adapter.all_units(["experts"])
    assert [u.layer for u in units] == [1] * 4 + [3] * 4
    assert [u.indices for u in units[:4]] == [(0, 4), (1, 5), (2, 6), (3, 7)]
    assert units == adapter.candidates(adapter.empty_plan(), ["experts"])
    # two experts per group left: the router still needs both, so nothing more goes from layer 1
    plan = Plan([Unit("experts", 1, (0, 4)), Unit("experts", 1, (1, 5))], adapter.family, adapter.num_layers())
    assert {u.layer for u in adapter.candidates(plan, ["experts"])} == {3}


@pytest.mark.parametrize(
    "build, units, message",
    [
        (build_tiny_nemotron_moe, [Unit("experts", 1, (0,))], "every group must keep the same number"),
        (build_tiny_nemotron_moe, [Unit("experts", 1, (0, 1, 4, 5)), Unit("experts", 1, (2, 6))],
         "every group must keep at least 2 experts"),
        (partial(build_tiny_nemotron_moe, num_experts_per_tok=3), [Unit("experts", 3, (0, 1, 4, 5))],
         "keep at least 3 experts per group"),
        # n_group=1, 4 experts, top-2: fewer than num_experts_per_tok would remain
        (partial(build_tiny_hybrid, "nemotron_h"), [Unit("experts", 4, (0, 1, 2))], "at least 2 experts must remain"),
        (build_tiny_nemotron_moe, [Unit("experts", 3, tuple(range(8)))], "remove the 'block' unit"),
        (build_tiny_nemotron_moe, [Unit("experts", 2, (0, 4))], "has no 'experts' component"),
        (build_tiny_nemotron_moe, [Unit("experts", 1, (8,))], "out of range"),
    ],
)
def test_bad_plans(build, units, message):
    model = build()
    n_params = sum(p.numel() for p in model.parameters())
    with pytest.raises(PlanError, match=message):
        prune(model, Plan(units))
    with pytest.raises(PlanError, match=message):
        get_adapter(model).set_mask(Plan(units))
    assert sum(p.numel() for p in model.parameters()) == n_params
