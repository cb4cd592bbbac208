"""Racing on paired per-sample NLL differences (the default search): the bound, the engine, the journal."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hf_shedder.errors import SearchError
from hf_shedder.search import JOURNAL_NAME, SearchSettings, search
from hf_shedder.search.evaluator import Evaluator
from hf_shedder.search.racing import (
    RaceSpec,
    contributions,
    eliminate,
    paired_bound,
    student_t_quantile,
    student_t_sf,
)
from tests.test_search import _peaked, saved_model  # noqa: F401, F811  (fixture)


# ------------------------------------------------------------------ the bound
@pytest.mark.parametrize("p, df, table", [(0.025, 10, 2.228), (0.05, 1, 6.314), (0.005, 2, 9.925),
                                          (0.0005, 30, 3.646), (0.025, 120, 1.980)])
def test_student_t_quantile_matches_printed_tables(p, df, table):
    assert student_t_quantile(p, df) == pytest.approx(table, abs=1.5e-3)
    assert student_t_sf(student_t_quantile(p, df), df) == pytest.approx(p, rel=1e-6)


def test_bound_is_exact_on_all_samples_and_shrinks_with_more():
    diffs = [0.3, -0.1, 0.2, 0.05, 0.4, 0.1, 0.0, 0.25]
    full = paired_bound(diffs, n_total=8, delta_look=1e-4)
    assert full["half_width"] == 0.0 and full["lower_bound"] == pytest.approx(sum(diffs) / 8)
    few = paired_bound(diffs[:4], n_total=100, delta_look=1e-4)
    more = paired_bound(diffs * 4, n_total=100, delta_look=1e-4)
    assert few["half_width"] > more["half_width"] > 0
    # the finite-population correction: the same samples out of a smaller population bound tighter
    assert paired_bound(diffs, 10, 1e-4)["half_width"] < paired_bound(diffs, 1000, 1e-4)["half_width"]


def test_union_bound_over_comparators_and_looks():
    spec = RaceSpec(delta=1e-3, candidates=11, looks=20, min_samples=8)
    assert spec.delta_look == pytest.approx(1e-3 / (10 * 20))
    assert spec.to_dict()["delta"] == 1e-3


def test_mean_paired_difference_ranks_exactly_as_the_score():
    """normalize=params: contributions average to (mean_nll - current) / params, the engine's score."""
    g = torch.Generator().manual_seed(0)
    x = {k: (torch.rand(12, generator=g) * 3 + i).tolist() for i, k in enumerate("abc")}
    base = (torch.rand(12, generator=g) * 2).tolist()
    params = {"a": 50, "b": 400, "c": 1000}
    cur = sum(base) / 12
    for current in (base, cur):  # per sample (first step) or the current plan's mean (later steps)
        for k in "abc":
            score = (sum(x[k]) / 12 - cur) / params[k]
            assert math.fsum(contributions(x[k], 1 / params[k], current)) / 12 == pytest.approx(score, abs=1e-12)
    # None (a sample without targets) is skipped for every candidate alike
    assert contributions([1.0, None, 3.0], 1.0, 0.0) == [1.0, 3.0]


def test_eliminate_drops_only_what_is_clearly_worse():
    g = torch.Generator().manual_seed(1)
    shared = (torch.rand(40, generator=g) * 4).tolist()  # hard and easy samples, common to all
    noise = lambda s: (torch.randn(40, generator=torch.Generator().manual_seed(s)) * 0.01).tolist()  # noqa: E731
    values = {
        "good": [v + e for v, e in zip(shared, noise(2))],
        "tie": [v + e for v, e in zip(shared, noise(3))],
        "bad": [v + 0.2 + e for v, e in zip(shared, noise(4))],
    }
    spec = RaceSpec(1e-3, candidates=3, looks=10, min_samples=8)
    coef = dict.fromkeys(values, 1.0)
    out = eliminate(spec, list(values), values, coef, 0.0, n_total=400)
    assert [e["unit"] for e in out] == ["bad"]
    e = out[0]
    assert e["against"] in ("good", "tie") and e["lower_bound"] > 0 and e["samples"] == 40
    assert e["mean_diff"] - e["half_width"] == pytest.approx(e["lower_bound"])
    # the per-sample scores alone could not separate them: the spread of the samples is 20x the gap
    assert torch.tensor(shared).std().item() > 5 * 0.2
    # before min_samples, and once every sample is seen (the exact pick's job), nothing leaves
    short = {k: v[:6] for k, v in values.items()}
    assert eliminate(spec, list(values), short, coef, 0.0, n_total=400) == []
    assert eliminate(spec, list(values), values, coef, 0.0, n_total=40) == []


