"""Hymba adapter: masked (search-time) and physically pruned models compute the same function."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_shedder.arch as arch
from hf_shedder import Plan, PlanError, Unit, get_adapter, prune
from hf_shedder.arch.hymba import HymbaAdapter
from hf_shedder.models.hymba import HymbaConfig, HymbaForCausalLM

ATOL = 1e-5
VOCAB = 53


@pytest.fixture(autouse=True)
def _hymba_registered(monkeypatch):
    """Make sure the Hymba family is known (a no-op once hf_shedder registers it itself)."""
    if HymbaAdapter not in arch.ADAPTERS:
        monkeypatch.setattr(arch, "ADAPTERS", [*arch.ADAPTERS, HymbaAdapter])
    monkeypatch.setitem(arch.CUSTOM_CONFIGS, "hymba", arch.CUSTOM_CONFIGS.get("hymba", HymbaConfig))
    monkeypatch.setitem(arch.CUSTOM_MODELS, "hymba", arch.CUSTOM_MODELS.get("hymba", HymbaForCausalLM))


def build(**overrides) -> HymbaForCausalLM:
    fields = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, mamba_d_state=4, mamba_d_conv=3, mamba_dt_rank=4, num_memory_tokens=2,
        sliding_window=5, global_attn_idx=[0, 5], kv_reuse_group=[[1, 2], [3, 4]], rope=True,
        rope_type="default", kq_norm="perhead-rms", tie_word_embeddings=False, use_cache=True,
    )
    fields.update(overrides)
    torch.manual_seed(0)
    model = HymbaForCausalLM(HymbaConfig(**fields)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def inputs() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))


PLANS = {
    "block": [Unit("block", 2)],
    "block_global": [Unit("block", 5)],
    "attn": [Unit("attn", 3)],
    "attn_consumer": [Unit("attn", 2)],
    "ssm": [Unit("ssm", 1)],
    "both_branches": [Unit("attn", 3), Unit("ssm", 3)],
    "both_branches_consumer": [Unit("ssm", 2), Unit("attn", 2)],
    "attn_heads_group": [Unit("attn_heads", 1, (0, 1))],
    "attn_heads_ragged": [Unit("attn_heads", 3, (1,)), Unit("attn_heads", 4, (2, 3))],
    "ssm_heads": [Unit("ssm_heads", 0, (1, 3))],
    "mlp": [Unit("mlp", 4)],
    "mlp_channels": [Unit("mlp_channels", 2, (0, 5, 7, 20))],
    "producer_after_readers": [Unit("block", 2), Unit("block", 1)],
    "mixed": [
        Unit("attn_heads", 3, (0, 1)), Unit("ssm_heads", 3, (2,)), Unit("mlp_channels", 0, (1, 2, 3)),
        Unit("attn", 4), Unit("block", 5), Unit("mlp", 5), Unit("ssm", 0), Unit("block", 2),
        Unit("mlp_channels", 2, tuple(range(6))), Unit("attn_heads", 1, (3,)),
    ],
}


@pytest.mark.parametrize("name", list(PLANS))
def test_masked_equals_physical(name):
    model = build()
    adapter = get_adapter(model)
    assert isinstance(adapter, HymbaAdapter)
    plan = Plan(PLANS[name], adapter.family, adapter.num_layers())
    x = inputs()
    base = model(x, use_cache=False).logits
    with adapter.masked(plan):
        masked = model(x, use_cache=False).logits
        masked_gen = model.generate(x[:1, :3], max_new_tokens=7, do_sample=False)
        layerwise = adapter.layerwise_logits(x)
    torch.testing.assert_close(layerwise, masked, atol=ATOL, rtol=0)
    torch.testing.assert_close(model(x, use_cache=False).logits, base, atol=0, rtol=0)  # fully undone
    assert not torch.allclose(masked, base)
    pruned = prune(model, plan)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(pruned(x, use_cache=False).logits, masked, atol=ATOL, rtol=0)
    gen_cache = pruned.generate(x[:1, :3], max_new_tokens=7, do_sample=False)
    gen_plain = pruned.generate(x[:1, :3], max_new_tokens=7, do_sample=False, use_cache=False)
    assert gen_cache.tolist() == gen_plain.tolist() == masked_gen.tolist()


def test_save_then_auto_load_gives_same_logits(tmp_path):
    model = build()
    adapter = get_adapter(model)
    plan = Plan(PLANS["mixed"], adapter.family, adapter.num_layers())
    pruned = prune(model, plan)
    x = inputs()
    expected = pruned(x, use_cache=False).logits
    pruned.save_pretrained(tmp_path)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    loaded.eval()
    torch.testing.assert_close(loaded(x, use_cache=False).logits, expected, atol=ATOL, rtol=0)
    out = loaded.generate(x[:1, :3], max_new_tokens=5, do_sample=False)
    assert out.tolist() == pruned.generate(x[:1, :3], max_new_tokens=5, do_sample=False).tolist()


def test_unit_listing_and_kv_sharing_rules():
    model = build()
    adapter = get_adapter(model)
    kinds = ["block", "attn", "ssm", "mlp"]
    blocks = {u.layer for u in adapter.candidates(adapter.empty_plan(), ["block"])}
    assert blocks == {0, 2, 4, 5}  # producers 1 and 3 feed layers 2 and 4
    plan = Plan([Unit("attn", 2)], "hymba", 6)
    # the reference's block candidates (last layer of each KV group + global layers) by default ...
    assert Unit("block", 1) not in adapter.candidates(plan, kinds)
    adapter.configure_search({"wide_block_candidates": True})  # ... the wider set on request
    assert Unit("block", 1) in adapter.candidates(plan, kinds)
    adapter.configure_search({})
    assert Unit("ssm", 2) in adapter.candidates(plan, kinds)  # both branches may go, as in the reference
    with pytest.raises(PlanError, match="reuse"):
        adapter.validate(Plan([Unit("block", 3)], "hymba", 6))
    adapter.validate(Plan([Unit("ssm", 0), Unit("attn", 0)], "hymba", 6))
    with pytest.raises(PlanError):
        adapter.validate(Plan([Unit("attn", 0), Unit("attn_heads", 0, (1,))], "hymba", 6))
    # MLP units outlive the removal of the hybrid-head module of their layer
    adapter.validate(Plan([Unit("block", 0), Unit("mlp_channels", 0, (1,)), Unit("mlp", 0)], "hymba", 6))
    widths = adapter.all_units(["attn_heads", "ssm_heads", "mlp_channels"])
    assert Unit("attn_heads", 0, (0, 1)) in widths and Unit("ssm_heads", 0, (3,)) in widths


def test_dropped_kv_heads_only_when_no_reader_needs_them():
    model = build()
    # layer 1 loses KV group 0 of its own queries, but its reader (layer 2) still uses it
    plan = Plan([Unit("attn_heads", 1, (0, 1))], "hymba", 6)
    pruned = prune(model, plan).model
    assert pruned.model.layers[1].mamba.k_size == 2 * model.config.head_dim
    plan = Plan([Unit("attn_heads", 1, (0, 1)), Unit("attn_heads", 2, (0, 1))], "hymba", 6)
    pruned = prune(build(), plan).model
    assert pruned.model.layers[1].mamba.k_size == model.config.head_dim
    assert pruned.model.layers[2].mamba.self_attn.kv_map == (0, 0)


def test_layerwise_candidates_read_the_plans_reused_keys_values():
    """Search pattern: one pass of the plan, then candidates re-run from their own layer."""
    model = build()
    adapter = get_adapter(model)
    plan = Plan([Unit("mlp", 0)], "hymba", 6)
    # ssm@1 changes what layer 3 (a producer for layer 4) sees; mlp@4 starts after that producer
    cands = [Unit("ssm", 1), Unit("mlp", 4), Unit("attn_heads", 2, (2, 3))]
    x = inputs()
    with torch.no_grad():
        adapter.set_mask(plan)
        hidden, ctx = adapter.embed(x, None)
        cached = {}
        for i in range(adapter.num_layers()):
            cached[i] = hidden
            hidden = adapter.run_layer(i, hidden, ctx)
        for unit in cands:
            adapter.set_mask(plan.extended(unit))
            h = cached[unit.layer]
            for i in range(unit.layer, adapter.num_layers()):
                h = adapter.run_layer(i, h, ctx)
            got = adapter.lm_head()(adapter.final_norm(h))
            torch.testing.assert_close(got, model(x, use_cache=False).logits, atol=ATOL, rtol=0)
        adapter.clear_mask()


def test_remote_code_export_carries_the_hymba_model_and_no_other_family(tmp_path):
    from tests.test_save_load import _run_without_hf_shedder, _x, assert_only_own_family_code

    model = build()
    adapter = get_adapter(model)
    pruned = prune(model, Plan(PLANS["mixed"], adapter.family, adapter.num_layers()))
    pruned.save_pretrained(tmp_path / "m", export="remote_code")
    assert_only_own_family_code(tmp_path / "m", "hymba")
    assert (tmp_path / "m" / "hf_shedder_models_hymba_modeling_hymba.py").is_file()
    x = _x() % VOCAB
    name, diff = _run_without_hf_shedder(tmp_path / "m", x, pruned(x, use_cache=False).logits, remote=True)
    assert name == "PrunedMambaForCausalLM" and diff <= ATOL
