"""The greedy search: accelerated == plain reference loop, resumable journal, outputs, CLI."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from hf_shedder.arch import get_adapter
from hf_shedder.cli import main
from hf_shedder.data import CalibrationSet, load_calibration, load_tokenizer
from hf_shedder.errors import SearchError
from hf_shedder.search import JOURNAL_NAME, SearchSettings, search
from hf_shedder.search.engine import max_removable
from hf_shedder.search.evaluator import Evaluator
from hf_shedder.search.settings import identity_hash
from hf_shedder.units import Plan, Unit
from tests.tiny_models import VOCAB, build_tiny

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _calib(n: int = 4, length: int = 32, seed: int = 0) -> CalibrationSet:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, length), generator=g)
    return CalibrationSet(ids, torch.ones_like(ids), source="random", seed=seed)


def _peaked(family: str, num_layers: int = 5, n: int = 6):
    """A tiny model with sharp output distributions and calibration text it generated greedily: the base
    perplexity is low and removing an important unit costs a lot, as in a trained model."""
    model = build_tiny(family, num_layers=num_layers)
    with torch.no_grad():
        model.backbone.norm_f.weight.mul_(8.0)
        start = torch.randint(0, VOCAB, (n, 4), generator=torch.Generator().manual_seed(1))
        ids = model.generate(start, attention_mask=torch.ones_like(start), max_new_tokens=28, do_sample=False)
    return model, CalibrationSet(ids, torch.ones_like(ids), source="greedy", seed=1)


def _settings(**kw) -> SearchSettings:
    # the exact searches (racing, the default, is tested in test_search_racing.py)
    base = dict(units=("block",), steps=3, batch_size=2, samples=4, seqlen=32, calibration="random", race_delta=None)
    base.update(kw)
    return SearchSettings(**base)


def _comparable(steps):
    """Step records without timings and work counters (which depend on the run, not the result)."""
    return [{k: v for k, v in s.items() if k not in ("seconds", "counters")} for s in steps]


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
@pytest.mark.parametrize("units", [("block",), ("ssm",), ("ssm", "block")])
def test_accelerated_search_returns_the_plain_loops_plan(family, units):
    calib = _calib()
    plain = search(build_tiny(family, num_layers=5), calib, _settings(units=units, exact_reference=True), progress=False)
    fast = search(build_tiny(family, num_layers=5), calib, _settings(units=units), progress=False)
    _check_same_search(plain, fast, units)


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_exact_early_abandon_on_a_peaked_model(family):
    """Sharp predictions (like a trained model): some candidates are provably worse than the leader
    after part of the calibration data and are dropped, yet the plan is the plain loop's."""
    units = ("ssm", "block")
    plain = search(*_peaked(family), _settings(units=units, exact_reference=True), progress=False)
    full = search(*_peaked(family), _settings(units=units, early_abandon=False), progress=False)
    fast = search(*_peaked(family), _settings(units=units), progress=False)
    _check_same_search(plain, fast, units)
    assert full.plan == plain.plan
    if family == "mamba2":  # (the tiny Mamba-1's candidates lie too close together to abandon any)
        assert any(c["status"] == "abandoned" for st in fast.steps for c in st["candidates"])
        assert fast.counters["layer_evals"] < full.counters["layer_evals"]


def _check_same_search(plain, fast, units):
    assert [str(u) for u in fast.plan] == [str(u) for u in plain.plan]
    assert len(fast.plan) == 3 and fast.plan.kinds() <= set(units)
    # every candidate the accelerated search measured fully has the plain loop's perplexity
    for p_step, f_step in zip(plain.steps, fast.steps):
        p_ppl = {c["unit"]: c["ppl"] for c in p_step["candidates"]}
        for c in f_step["candidates"]:
            if c["status"] == "done":
                assert c["ppl"] == pytest.approx(p_ppl[c["unit"]], rel=1e-6)
            else:  # abandoned: its proven lower bound is above the winner and below its true value
                assert c["status"] == "abandoned"
                assert f_step["ppl"] < c["ppl_lower_bound"] <= p_ppl[c["unit"]] * (1 + 1e-6)
    assert fast.base_ppl == pytest.approx(plain.base_ppl, rel=1e-6)
    assert fast.counters["layer_evals"] < plain.counters["layer_evals"]