def test_race_settings_are_checked():
    assert SearchSettings().race_delta == 1e-3  # racing is the default
    assert SearchSettings(exact_reference=True).race_delta is None  # the plain loop measures everything
    for bad in (0.0, 1.0, -1e-3):
        with pytest.raises(SearchError, match="race_delta"):
            SearchSettings(race_delta=bad)
    with pytest.raises(SearchError, match="race_min_samples"):
        SearchSettings(race_min_samples=1)


# ------------------------------------------------------------------ the engine
def _settings(**kw) -> SearchSettings:
    base = dict(units=("ssm", "block"), steps=2, batch_size=4, samples=32, seqlen=32, calibration="greedy")
    base.update(kw)
    return SearchSettings(**base)


def test_racing_keeps_the_exact_plan_with_less_work_and_journals_every_elimination(tmp_path):
    model, calib = _peaked("mamba2", num_layers=5, n=32)
    exact = search(model, calib, _settings(race_delta=None, early_abandon=False), progress=False)
    raced = search(model, calib, _settings(), out_dir=tmp_path, progress=False)
    assert raced.plan == exact.plan
    assert raced.counters["layer_evals"] < exact.counters["layer_evals"]
    journal = json.loads((tmp_path / JOURNAL_NAME).read_text())
    n_out = 0
    for st, ex in zip(journal["steps"], exact.steps):
        assert st["race"]["delta"] == 1e-3 and st["race"]["delta_look"] < 1e-3
        assert st["key"] == ex["key"] and st["ppl"] == ex["ppl"]  # the pick among survivors is exact
        elim = {e["unit"]: e for e in st["eliminations"]}
        full = {c["unit"]: c for c in ex["candidates"]}
        for c in st["candidates"]:
            if c["status"] == "raced_out":
                n_out += 1
                e = elim[c["unit"]]
                assert e["lower_bound"] > 0 and 1 <= e["batches"] < calib.input_ids.shape[0] // 4
                assert c["eliminated_after_batches"] == e["batches"]
                assert full[c["unit"]]["score"] > full[st["key"]]["score"]  # it really was worse
            else:
                assert c["status"] == "done" and c["ppl"] == full[c["unit"]]["ppl"]
    assert n_out > 0


def test_racing_resumes_mid_step_with_the_same_decisions(tmp_path, monkeypatch):
    model, calib = _peaked("mamba2", num_layers=5, n=32)
    ref = search(model, calib, _settings(), out_dir=tmp_path / "ref", progress=False)
    original = Evaluator.layered
    calls = {"n": 0}

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 11:  # the second step, after a few of its batches
            raise RuntimeError("killed")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Evaluator, "layered", flaky)
    with pytest.raises(RuntimeError, match="killed"):
        search(model, calib, _settings(), out_dir=tmp_path / "run", progress=False)
    partial = json.loads((tmp_path / "run" / JOURNAL_NAME).read_text())["partial"]
    assert partial is not None and partial["main_batches"] > 0
    monkeypatch.setattr(Evaluator, "layered", original)
    resumed = search(model, calib, _settings(), out_dir=tmp_path / "run", progress=False)
    assert resumed.plan == ref.plan
    strip = lambda steps: [{k: v for k, v in s.items() if k not in ("seconds", "counters")} for s in steps]  # noqa: E731
    assert strip(resumed.steps) == strip(ref.steps)


def test_an_exact_journal_is_not_resumed_by_the_raced_default(tmp_path):
    model, calib = _peaked("mamba", num_layers=4, n=8)
    search(model, calib, _settings(race_delta=None, steps=1), out_dir=tmp_path, progress=False)
    with pytest.raises(SearchError, match="race_delta"):
        search(model, calib, _settings(steps=1), out_dir=tmp_path, progress=False)


def test_cli_exact_turns_racing_off(tmp_path, saved_model, capsys):  # noqa: F811
    from hf_shedder.cli import main

    argv = ["prune", "--model", str(saved_model), "--steps", "1", "--calibration", "bundled", "--samples", "2",
            "--seqlen", "24", "--device", "cpu", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "exact"), "--exact"]) == 0
    assert main([*argv, "--out", str(tmp_path / "raced"), "--race-delta", "0.01", "--race-min-samples", "4"]) == 0
    exact = json.loads((tmp_path / "exact" / JOURNAL_NAME).read_text())
    raced = json.loads((tmp_path / "raced" / JOURNAL_NAME).read_text())
    assert exact["settings"]["race_delta"] is None and exact["steps"][0]["race"] is None
    assert raced["settings"]["race_delta"] == 0.01 and raced["steps"][0]["race"]["min_samples"] == 4
