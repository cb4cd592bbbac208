"""What info and the model card know about how a model was made: prune --apply records the search
(settings, calibration perplexities, parameter counts, versions); plain exports keep their plan;
hand-written plans are not passed off as searched."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from hf_shedder.cli import main
from hf_shedder.commands.info import describe
from hf_shedder.hub import card_context_from_dir
from hf_shedder.units import Plan, Unit
from tests._helpers_eval import neox_tiny, tokenizer


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("prov") / "base"
    neox_tiny("mamba", num_layers=4).save_pretrained(d)
    tokenizer().save_pretrained(d)
    return d


def _summary(card: str) -> str:
    """The sentence under the title."""
    return card.split("\n# ", 1)[1].split("\n", 1)[1].split("\n## ", 1)[0].strip()


def test_prune_apply_card_shows_search_settings_and_metrics(base_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "search"
    assert main(["prune", "--model", str(base_dir), "--units", "block", "--steps", "2", "--calibration", "bundled",
                 "--samples", "2", "--seqlen", "24", "--out", str(out), "--device", "cpu", "--apply",
                 "--no-progress"]) == 0
    model = out / "model"
    rows = json.loads((out / "trajectory.json").read_text())["rows"]
    provenance = json.loads((model / "config.json").read_text())["provenance"]
    metrics = provenance["metrics"]
    assert metrics["calibration_ppl_base"] == pytest.approx(rows[0]["ppl"])
    assert metrics["calibration_ppl_pruned"] == pytest.approx(rows[-1]["ppl"])
    assert metrics["params_after"] < metrics["params_before"] and "transformers" in provenance["versions"]
    assert provenance["search"]["calibration"] == "bundled" and provenance["search"]["samples"] == 2
    assert (model / "shedder_search.json").is_file() and (model / "trajectory.png").is_file()
    assert main(["card", str(model)]) == 0
    card = (model / "README.md").read_text()
    assert "| calibration data | bundled |" in card and "| samples | 2 |" in card and "| sequence length | 24 |" in card
    assert f"| calibration perplexity, base | {rows[0]['ppl']:.3f} |" in card
    assert f"| calibration perplexity, after the search | {rows[-1]['ppl']:.3f} |" in card
    assert "Made with hf_shedder" in card
    assert "2 units removed by a training-free Mamba-Shedder search" in _summary(card)
    # the card also falls back to the provenance alone (a folder copied without shedder_search.json)
    (model / "shedder_search.json").unlink()
    ctx = card_context_from_dir(model)
    assert ctx["search"]["calibration"] == "bundled" and ctx["search"]["n_samples"] == 2
    assert ctx["search_metrics"]["calibration_ppl_base"] == pytest.approx(rows[0]["ppl"])
    capsys.readouterr()


def test_plain_export_keeps_its_plan_for_info_and_card(base_dir: Path, tmp_path: Path, capsys) -> None:
    plan = tmp_path / "plan.json"
    Plan([Unit("block", 1)]).save(plan)
    out = tmp_path / "plain"
    assert main(["apply", "--model", str(base_dir), "--plan", str(plan), "--out", str(out), "--export", "plain"]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "mamba"  # a stock checkpoint
    info = describe(str(out))
    assert info["export"] == "plain" and [u["layer"] for u in info["removed"]] == [1]
    assert info["base_model"] == str(base_dir) and info["params_after"] < info["params_before"]
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "plain export" in printed and "block" in printed and str(base_dir) in printed
    assert main(["card", str(out)]) == 0
    card = (out / "README.md").read_text()
    summary = _summary(card)
    assert f"A structurally pruned version of `{base_dir}` (mamba): 1 units removed following a given pruning plan" \
        in summary and "not measured" not in summary
    assert re.search(r"\| 1 \| block \| 1 \| all \|", card)
    assert 'from_pretrained("path/to/this/model")' in card and "trust_remote_code" not in card
    # without the provenance file: the plan is still read, and the sentence says only what is known
    (out / "shedder_provenance.json").unlink()
    assert main(["card", str(out)]) == 0
    summary = _summary((out / "README.md").read_text())
    assert summary.startswith("A structurally pruned model (mamba): 1 units removed") and "not measured" not in summary


def test_hand_written_plan_is_not_called_a_search(base_dir: Path, tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    Plan([Unit("ssm", 2)]).save(plan)
    out = tmp_path / "pruned"
    assert main(["apply", "--model", str(base_dir), "--plan", str(plan), "--out", str(out)]) == 0
    assert main(["card", str(out)]) == 0
    card = (out / "README.md").read_text()
    assert "search" not in _summary(card) and "following a given pruning plan" in _summary(card)
    assert "No search was recorded: the plan was applied as given." in card and "in plan order" in card
    assert "pip install hf_shedder" not in card and "not on PyPI" in card
