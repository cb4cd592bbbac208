"""The offline demo (`make demo`) end to end with --quick settings: every stage leaves its files."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from transformers import AutoModelForCausalLM

import hf_shedder
from hf_shedder.modeling import PrunedMambaForCausalLM

DEMO = Path(__file__).resolve().parent.parent / "recipes" / "demo_offline.py"


def test_demo_quick(tmp_path, capsys) -> None:  # noqa: ANN001
    spec = importlib.util.spec_from_file_location("demo_offline", DEMO)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), "--quick"]) == 0
    printed = capsys.readouterr().out
    assert "| pruned + LoRA |" in printed
    assert (out / "trajectory.png").stat().st_size > 1000
    summary = json.loads((out / "summary.json").read_text())
    plan = hf_shedder.Plan.from_dict(summary["plan"])
    assert len(plan) == 2
    for label in ("base", "pruned", "recovered"):
        entry = summary["results"][label]
        assert entry["perplexity"]["ppl"] > 1 and 0 <= entry["tasks"]["average"] <= 1
    assert summary["results"]["pruned"]["n_params"] < summary["results"]["base"]["n_params"]
    model = AutoModelForCausalLM.from_pretrained(out / "recovered")
    assert isinstance(model, PrunedMambaForCausalLM) and model.plan == plan
    card = (out / "recovered" / "README.md").read_text()
    assert "LoRA recovery tuning" in card and "not measured" not in card.split("## Speed")[0]
