"""Reference parity: exact mode's numbers, plan files written and shipped by Mamba-Shedder, Hymba's rules.

The reference's score is written out here from its definition (utils.evaluate_ppl): cross-entropy on
fp16 logits with ``ignore_index=pad`` only ``if pad_token_id:``, cast to fp32, per-sample masked mean,
``exp`` of the fp32 mean. On CPU the tiny models run in fp32 and their logits are rounded to fp16 before
the loss (CPU fp16 cross-entropy is supported, so the loss itself is the fp16 one).
"""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F

from hf_shedder.arch import get_adapter
from hf_shedder.data import CalibrationSet
from hf_shedder.search import SearchSettings, search
from hf_shedder.search.reference_mode import (
    draw_reference_rows,
    recipe_for,
    reference_ignore_id,
    reference_overrides,
)
from hf_shedder.units import Plan, Unit, load_plan_for
from tests.test_arch_hymba import VOCAB as HYMBA_VOCAB
from tests.test_arch_hymba import _hymba_registered  # noqa: F401
from tests.test_arch_hymba import build as build_hymba
from tests.tiny_models import VOCAB, build_tiny


def reference_ppl(model, ids: torch.Tensor, batch_size: int, pad_token_id) -> float:
    """utils.evaluate_ppl, restated: no hf_shedder code involved."""
    if pad_token_id:
        loss_fn = torch.nn.CrossEntropyLoss(reduction="none", ignore_index=pad_token_id)
    else:
        loss_fn = torch.nn.CrossEntropyLoss(reduction="none")
    nlls = []
    with torch.no_grad():
        for s in range(0, ids.shape[0], batch_size):
            batch = ids[s : s + batch_size]
            logits = model(input_ids=batch).logits.half()[:, :-1, :]
            labels = batch[:, 1:]
            nll = loss_fn(logits.permute(0, 2, 1), labels).float()
            mask = labels != loss_fn.ignore_index
            nlls.append((nll * mask).sum(dim=1) / mask.sum(dim=1))
    return torch.exp(torch.cat(nlls).mean()).item()


def reference_greedy(model, ids, batch_size, pad_token_id, candidates_of, steps):
    """prune.py's loop: append each candidate, measure, pop; keep the strictly lowest (first on ties)."""
    adapter = get_adapter(model)
    plan, history = adapter.empty_plan(), []
    for _ in range(steps):
        best, lowest, ppls = None, float("inf"), {}
        for unit in candidates_of(plan):
            with adapter.masked(plan.extended(unit)):
                ppl = reference_ppl(model, ids, batch_size, pad_token_id)
            ppls[f"{unit.kind}@{unit.layer}"] = ppl
            if ppl < lowest:
                best, lowest = unit, ppl
        plan = plan.extended(best)
        history.append(ppls)
    return plan, history


