"""Data-parallel and candidate-parallel search over 2 processes (gloo, CPU): the same plan and the
same journal as one process, only rank 0 writes, and a journal can be resumed by another world size."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hf_shedder.data import CalibrationSet
from hf_shedder.search import JOURNAL_NAME, SearchSettings, search
from hf_shedder.search.evaluator import Evaluator
from tests.tiny_models import VOCAB, build_tiny

# (name, settings) run by both worlds; 5 samples in batches of 2 -> 3 batches, uneven over 2 ranks
CASES = {
    "fast": dict(units=("ssm", "block"), race_delta=None),
    "raced": dict(units=("ssm", "block"), race_min_samples=2),
    "plain": dict(units=("ssm", "block"), exact_reference=True),
    "fast_by_candidates": dict(units=("ssm", "block"), split="candidates"),
    "plain_by_candidates": dict(units=("block",), exact_reference=True, split="candidates"),
}


def _calib() -> CalibrationSet:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (5, 24), generator=g)
    return CalibrationSet(ids, torch.ones_like(ids), source="random", seed=0)


def _settings(**kw) -> SearchSettings:
    return SearchSettings(**{"steps": 2, "batch_size": 2, "calibration": "random", **kw})


def _model():
    return build_tiny("mamba2", num_layers=4)


def _worker(rank: int, world: int, root: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/pg", rank=rank, world_size=world)
    try:
        plans = {}
        for name, kw in CASES.items():
            out = Path(root) / f"{name}_rank{rank}"
            res = search(_model(), _calib(), _settings(**kw), out_dir=out, progress=False)
            plans[name] = [str(u) for u in res.plan]
        res = search(_model(), _calib(), _settings(**CASES["fast"]), out_dir=Path(root) / "resume", progress=False)
        plans["resume"] = [str(u) for u in res.plan]
        (Path(root) / f"plans_rank{rank}.json").write_text(json.dumps(plans))
    finally:
        dist.destroy_process_group()


def _comparable(journal):
    return [{k: v for k, v in s.items() if k not in ("seconds", "counters")} for s in journal["steps"]]


def test_two_processes_give_the_single_process_plan_and_journal(tmp_path, monkeypatch):
    single = {}
    for name, kw in CASES.items():
        single[name] = search(_model(), _calib(), _settings(**kw), out_dir=tmp_path / f"single_{name}", progress=False)

    # a journal killed mid-step by one process, to be resumed by two
    original, calls = Evaluator.layered, {"n": 0}

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 8:
            raise RuntimeError("killed")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Evaluator, "layered", flaky)
    with pytest.raises(RuntimeError):
        search(_model(), _calib(), _settings(**CASES["fast"]), out_dir=tmp_path / "resume_rank0", progress=False)
    monkeypatch.setattr(Evaluator, "layered", original)
    (tmp_path / "resume").symlink_to(tmp_path / "resume_rank0")  # rank 0 resumes it (rank 1 reads nothing)

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)

    plans = [json.loads((tmp_path / f"plans_rank{r}.json").read_text()) for r in (0, 1)]
    assert plans[0] == plans[1]
    for name in CASES:
        assert plans[0][name] == [str(u) for u in single[name].plan], name
        one = json.loads((tmp_path / f"single_{name}" / JOURNAL_NAME).read_text())
        two = json.loads((tmp_path / f"{name}_rank0" / JOURNAL_NAME).read_text())
        assert _comparable(two) == _comparable(one), name
        assert two["base"] == one["base"] and two["settings_hash"] == one["settings_hash"]
        assert not (tmp_path / f"{name}_rank1").exists()  # only rank 0 writes
    # data-parallel rounds only add idle slots: the work counted equals one process's (3 batches / 2 ranks)
    fast_one = json.loads((tmp_path / "single_fast" / JOURNAL_NAME).read_text())["counters"]
    fast_two = json.loads((tmp_path / "fast_rank0" / JOURNAL_NAME).read_text())["counters"]
    assert fast_two["layer_evals"] >= fast_one["layer_evals"]
    assert plans[0]["resume"] == [str(u) for u in single["fast"].plan]
    resumed = json.loads((tmp_path / "resume_rank0" / JOURNAL_NAME).read_text())
    assert _comparable(resumed) == _comparable(json.loads((tmp_path / "single_fast" / JOURNAL_NAME).read_text()))
