"""benchmarks/reference_loop.py and bench_reference_loop.py on CPU: the reference's greedy loop (masking by
module swap) picks what hf_shedder's searches pick; the weight mapping; the GPU script's clean exit."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hf_shedder.arch import get_adapter
from hf_shedder.search import SearchSettings, search
from hf_shedder.units import Plan, Unit
from tests.test_search import _peaked
from tests.tiny_models import build_tiny

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_reference_loop as bench  # noqa: E402
from reference_loop import ScanFreeMamba2, SkipHFBlock, Swapper, reference_search  # noqa: E402


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_reference_loop_by_module_swap_picks_the_searches_plan(family):
    model, calib = _peaked(family, num_layers=5, n=6)
    layers = model.backbone.layers
    originals = list(layers)
    swapper = Swapper(layers, "block", SkipHFBlock)
    batches = list(calib.input_ids.split(2))
    ref = reference_search(lambda ids: model(ids, use_cache=False).logits, swapper, batches, steps=3)
    assert list(layers) == originals  # every module is back in place
    settings = dict(units=("block",), steps=3, batch_size=2, samples=6, seqlen=calib.input_ids.shape[1],
                    calibration="greedy")
    exact = search(model, calib, SearchSettings(race_delta=None, early_abandon=False, **settings), progress=False)
    default = search(model, calib, SearchSettings(**settings), progress=False)
    assert [s["chosen"] for s in ref] == [u.layer for u in exact.plan.units] == [u.layer for u in default.plan.units]
    for r, st in zip(ref, exact.steps):
        ours = {c["unit"]: c["ppl"] for c in st["candidates"]}
        assert {f"block@{k}": v for k, v in r["candidates"].items()} == pytest.approx(ours, rel=1e-4)
        assert r["layer_evals"] == len(batches) * len(r["candidates"]) * (5 - r["step"] - 1)


def test_scan_free_mixer_is_the_searchs_ssm_removal():
    """ScanFreeMamba2 (written against mamba-ssm's attribute names) computes what hf_shedder's SSM mask
    computes, run here on a Transformers Mamba-2 mixer through a name shim."""
    model = build_tiny("mamba2", num_layers=2)
    mixer = model.backbone.layers[0].mixer
    shim = SimpleNamespace(in_proj=mixer.in_proj, conv1d=mixer.conv1d, act=mixer.act, norm=mixer.norm,
                           out_proj=mixer.out_proj, d_ssm=mixer.intermediate_size, ngroups=mixer.n_groups,
                           d_state=mixer.ssm_state_size, nheads=mixer.num_heads, rmsnorm=True)
    h = torch.randn(2, 7, model.config.hidden_size)
    adapter = get_adapter(model)
    with torch.no_grad():
        full = mixer(h)
        with adapter.masked(Plan([Unit("ssm", 0)])):
            masked = model.backbone.layers[0].mixer(h)
        ours = ScanFreeMamba2(shim)(h)
    assert torch.allclose(ours, masked, atol=1e-5)
    assert not torch.allclose(ours, full, atol=1e-3)  # the scan did something


def test_weight_names_map_both_ways_and_mismatches_are_errors():
    a, b = build_tiny("mamba2", num_layers=2, seed=0), build_tiny("mamba2", num_layers=2, seed=1)
    for k in a.state_dict():
        assert bench.ssm_to_hf_key(bench.hf_to_ssm_key(k)) == k
    assert bench.hf_to_ssm_key("backbone.embeddings.weight") == "backbone.embedding.weight"
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        bench.copy_weights(a, b, lambda k: bench.ssm_to_hf_key(bench.hf_to_ssm_key(k)))
        assert torch.equal(a(ids).logits, b(ids).logits)
        with pytest.raises(RuntimeError, match="mapping mismatch"):
            bench.copy_weights(a, b, bench.hf_to_ssm_key)


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_configs_round_trip(family):
    spec = bench.ssm_spec(family, layers=3, hidden=128)
    config = bench.hf_config_from_spec(spec)
    assert config.num_hidden_layers == 3 and config.vocab_size == bench.VOCAB
    assert bench.spec_from_hf_config(config) == spec


def test_gpu_script_parses_and_exits_cleanly_without_cuda_or_mamba_ssm(tmp_path, capsys):
    args = bench.parse_args(["--out", str(tmp_path)])
    assert args.dtype == "float16" and args.ref_batch_size == 2 and args.layers == 64 and args.hidden == 2560
    if bench.missing_requirements() is None:
        pytest.skip("CUDA and mamba-ssm present: the script would run")
    assert bench.main(["--out", str(tmp_path), "--time-limit", "5"]) == 2
    data = json.loads((tmp_path / "reference_loop.json").read_text())
    assert "CUDA" in data["error"] or "mamba_ssm" in data["error"]
    assert "cannot run" in capsys.readouterr().out