def test_layer_evaluation_counts_and_ratio():
    """Blocks of an L-layer model, one step, B batches, no early abandon.

    Plain loop: the base plan and each of the L candidates run L (resp. L-1) layers per batch:
    B * (L + L*(L-1)). Accelerated: one prefix pass of L layers per batch (which also gives the base
    perplexity), then candidate j runs only layers j+1..L-1: B * (L + L*(L-1)/2). For L=8 the ratio is
    64/36 = 1.78x in layer evaluations; the head (vocabulary projection) runs equally often in both.
    """
    L, B = 8, 2
    calib = _calib()
    kw = dict(units=("block",), steps=1, early_abandon=False)
    plain = search(build_tiny("mamba2", num_layers=L), calib, _settings(exact_reference=True, **kw), progress=False)
    fast = search(build_tiny("mamba2", num_layers=L), calib, _settings(**kw), progress=False)
    assert plain.plan == fast.plan
    assert plain.counters["layer_evals"] == B * (L + L * (L - 1))
    assert fast.counters["layer_evals"] == B * (L + L * (L - 1) // 2)
    assert plain.counters["head_evals"] == fast.counters["head_evals"] == B * (L + 1)
    ratio = plain.counters["layer_evals"] / fast.counters["layer_evals"]
    assert ratio > 1.75, ratio
    # with exact early abandon (default) the accelerated search may only do less work: its leader (here
    # block@0) needs no prefix, and the base plan rides along the main pass instead of the leader's
    abandon = search(build_tiny("mamba2", num_layers=L), calib, _settings(units=("block",), steps=1), progress=False)
    assert abandon.plan == plain.plan
    assert abandon.counters["layer_evals"] <= fast.counters["layer_evals"]


@pytest.mark.parametrize(("exact", "kill_at"), [(False, 4), (False, 7), (True, 22)])
def test_kill_mid_step_then_resume_gives_the_same_plan_and_journal(tmp_path, monkeypatch, exact, kill_at):
    calib = _calib()
    settings = _settings(units=("ssm", "block"), steps=2, exact_reference=exact)
    ref = search(build_tiny("mamba2", num_layers=4), calib, settings, out_dir=tmp_path / "ref", progress=False)

    method = "plain" if exact else "layered"
    original = getattr(Evaluator, method)
    calls = {"n": 0}
    # batch evaluations per step: accelerated 2 (leader) + 2 (others, with the base plan in the first
    # step); plain 2 x (8 + 1 base) candidates. Killed in the first step's main pass or in the second step.

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == kill_at:  # in the middle of the second step
            raise RuntimeError("killed")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Evaluator, method, flaky)
    model = build_tiny("mamba2", num_layers=4)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="killed"):
        search(model, calib, settings, out_dir=out, progress=False)
    journal = json.loads((out / JOURNAL_NAME).read_text())
    assert len(journal["steps"]) == (0 if kill_at == 4 else 1)
    assert journal["partial"] is not None and not journal["done"]
    assert any(journal["partial"]["batches"].values())  # mid-step progress was saved
    assert not (out / "plan.json").exists()

    monkeypatch.setattr(Evaluator, method, original)
    resumed = search(model, calib, settings, out_dir=out, progress=False)
    assert resumed.plan == ref.plan
    final = json.loads((out / JOURNAL_NAME).read_text())
    ref_journal = json.loads((tmp_path / "ref" / JOURNAL_NAME).read_text())
    assert _comparable(final["steps"]) == _comparable(ref_journal["steps"])
    assert final["base"] == ref_journal["base"] and final["done"] and final["partial"] is None
    assert final["settings_hash"] == ref_journal["settings_hash"]
    # a finished journal is simply read back
    again = search(model, calib, settings, out_dir=out, progress=False)
    assert again.plan == ref.plan and again.counters == resumed.counters


