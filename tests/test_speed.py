"""Speed benchmark plumbing on CPU (no speed claims here: those come from GPU benchmarks)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import hf_shedder
from hf_shedder import Plan, Unit
from hf_shedder.cli import main
from hf_shedder.commands.bench import ideal_speedup
from hf_shedder.errors import ShedderError
from hf_shedder.evaluation.speed import (
    SpeedComparison,
    SpeedResult,
    benchmark_pair_in_subprocesses,
    benchmark_speed,
    compare_speed,
)
from tests.tiny_models import build_tiny

# 12 new tokens: enough decode steps that t(12) - t(1) is not swamped by timing noise
SMALL = dict(batch_size=2, prefill_len=16, decode_tokens=12, decode_batch_sizes=(1, 2), warmup=1, repeats=3)
LINUX = sys.platform.startswith("linux")


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_benchmark_reports_every_number(family: str) -> None:
    model = build_tiny(family, num_layers=2)
    res = benchmark_speed(model, **SMALL)
    assert res.device == "cpu" and res.dtype == "float32"
    assert res.prefill_tokens_per_s > 0 and res.prefill_seconds > 0
    assert res.prefill_tokens_per_s == pytest.approx(2 * 16 / res.prefill_seconds)
    assert res.decode_batch_sizes == (1, 2)
    assert set(res.decode_tokens_per_s) == {1, 2} and all(v > 0 for v in res.decode_tokens_per_s.values())
    if LINUX:  # the RSS high-water mark is reset to the loaded model's RSS, so the peak is what running adds
        assert res.memory_kind == "cpu_peak_rss_over_loaded" and res.peak_memory_bytes is not None
    assert res.n_params == sum(p.numel() for p in model.parameters())


def test_generate_length_is_fixed() -> None:
    # the decode timing relies on min_new_tokens = max_new_tokens: even if EOS is likely, length is fixed
    model = build_tiny("mamba", num_layers=2)
    model.generation_config.eos_token_id = 0
    out = model.generate(input_ids=torch.zeros(2, 3, dtype=torch.long), max_new_tokens=5, min_new_tokens=5,
                         do_sample=False, pad_token_id=0, eos_token_id=None)
    assert out.shape == (2, 8)


def test_compare_table_and_roundtrip() -> None:
    base, pruned = build_tiny("mamba", num_layers=4), build_tiny("mamba", num_layers=2)
    cmp = compare_speed(base, pruned, ideal_ratio=2.0, ideal_label="ideal (layers 4/2)", **SMALL)
    md = cmp.to_markdown()
    assert "| metric | base | pruned | measured speed-up |" in md and "ideal (layers 4/2): 2.00x" in md
    assert "decode tokens/s (batch 2" in md and "prefill tokens/s" in md
    assert cmp.prefill_speedup == pytest.approx(cmp.pruned.prefill_tokens_per_s / cmp.base.prefill_tokens_per_s)
    back = SpeedComparison.from_dict(cmp.to_dict())
    assert back.to_markdown() == md


def test_bad_settings() -> None:
    with pytest.raises(ShedderError):
        benchmark_speed(build_tiny("mamba", num_layers=1), repeats=0)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):  # noqa: ANN201
    root = tmp_path_factory.mktemp("bench")
    base = build_tiny("mamba", num_layers=4)
    base.save_pretrained(root / "base")
    hf_shedder.prune(base, Plan([Unit("block", 1), Unit("block", 2)]),
                     provenance={"base_model": str(root / "base")}).save_pretrained(root / "blocks")
    hf_shedder.prune(base, Plan([Unit("ssm", 1)])).save_pretrained(root / "ssm")
    return root


def test_a_model_benched_against_itself_is_about_as_fast(tiny_dirs, capsys) -> None:  # noqa: ANN001
    # A sanity band, not a speed claim: before each model had its own process, the one measured first
    # paid the process's one-time costs (1.8x "speed-up" of a model over itself, 41 MiB vs 0 MiB).
    model = str(tiny_dirs / "base")
    assert main(["bench", model, "--base", model, "--prefill-len", "32", "--decode-tokens", "8",
                 "--decode-batch-sizes", "1", "--warmup", "1", "--repeats", "3"]) == 0
    printed = capsys.readouterr().out
    res = json.loads((tiny_dirs / "base" / "speed_results.json").read_text())
    assert 0.5 <= res["prefill_speedup"] <= 2.0
    mem = [res[k]["peak_memory_bytes"] for k in ("base", "pruned")]
    assert all(m and m > 0 for m in mem)
    if LINUX:
        assert 0.5 <= mem[1] / mem[0] <= 2.0
        assert "| peak memory MiB" in printed and "n/a" not in printed.split("| peak memory MiB")[1].split("\n")[0]
    for k in ("base", "pruned"):
        assert res[k]["decode_tokens_per_s"]["1"] > 0 and res[k]["extra"]["fresh_process"]
    assert "each model in a fresh process" in printed
    assert "ideal speed-up (parameter ratio base/pruned, a rough proxy: no pruning plan found" in printed


def test_pair_runs_each_model_in_its_own_process(tiny_dirs) -> None:  # noqa: ANN001
    base, pruned = benchmark_pair_in_subprocesses(str(tiny_dirs / "base"), str(tiny_dirs / "blocks"),
                                                  dtype="float32", device="cpu", **SMALL)
    assert base.extra["num_layers"] == 4 and pruned.extra["num_layers"] == 2
    assert base.n_params > pruned.n_params
    for r in (base, pruned):
        assert r.prefill_tokens_per_s > 0 and r.repeats == 3 and r.decode_batch_sizes == (1, 2)
        assert set(r.decode_tokens_per_s) == {1, 2}
    with pytest.raises(ShedderError, match="model directory not found"):
        benchmark_pair_in_subprocesses(str(tiny_dirs / "base"), "./no/such/model", device="cpu", **SMALL)


def _result(n_params: int, layers: int | None) -> SpeedResult:
    return SpeedResult(device="cpu", dtype="float32", n_params=n_params, batch_size=1, prefill_len=8,
                       prefill_seconds=1.0, prefill_tokens_per_s=8.0, decode_tokens=2, decode_tokens_per_s={},
                       peak_memory_bytes=None, memory_kind="cpu_peak_rss_over_loaded", warmup=0, repeats=1,
                       extra={"num_layers": layers})


def test_ideal_is_the_layer_ratio_for_block_plans_else_the_parameter_ratio(tiny_dirs) -> None:  # noqa: ANN001
    ratio, label = ideal_speedup(str(tiny_dirs / "blocks"), _result(1000, 4), _result(600, 2))
    assert ratio == 2.0 and "layer ratio 4/2" in label
    ratio, label = ideal_speedup(str(tiny_dirs / "ssm"), _result(1000, 4), _result(800, 4))
    assert ratio == 1.25 and "parameter ratio" in label and "1 x ssm" in label
