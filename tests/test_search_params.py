"""``normalize="params"``: removed-parameter counts on top of the whole plan, and racing by the same score."""

from __future__ import annotations

import json
import math

import torch

from hf_shedder.data import CalibrationSet
from hf_shedder.loading import skeleton_parameters
from hf_shedder.search import JOURNAL_NAME, SearchSettings, search
from hf_shedder.units import Unit
from tests.test_arch_hymba import VOCAB as HYMBA_VOCAB
from tests.test_arch_hymba import build as build_hymba
from tests.tiny_hybrids import VOCAB, build_tiny_hybrid
from tests.tiny_models import build_tiny


def _calib(vocab: int, n: int = 2, length: int = 16) -> CalibrationSet:
    ids = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0))
    return CalibrationSet(ids, torch.ones_like(ids), source="random", seed=0)


def _settings(**kw) -> SearchSettings:  # noqa: ANN003
    base = dict(steps=1, batch_size=2, normalize="params", early_abandon=False, calibration="random")
    base.update(kw)
    return SearchSettings(**base)


def _search_after(model, calib, settings, first: Unit, out):  # noqa: ANN001, ANN202
    """Resume a search from a journal whose first step removed ``first`` (its second step is under test)."""
    search(model, calib, settings, out_dir=out, progress=False)
    journal = json.loads((out / JOURNAL_NAME).read_text())
    step = journal["steps"][0]
    step.update(unit=first.to_dict(), key=f"{first.kind}@{first.layer}")
    (out / JOURNAL_NAME).write_text(json.dumps(journal))
    settings.steps = 2
    return search(model, calib, settings, out_dir=out, progress=False)


def test_removed_parameters_count_units_on_other_layers(tmp_path):
    """Zamba2's shared block anchored at layer 1 is used by layers 1 and 5: once block@1 is gone, hybrid@5
    removes the shared block's last use and with it all its weights, not just the per-use adapters."""
    model = build_tiny_hybrid("zamba2")
    settings = _settings(units=("block", "hybrid"))
    result = _search_after(model, _calib(VOCAB), settings, Unit("block", 1), tmp_path)
    plan = result.plan.prefix(1)
    assert [str(u) for u in plan] == [str(Unit("block", 1))]

    def params(p) -> int:  # noqa: ANN001
        return skeleton_parameters(model.config, p)

    rows = {c["unit"]: c for c in result.steps[1]["candidates"]}
    for key, row in rows.items():
        kind, layer = key.split("@")
        unit = Unit(kind, int(layer))
        assert row["params_removed"] == params(plan) - params(plan.extended(unit)), key
    # on its own layer only, hybrid@5 would remove just that use's adapters
    alone = params(plan.prefix(0)) - params(plan.prefix(0).extended(Unit("hybrid", 5)))
    assert rows["hybrid@5"]["params_removed"] > alone
    assert rows["hybrid@5"]["score"] == (rows["hybrid@5"]["mean_nll"] - result.steps[0]["mean_nll"]) / \
        rows["hybrid@5"]["params_removed"]


def test_candidate_valid_only_on_top_of_the_plan(tmp_path):
    """Hymba: block@1 computes the keys/values layer 2 reuses, so it becomes a candidate only once attn@2 is
    gone; its count must be taken on top of the plan (on its own it is not a valid plan)."""
    model = build_hymba()
    result = _search_after(model, _calib(HYMBA_VOCAB), _settings(units=("attn", "block"), extra={"wide_block_candidates": True}),
                           Unit("attn", 2), tmp_path)
    rows = {c["unit"]: c for c in result.steps[1]["candidates"]}
    plan = result.plan.prefix(1)
    expected = skeleton_parameters(model.config, plan) - skeleton_parameters(model.config, plan.extended(Unit("block", 1)))
    assert rows["block@1"]["params_removed"] == expected > 0


def test_racing_ranks_by_the_normalized_score():
    """With normalize="params" the race must keep the candidates with the best score per removed parameter,
    as the step ranks them, not those with the lowest raw NLL. The calibration set repeats one batch, so
    what the race has seen at the cut is representative and its ranking must be the full one."""
    L = 4
    one = _calib(64, n=2)
    calib = CalibrationSet(one.input_ids.repeat(4, 1), one.attention_mask.repeat(4, 1), source="repeated")
    kw = dict(units=("ssm", "block"), race_keep=2)
    full = search(build_tiny("mamba", num_layers=L), calib, _settings(**kw), progress=False)
    raced = search(build_tiny("mamba", num_layers=L), calib, _settings(race_fraction=0.5, **kw), progress=False)
    by_score = sorted(full.steps[0]["candidates"], key=lambda c: c["score"])
    by_nll = sorted(full.steps[0]["candidates"], key=lambda c: c["mean_nll"])
    # the two rankings disagree here, so ranking by raw NLL would keep other candidates
    assert {c["unit"] for c in by_score[:2]} != {c["unit"] for c in by_nll[:2]}
    kept = {c["unit"] for c in raced.steps[0]["candidates"] if c["status"] == "done"}
    assert kept == {c["unit"] for c in by_score[:2]}
    assert raced.plan == full.plan
    for c in raced.steps[0]["candidates"]:
        if c["status"] == "done":
            assert math.isclose(c["score"], next(f["score"] for f in full.steps[0]["candidates"]
                                                 if f["unit"] == c["unit"]), rel_tol=1e-9)
