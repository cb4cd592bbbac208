"""The search on every hybrid family (and Mamba-2) with blocks mixed with width kinds: candidates are listed
while removed blocks are masked, the accelerated search finds the plain loop's plan, and a search killed
mid-step resumes to the same plan."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from hf_shedder import Plan, PlanError, Unit, get_adapter
from hf_shedder.data import CalibrationSet
from hf_shedder.search import JOURNAL_NAME, SearchSettings, search
from hf_shedder.search.evaluator import Evaluator
from tests import tiny_hybrids, tiny_hybrids_more
from tests.test_arch_hymba import build as build_hymba
from tests.tiny_models import build_tiny

BUILDERS = {
    "mamba2": lambda: build_tiny("mamba2", num_layers=4),
    "zamba2": lambda: tiny_hybrids.build_tiny_hybrid("zamba2"),
    "bamba": lambda: tiny_hybrids.build_tiny_hybrid("bamba"),
    "nemotron_h": lambda: tiny_hybrids.build_tiny_hybrid("nemotron_h"),
    "jamba": lambda: tiny_hybrids_more.build_tiny_hybrid("jamba"),
    "granitemoehybrid": lambda: tiny_hybrids_more.build_tiny_hybrid("granitemoehybrid"),
    "falcon_h1": lambda: tiny_hybrids_more.build_tiny_hybrid("falcon_h1"),
    "hymba": build_hymba,
}
# Blocks, a width kind and a whole-component kind per family (few candidates: the test stays fast).
UNITS = {
    "mamba2": ("block", "ssm_heads"),
    "zamba2": ("block", "hybrid", "attn_heads"),  # heads of shared blocks outlive their anchor layer's block
    "bamba": ("block", "ssm_heads", "attn_heads"),
    "nemotron_h": ("block", "ssm_heads", "experts"),
    "jamba": ("block", "ssm", "attn_heads"),
    "granitemoehybrid": ("block", "ssm_heads", "attn_heads"),
    "falcon_h1": ("block", "ssm_heads", "mamba"),
    "hymba": ("block", "attn_heads", "mlp"),
}


@pytest.mark.parametrize("family", list(BUILDERS))
def test_candidates_do_not_depend_on_what_is_masked(family):
    """The search lists the next candidates while its plan is masked: a removed block or branch is then a
    stand-in module, but the widths and candidates of every layer must come out as without the mask."""
    adapter = get_adapter(BUILDERS[family]())
    for unit in adapter.all_units():  # every whole component: blocks, SSMs, branches, MLPs
        plan = Plan([unit], adapter.family, adapter.num_layers())
        try:
            expected = adapter.candidates(plan, adapter.unit_kinds)
        except PlanError:  # not removable on its own (Hymba's key/value producers)
            continue
        with adapter.masked(plan):
            assert adapter.candidates(plan, adapter.unit_kinds) == expected, unit


def _model_and_calibration(family):
    """A model whose calibration text it wrote greedily (sharp predictions) *without* block 0, after which
    block 0's output is blown up: removing block 0 is the clear first step (it gives back the text's author),
    so the second step lists and measures width candidates while a Mamba block is masked."""
    model = BUILDERS[family]()
    adapter = get_adapter(model)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(6)
        start = torch.randint(1, 50, (2, 2), generator=torch.Generator().manual_seed(1))
        with adapter.masked(Plan([Unit("block", 0)])):
            ids = model.generate(start, attention_mask=torch.ones_like(start), max_new_tokens=4, do_sample=False,
                                 use_cache=False)
        for name, p in adapter.layers()[0].named_parameters():
            if name.endswith("out_proj.weight"):
                p.mul_(1000)
    return model, CalibrationSet(ids, torch.ones_like(ids), source="greedy", seed=1)


@pytest.mark.parametrize("family", list(BUILDERS))
def test_search_mixing_blocks_and_width_kinds(tmp_path, monkeypatch, family):
    settings = SearchSettings(units=UNITS[family], steps=3, batch_size=1, samples=2, seqlen=6, calibration="greedy",
                              race_delta=None)  # the exact search with its leader phase
    model, calib = _model_and_calibration(family)
    plain = search(model, calib, dataclasses.replace(settings, exact_reference=True), progress=False)
    assert plain.plan.units[0] == Unit("block", 0)

    # The accelerated search, killed in the middle of its second step, then resumed.
    original, calls = Evaluator.layered, {"n": 0}

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # per step: 2 batches for the leader, then 2 for the other candidates
            raise RuntimeError("killed")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Evaluator, "layered", flaky)
    model, calib = _model_and_calibration(family)
    with pytest.raises(RuntimeError, match="killed"):
        search(model, calib, settings, out_dir=tmp_path, progress=False)
    journal = json.loads((tmp_path / JOURNAL_NAME).read_text())
    assert len(journal["steps"]) == 1 and any(journal["partial"]["batches"].values())
    monkeypatch.setattr(Evaluator, "layered", original)
    fast = search(model, calib, settings, out_dir=tmp_path, progress=False)

    assert fast.plan == plain.plan
    for p_step, f_step in zip(plain.steps, fast.steps):
        p_ppl = {c["unit"]: c["ppl"] for c in p_step["candidates"]}
        assert [c["unit"] for c in f_step["candidates"]] == list(p_ppl)
        for c in f_step["candidates"]:
            if c["status"] == "done":
                assert c["ppl"] == pytest.approx(p_ppl[c["unit"]], rel=1e-5)
