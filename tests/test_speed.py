"""Speed benchmark plumbing on CPU (no speed claims here: those come from GPU benchmarks)."""

from __future__ import annotations

import pytest
import torch

from hf_shedder.errors import ShedderError
from hf_shedder.evaluation.speed import SpeedComparison, benchmark_speed, compare_speed
from tests.tiny_models import build_tiny

SMALL = dict(batch_size=2, prefill_len=16, decode_tokens=4, decode_batch_sizes=(1, 2), warmup=1, repeats=2)


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_benchmark_reports_every_number(family: str) -> None:
    model = build_tiny(family, num_layers=2)
    res = benchmark_speed(model, **SMALL)
    assert res.device == "cpu" and res.dtype == "float32"
    assert res.prefill_tokens_per_s > 0 and res.prefill_seconds > 0
    assert res.prefill_tokens_per_s == pytest.approx(2 * 16 / res.prefill_seconds)
    assert res.decode_batch_sizes == (1, 2)
    # a size is absent only when CPU timing noise made (N tokens) - (1 token) non-positive
    assert set(res.decode_tokens_per_s) <= {1, 2} and all(v > 0 for v in res.decode_tokens_per_s.values())
    assert res.memory_kind == "cpu_peak_rss_increase"
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