def test_two_runs_with_one_seed_give_one_plan():
    tok = load_tokenizer()
    model = build_tiny("mamba", num_layers=3, vocab_size=len(tok))
    a_cal = load_calibration("bundled", tok, n_samples=4, seqlen=24, seed=3)
    b_cal = load_calibration("bundled", tok, n_samples=4, seqlen=24, seed=3)
    assert torch.equal(a_cal.input_ids, b_cal.input_ids)
    s = _settings(units=("ssm",), steps=2, calibration="bundled", seqlen=24, seed=3)
    a, b = search(model, a_cal, s, progress=False), search(model, b_cal, s, progress=False)
    assert a.plan == b.plan and a.candidate_ppls == b.candidate_ppls


def test_journal_written_with_other_settings_is_refused(tmp_path):
    calib = _calib()
    model = build_tiny("mamba", num_layers=4)
    search(model, calib, _settings(steps=1), out_dir=tmp_path, progress=False)
    with pytest.raises(SearchError, match=r"other settings(.|\n)*batch_size: journal 2 vs now 4"):
        search(model, calib, _settings(steps=1, batch_size=4), out_dir=tmp_path, progress=False)
    with pytest.raises(SearchError, match="calibration_fingerprint"):
        search(model, _calib(seed=1), _settings(steps=1), out_dir=tmp_path, progress=False)
    with pytest.raises(SearchError, match="model.weights_checksum"):
        search(build_tiny("mamba", num_layers=4, seed=1), calib, _settings(steps=1), out_dir=tmp_path, progress=False)
    # stopping rules are not part of the hash: a finished search can be extended
    longer = search(model, calib, _settings(steps=2), out_dir=tmp_path, progress=False)
    assert len(longer.plan) == 2


def test_resume_with_the_same_model_at_another_path(tmp_path, saved_model, capsys):
    """Architecture hash and weight checksum identify the model; its path is kept only for information."""
    copy = tmp_path / "elsewhere"
    shutil.copytree(saved_model, copy)
    out = tmp_path / "search"
    common = ["--units", "ssm", "--calibration", "bundled", "--samples", "2", "--seqlen", "24",
              "--batch-size", "2", "--out", str(out), "--device", "cpu", "--no-progress"]
    assert main(["prune", "--model", str(saved_model), "--steps", "1", *common]) == 0
    first = json.loads((out / JOURNAL_NAME).read_text())
    assert main(["prune", "--model", str(copy), "--steps", "2", *common]) == 0, capsys.readouterr().err
    journal = json.loads((out / JOURNAL_NAME).read_text())
    assert journal["steps"][0] == first["steps"][0] and len(journal["steps"]) == 2
    assert journal["base_model"] == str(saved_model)

    # a journal written while the name was part of the identity (and before calibration_mode) resumes too
    journal["identity"]["model.name"] = "some/other/path"
    del journal["identity"]["calibration_mode"]
    journal["settings_hash"] = identity_hash(journal["identity"])
    (out / JOURNAL_NAME).write_text(json.dumps(journal))
    assert main(["prune", "--model", str(copy), "--steps", "2", *common]) == 0, capsys.readouterr().err


def test_bad_settings_are_clear_errors():
    model = build_tiny("mamba2", num_layers=4)
    with pytest.raises(SearchError, match="steps=5 is more than the 4 removable block units"):
        search(model, _calib(), _settings(steps=5), progress=False)
    with pytest.raises(SearchError, match="target_params"):
        _settings(target_params=1.5)
    with pytest.raises(SearchError, match="normalize"):
        _settings(normalize="flops")
    with pytest.raises(SearchError, match="calibration_mode"):
        _settings(calibration_mode="rows")


def test_steps_are_checked_against_what_one_plan_can_remove():
    """A layer's last SSM head group goes only with its SSM: 4 groups per layer, 3 removable."""
    model = build_tiny("mamba2", num_layers=3)
    adapter = get_adapter(model)
    assert len(adapter.candidates(adapter.empty_plan(), ("ssm_heads",))) == 12
    assert max_removable(adapter, ("ssm_heads",)) == 9
    assert max_removable(adapter, ("ssm_heads",), limit=4) == 4
    # nested kinds: heads, then the SSM, then the block of every layer
    assert max_removable(adapter, ("block", "ssm", "ssm_heads")) == 15
    assert max_removable(adapter, ("ssm", "block")) == 6
    with pytest.raises(SearchError, match=r"steps=10 is more than the 9 removable ssm_heads units(.|\n)*at most 9"):
        search(model, _calib(), _settings(units=("ssm_heads",), steps=10), progress=False)