def _ids(n: int, length: int, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def _exact(units, steps, batch_size, ignore, length):
    return SearchSettings(units=units, steps=steps, batch_size=batch_size, samples=4, seqlen=length,
                          calibration="random", exact_reference=True, reference_numerics=True,
                          ignore_token_id=reference_ignore_id(ignore))


@pytest.mark.parametrize("family,units", [("mamba", ("block",)), ("mamba2", ("ssm",))])
@pytest.mark.parametrize("pad", [0, 7])  # gpt-neox's eos is 0: the reference then ignores nothing
def test_exact_mode_gives_the_reference_numbers_and_plan(family, units, pad, tmp_path):
    ids = _ids(4, 24)
    ids[:, 5] = 7  # real tokens equal to the pad id: dropped by the reference's ignore_index only if pad is truthy
    model = build_tiny(family, num_layers=4)
    adapter = get_adapter(model)
    ref_plan, ref_ppls = reference_greedy(model, ids, 2, pad, lambda p: adapter.candidates(p, units), 2)
    result = search(build_tiny(family, num_layers=4), CalibrationSet(ids, torch.ones_like(ids), "random"),
                    _exact(units, 2, 2, pad, 24), out_dir=tmp_path, progress=False)
    assert list(result.plan) == list(ref_plan)
    assert result.candidate_ppls == ref_ppls  # bit for bit: the same fp16 loss and fp32 means
    assert result.base_ppl == pytest.approx(reference_ppl(build_tiny(family, num_layers=4), ids, 2, pad), rel=0)
    # the reference's side files: one step file per step, log.json with its keys
    target = {"block": "mamba_block", "ssm": "ssm"}[units[0]]
    key = f"pruned_{target}_idx"
    step0 = json.loads((tmp_path / "pruned_model_configs" / f"config.{target}.0.json").read_text())
    step1 = json.loads((tmp_path / "pruned_model_configs" / f"config.{target}.1.json").read_text())
    assert step0 == {key: [ref_plan.units[0].layer]}
    assert step1 == {key: [u.layer for u in ref_plan]}
    log = json.loads((tmp_path / "log.json").read_text())
    assert [r["importance"] for r in log["pruning_results"]] == [min(h.values()) for h in ref_ppls]
    assert log["pruning_results"][1]["prune_target"] == target
    assert log["num_evals"] == sum(len(h) for h in ref_ppls)
    # and the step files load back with their meaning
    assert list(load_plan_for(adapter, tmp_path / "pruned_model_configs" / f"config.{target}.1.json")) == list(ref_plan)


def test_exact_mode_hymba_numbers_plan_and_full_format_step_files(tmp_path):
    ids = _ids(8, 16, seed=3, vocab=HYMBA_VOCAB)
    model = build_hymba()
    adapter = get_adapter(model)
    recipe = recipe_for("hymba")
    assert (recipe.batch_size, recipe.seqlen, recipe.pad_from) == (4, 1024, "config")
    pad = model.config.pad_token_id
    units = ("block", "attn", "ssm")
    ref_plan, ref_ppls = reference_greedy(model, ids, 4, pad, lambda p: adapter.candidates(p, units), 2)
    result = search(build_hymba(), CalibrationSet(ids, torch.ones_like(ids), "random"),
                    _exact(units, 2, 4, pad, 16), out_dir=tmp_path, progress=False)
    assert list(result.plan) == list(ref_plan)
    assert result.candidate_ppls == ref_ppls
    files = sorted((tmp_path / "pruned_model_configs").iterdir())
    assert [f.name for f in files] == ["config.hymba_block,self_attn,ssm.0.json", "config.hymba_block,self_attn,ssm.1.json"]
    last = json.loads(files[-1].read_text())
    assert set(last) == {"pruned_self_attn_idx", "pruned_ssm_idx", "pruned_hymba_block_idx", "pruned_moe_idx",
                         "pruned_mlp_channels"}
    assert last["pruned_mlp_channels"] == {str(i): model.config.intermediate_size for i in range(6)}
    assert sorted(load_plan_for(adapter, files[-1])) == sorted(ref_plan)
    assert json.loads((tmp_path / "log.json").read_text())["pruning_results"][0]["pruning_target"] == "hymba_block,self_attn,ssm"


def test_hymba_reference_block_candidates_are_the_default():
    model = build_hymba(num_hidden_layers=8, global_attn_idx=[0, 7], kv_reuse_group=[[1, 2, 3], [4, 5], [6]])
    adapter = get_adapter(model)
    # prune.py:331: [group[-1] for group in kv_reuse_group] + global_attn_idx
    expected = sorted({g[-1] for g in [[1, 2, 3], [4, 5]]} | {0, 7})
    assert adapter.reference_block_layers() == expected
    assert [u.layer for u in adapter.candidates(adapter.empty_plan(), ["block"])] == expected
    adapter.configure_search({"wide_block_candidates": True})
    wide = [u.layer for u in adapter.candidates(adapter.empty_plan(), ["block"])]
    assert set(expected) < set(wide) and 2 in wide  # a reader in the middle of its group


def test_hymba_both_branches_compute_what_the_reference_computes():
    """Reference patch: with both branches masked, out_proj reads the convolved (SiLU) SSM input."""
    model = build_hymba()
    adapter = get_adapter(model)
    block = model.model.layers[3].mamba
    seen = {}
    handle = block.register_forward_hook(lambda m, args, out: seen.update(h=args[0], out=out))
    x = _ids(2, 9, vocab=HYMBA_VOCAB)
    with adapter.masked(Plan([Unit("attn", 3), Unit("ssm", 3)], "hymba", 6)):
        model(x, use_cache=False)
    handle.remove()
    proj = block.in_proj(seen["h"])
    sizes = [block.q_size, block.k_size, block.v_size, block.ssm_size, block.ssm_size]
    ssm_in = torch.split(proj, sizes, dim=-1)[3].transpose(1, 2)
    conv = block.conv1d
    k = conv.weight.shape[-1]
    y = F.conv1d(ssm_in, conv.weight, conv.bias, padding=k - 1, groups=ssm_in.shape[1])[..., : ssm_in.shape[-1]]
    expected = block.out_proj(F.silu(y).transpose(1, 2))
    torch.testing.assert_close(seen["out"], expected, atol=1e-5, rtol=0)


def test_hymba_full_format_files_load_with_kept_prefix_widths(tmp_path):
    model = build_hymba()
    adapter = get_adapter(model)
    size = model.config.intermediate_size
    data = {"pruned_self_attn_idx": [3], "pruned_ssm_idx": [3, 0], "pruned_hymba_block_idx": [5],
            "pruned_moe_idx": [4], "pruned_mlp_channels": {str(i): size for i in range(6)}}
    data["pruned_mlp_channels"]["1"] = size - 8  # MaskLinear keeps the first 16 channels
    path = tmp_path / "config.self_attn,ssm,hymba_block.5.json"
    path.write_text(json.dumps(data))
    plan = load_plan_for(adapter, path)
    assert Unit("mlp_channels", 1, tuple(range(size - 8, size))) in plan
    assert {Unit("attn", 3), Unit("ssm", 3), Unit("ssm", 0), Unit("block", 5), Unit("mlp", 4)} <= set(plan)
    assert adapter.reference_step_file(plan) == {**data, "pruned_ssm_idx": [3, 0]}
    # what the reference computes: MLP of layer 1 with rows/cols [:16] only
    mlp = model.model.layers[1].moe.experts[0]
    seen = {}
    handle = mlp.register_forward_hook(lambda m, args, out: seen.update(h=args[0], out=out))
    with adapter.masked(plan):
        model(_ids(2, 9, vocab=HYMBA_VOCAB), use_cache=False)
    handle.remove()
    w = size - 8
    act = torch.nn.functional.silu(F.linear(seen["h"], mlp.gate_proj.weight[:w])) * F.linear(seen["h"], mlp.up_proj.weight[:w])
    torch.testing.assert_close(seen["out"], F.linear(act, mlp.down_proj.weight[:, :w]), atol=1e-5, rtol=0)


SHIPPED = {  # Mamba-Shedder/results/*/pruning_config.json (the reference's shipped final plans)
    ("mamba", 64): {"pruned_mamba_block_idx": [2, 6, 12, 5, 10, 8, 13, 11, 26, 48, 19, 55, 15, 3]},
    ("mamba2", 64): {"pruned_ssm_idx": [63, 54, 42, 45, 53, 57, 58, 59, 38, 56, 50, 61, 60, 43, 37, 62, 49, 34,
                                        55, 33, 39, 35, 44, 46]},
}


@pytest.mark.parametrize("family,layers", list(SHIPPED))
def test_shipped_mamba_plan_files_load(family, layers, tmp_path):
    data = SHIPPED[(family, layers)]
    path = tmp_path / "pruning_config.json"
    path.write_text(json.dumps(data))
    adapter = get_adapter(build_tiny(family, num_layers=layers))
    (key, values), = data.items()
    kind = {"pruned_mamba_block_idx": "block", "pruned_ssm_idx": "ssm"}[key]
    plan = load_plan_for(adapter, path)
    assert list(plan) == [Unit(kind, v) for v in values]
    assert adapter.reference_step_file(plan) == data


def test_rows_are_drawn_as_global_random_after_set_seed():
    random.seed(42)  # what transformers.set_seed(42) does to the random module
    expected = [random.sample(range(1000), 16), random.sample(range(1000), 8), random.sample(range(1000), 4)]
    assert draw_reference_rows(1000, [16, 8, 4], seed=42) == expected


def test_ignore_rule_and_cli_overrides():
    assert reference_ignore_id(0) is None and reference_ignore_id(None) is None and reference_ignore_id(2) == 2

    class Tok:
        eos_token_id = 0

    class Cfg:
        pad_token_id = 5

    mamba = reference_overrides("mamba", Tok(), Cfg(), "cuda:0")
    assert (mamba["batch_size"], mamba["seqlen"], mamba["dtype"], mamba["ignore_token_id"]) == (2, 2048, "float16", None)
    hymba = reference_overrides("hymba", Tok(), Cfg(), "cpu")
    assert (hymba["batch_size"], hymba["seqlen"], hymba["dtype"], hymba["ignore_token_id"]) == (4, 1024, None, 5)
    assert mamba["calibration_mode"] == "reference" and mamba["reference_numerics"]


def test_zamba2_reference_files_load_with_the_reference_meaning(tmp_path):
    from tests.tiny_hybrids import build_tiny_hybrid

    model = build_tiny_hybrid("zamba2")  # layers 1, 3, 5 use the shared block
    adapter = get_adapter(model)
    size = model.config.intermediate_size
    ok = {"pruned_mamba_block_idx": [2, 0], "pruned_mha_idx": [], "pruned_mlp_idx": [],
          "pruned_mlp_channels": {"0": size, "1": size, "2": size}, "pruned_ssm_idx": [4, 2]}
    path = tmp_path / "config.ssm.7.json"
    path.write_text(json.dumps(ok))
    assert list(load_plan_for(adapter, path)) == [Unit("ssm", 4), Unit("ssm", 2), Unit("mamba_block", 2),
                                                  Unit("mamba_block", 0)]
    # per-use keys (tests/test_zamba2_reference_units.py checks their meaning)
    for more, unit in (({"pruned_mlp_idx": [1]}, Unit("mlp", 3)), ({"pruned_mha_idx": [0]}, Unit("mha", 1)),
                       ({"pruned_mamba_block_idx": [3]}, Unit("mamba_block", 3)),
                       ({"pruned_mlp_channels": {"0": size - 8}}, Unit("mlp_width", 1, tuple(range(size - 8, size))))):
        path.write_text(json.dumps({**ok, **more}))
        assert unit in load_plan_for(adapter, path)


def test_hymba_tasks_are_scored_with_acc_as_its_reference_script():
    from hf_shedder.evaluation.harness import summarize

    results = {"hellaswag": {"acc,none": 0.4, "acc_norm,none": 0.5}, "arc_easy": {"acc,none": 0.7, "acc_norm,none": 0.6}}
    assert summarize(results)["scores"] == {"hellaswag": 0.5, "arc_easy": 0.7}  # Mamba / Zamba2 scripts
    assert summarize(results, family="hymba")["scores"] == {"hellaswag": 0.4, "arc_easy": 0.7}