def test_cli_says_why_a_search_stopped_early(tmp_path, saved_model, capsys):
    """With ssm,block every unit may go, but only if each SSM goes before its block; the search does not
    plan for that, so it can run out of candidates: the CLI says so instead of stopping silently."""
    out = tmp_path / "search"
    argv = ["prune", "--model", str(saved_model), "--units", "ssm,block", "--steps", "8", "--calibration",
            "bundled", "--samples", "2", "--seqlen", "24", "--batch-size", "2", "--out", str(out), "--device", "cpu",
            "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    n = len(json.loads((out / "plan.json").read_text())["units"])
    assert n < 8 and "(no_candidates)" in printed
    assert f"note: stopped after {n} of 8 steps: no removable ssm,block unit is left" in printed


def test_stopping_rules_and_outputs(tmp_path):
    calib = _calib()
    model = build_tiny("mamba2", num_layers=6)
    full = search(model, calib, _settings(steps=4), out_dir=tmp_path / "full", progress=False)
    # a parameter target reached after two removals stops the search there
    frac = (full.trajectory[2]["params"] + 1) / full.base_params
    short = search(model, calib, _settings(steps=4, target_params=frac), progress=False)
    assert short.stop_reason == "target_params" and short.plan == full.plan.prefix(2)
    # a perplexity ceiling just below step 3's perplexity stops before the first step above it
    ceiling = full.trajectory[3]["ppl"] * (1 - 1e-9)
    keep = next(s - 1 for s in range(1, 5) if full.trajectory[s]["ppl"] > ceiling)
    capped = search(model, calib, _settings(steps=4, max_ppl=ceiling), progress=False)
    assert capped.stop_reason == "max_ppl" and capped.plan == full.plan.prefix(keep)

    out = tmp_path / "full"
    assert (out / "trajectory.png").read_bytes()[:8] == PNG_MAGIC
    plan = json.loads((out / "plan.json").read_text())
    assert [u["layer"] for u in plan["units"]] == [u.layer for u in full.plan]
    assert json.loads((out / "pruning_config.json").read_text()) == {
        "pruned_mamba_block_idx": [u.layer for u in full.plan]}
    rows = (out / "trajectory.csv").read_text().splitlines()
    assert rows[0] == "step,unit,ppl,params,seconds" and len(rows) == 1 + 1 + 4
    traj = json.loads((out / "trajectory.json").read_text())
    assert [r["params"] for r in traj["rows"]] == sorted((r["params"] for r in traj["rows"]), reverse=True)
    assert traj["counters"]["layer_evals"] == full.counters["layer_evals"] > 0


def test_mixed_block_and_ssm_plan_gets_a_reference_file(tmp_path):
    """The reference writes pruned_mamba_block_idx and pruned_ssm_idx side by side; the file reads back as
    a valid plan removing the same units even when a layer lost its SSM and then its block."""
    model = build_tiny("mamba2", num_layers=4)
    result = search(model, _calib(), _settings(units=("ssm", "block"), steps=4), out_dir=tmp_path, progress=False)
    # this plan removes a layer's SSM and later its block: the order a reference file must keep
    assert any(Unit("block", u.layer) in result.plan for u in result.plan.of_kind("ssm"))
    ref = json.loads((tmp_path / "pruning_config.json").read_text())
    assert ref == {"pruned_ssm_idx": [u.layer for u in result.plan.of_kind("ssm")],
                   "pruned_mamba_block_idx": [u.layer for u in result.plan.of_kind("block")]}
    adapter = get_adapter(model)
    back = Plan.load(tmp_path / "pruning_config.json", family=adapter.family, num_layers=adapter.num_layers())
    adapter.validate(back)
    assert set(back.units) == set(result.plan.units)


def test_normalized_and_raced_searches():
    calib = _calib()
    kw = dict(units=("ssm", "block"), steps=2, normalize="params")
    plain = search(build_tiny("mamba", num_layers=5), calib, _settings(exact_reference=True, **kw), progress=False)
    fast = search(build_tiny("mamba", num_layers=5), calib, _settings(**kw), progress=False)
    assert fast.plan == plain.plan
    assert all("params_removed" in c for c in fast.steps[0]["candidates"])
    # racing is an approximation: it runs, says which candidates it dropped, and is off by default
    assert SearchSettings().race_fraction is None
    raced = search(build_tiny("mamba", num_layers=5), _calib(n=8), _settings(units=("block",), steps=1,
                   race_fraction=0.25, race_keep=2, early_abandon=False), progress=False)
    statuses = [c["status"] for c in raced.steps[0]["candidates"]]
    assert statuses.count("done") == 2 and statuses.count("raced_out") == 3


@pytest.fixture
def saved_model(tmp_path):
    tok = load_tokenizer()
    model = build_tiny("mamba2", num_layers=4, vocab_size=len(tok))
    path = tmp_path / "base"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_cli_prune_end_to_end_with_apply(tmp_path, saved_model, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "search"
    argv = ["prune", "--model", str(saved_model), "--units", "ssm", "--steps", "2", "--calibration", "bundled",
            "--samples", "4", "--seqlen", "24", "--batch-size", "2", "--out", str(out), "--device", "cpu",
            "--apply", "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "plan: ['ssm@" in printed and "layer evaluations" in printed
    plan = json.loads((out / "plan.json").read_text())
    assert len(plan["units"]) == 2 and {u["kind"] for u in plan["units"]} == {"ssm"}
    assert set(json.loads((out / "pruning_config.json").read_text())) == {"pruned_ssm_idx"}
    pruned = AutoModelForCausalLM.from_pretrained(out / "model")
    assert [u.to_dict() for u in pruned.plan] == plan["units"]
    assert (out / "model" / "tokenizer.json").is_file()
    assert sum(p.numel() for p in pruned.parameters()) == json.loads((out / "trajectory.json").read_text())["rows"][-1]["params"]
    # same command again: resumes from the finished journal, same plan
    assert main(argv) == 0
    assert json.loads((out / "plan.json").read_text()) == plan


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--steps", "9"], "steps=9 is more than the 4 removable"),
        (["--calibration", "wikitext"], "unknown calibration/evaluation source 'wikitext'"),
        (["--samples", "5000"], r"needs 5000 x 24 = 120000 tokens, the text gives"),
        (["--calibration", "EMPTY"], "the text is empty"),
        (["--calibration", "wikitext2"], "cannot fetch Salesforce/wikitext.*local file"),
        (["--exact", "--race-delta", "0.01"], "--exact turns racing off"),
        (["--race-delta", "2"], "race_delta must be in"),
    ],
)
def test_cli_prune_errors_are_clean(tmp_path, saved_model, capsys, extra, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    argv = ["prune", "--model", str(saved_model), "--steps", "1", "--calibration", "bundled", "--samples", "2",
            "--seqlen", "24", "--out", str(tmp_path / "out"), "--device", "cpu", "--no-progress"]
    argv += [str(empty) if a == "EMPTY" else a for a in extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "hf-shedder prune: error:" in err
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "out" / "plan.json").exists()


def test_cli_reference_calibration_mode(tmp_path, saved_model, capsys):
    """--calibration-mode reference draws rows as the reference's prune.py; the journal records and checks it."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": f"Line {i}: the quick brown fox jumps over the lazy dog."}) + "\n"
                            for i in range(30)))
    out = tmp_path / "search"
    argv = ["prune", "--model", str(saved_model), "--units", "ssm", "--steps", "1", "--calibration", str(rows),
            "--samples", "6", "--seqlen", "24", "--batch-size", "4", "--out", str(out), "--device", "cpu",
            "--no-progress"]
    assert main([*argv, "--calibration-mode", "reference"]) == 0, capsys.readouterr().err
    ident = json.loads((out / JOURNAL_NAME).read_text())["identity"]
    assert ident["calibration_mode"] == "reference"
    tok = load_tokenizer()
    ref = load_calibration(str(rows), tok, n_samples=6, seqlen=24, seed=42, mode="reference")
    win = load_calibration(str(rows), tok, n_samples=6, seqlen=24, seed=42, mode="windows")
    assert ident["calibration_fingerprint"] == ref.fingerprint() != win.fingerprint()
    # the default mode on the same journal is refused, naming the difference
    assert main(argv) == 2
    assert "calibration_mode: journal 'reference' vs now 'windows'" in capsys.readouterr().err


def test_cli_prune_offline_model_name(tmp_path, capsys):
    argv = ["prune", "--model", "state-spaces/mamba2-130m-not-here", "--steps", "1", "--calibration", "bundled",
            "--samples", "2", "--seqlen", "24", "--out", str(tmp_path / "o"), "--device", "cpu", "--no-progress"]
    assert main(argv) == 2
    assert "cannot fetch 'state-spaces/mamba2-130m-not-here'" in capsys.readouterr().err


def test_extending_a_search_without_apply_removes_the_older_model(tmp_path, saved_model, capsys):
    out = tmp_path / "search"
    common = ["--model", str(saved_model), "--units", "ssm", "--calibration", "bundled", "--samples", "2",
              "--seqlen", "24", "--batch-size", "2", "--out", str(out), "--device", "cpu", "--no-progress"]
    assert main(["prune", "--steps", "1", "--apply", *common]) == 0
    assert (out / "model" / "config.json").is_file()
    capsys.readouterr()
    assert main(["prune", "--steps", "1", *common]) == 0  # same plan: the extracted model still matches it
    printed = capsys.readouterr().out
    assert (out / "model").is_dir() and "removed" not in printed
    assert printed.count("resuming the search in") == 1  # a resumed run says so, in one line
    assert main(["prune", "--steps", "2", *common]) == 0
    printed = capsys.readouterr().out
    assert not (out / "model").exists()
    assert f"removed {out / 'model'}" in printed and "--apply" in printed
    assert len(json.loads((out / "plan.json").read_text())["units"]) == 2


def test_cli_and_python_api_agree_on_the_calibration_perplexity_of_a_bf16_checkpoint(tmp_path, capsys):
    """A half-precision checkpoint is computed in float32 on CPU by the CLI, as the Python API (and the demo)
    load it: the same settings give the same calibration perplexity (they differed: 349.51 vs 349.27)."""
    import re

    from hf_shedder.loading import load_model

    tok = load_tokenizer()
    path = tmp_path / "bf16"
    build_tiny("mamba2", num_layers=3, vocab_size=len(tok)).to(torch.bfloat16).save_pretrained(path)
    assert main(["prune", "--model", str(path), "--units", "ssm", "--steps", "1", "--calibration", "bundled",
                 "--samples", "2", "--seqlen", "24", "--batch-size", "2", "--out", str(tmp_path / "s"),
                 "--device", "cpu", "--no-progress", "--apply"]) == 0
    cli_ppl = re.search(r"perplexity (\S+) -> (\S+);", capsys.readouterr().out).groups()
    model = load_model(str(path), dtype=torch.float32)
    calib = load_calibration("bundled", tok, n_samples=2, seqlen=24, seed=42)
    api = search(model, calib, SearchSettings(units=("ssm",), steps=1, calibration="bundled", samples=2, seqlen=24,
                                              batch_size=2), progress=False)
    assert cli_ppl == (f"{api.base_ppl:.4g}", f"{api.trajectory[-1]['ppl']:.4g}")
    # the extracted model is saved in the checkpoint's own dtype
    assert json.loads((tmp_path / "s" / "model" / "config.json").read_text())["base_config"]["dtype"] == "bfloat16"


def test_progress_in_a_log_has_no_cursor_codes_and_one_line_per_step(tmp_path, capsys):
    """Nested tqdm bars write cursor-up codes (ESC [A) that litter a log; in a log each step's bar is one line."""
    search(build_tiny("mamba2", num_layers=3), _calib(), _settings(steps=2), out_dir=tmp_path, progress=True)
    err = capsys.readouterr().err
    assert "\x1b[A" not in err
    assert "step 1 candidates x batches" in err and "step 2 candidates x batches" in err
    assert "search steps" not in err
    search(build_tiny("mamba2", num_layers=3), _calib(), _settings(steps=2), out_dir=tmp_path, progress=False)
    assert capsys.readouterr().out.count("resuming the search in") == 1
