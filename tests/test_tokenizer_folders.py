"""CLI on model folders whose only tokenizer file is GPT-NeoX's tokenizer.json (no tokenizer_config.json).

For model types that AutoTokenizer maps to no tokenizer class (a pruned ``hf_shedder`` model, Bamba, ...)
such a folder loads with no eos/bos/pad: the special tokens must be filled in, or recover cannot pad and
lm-eval cannot run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import hf_shedder
from hf_shedder.cli import main
from hf_shedder.data import bundled_tokenizer_file
from hf_shedder.units import Plan, Unit
from tests._helpers_eval import NEOX_VOCAB, neox_tiny
from tests.tiny_hybrids import build_tiny_hybrid

pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tokjson") / "pruned"
    hf_shedder.prune(neox_tiny("mamba2", num_layers=3), Plan([Unit("block", 1)])).save_pretrained(d)
    shutil.copy(bundled_tokenizer_file(), d)
    return d


def test_recover(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "recovered"
    assert main(["recover", str(model_dir), "--data", "bundled", "--out", str(out), "--max-steps", "2",
                 "--batch-size", "2", "--seqlen", "64", "--lora-r", "2"]) == 0
    assert json.loads((out / "recovery.json").read_text())["steps"] == 2
    saved = json.loads((out / "tokenizer_config.json").read_text())
    assert saved["eos_token"] == saved["pad_token"] == "<|endoftext|>"  # the output now names them


def test_eval_tasks(model_dir: Path, tmp_path: Path) -> None:
    assert main(["eval", str(model_dir), "--tasks", "piqa", "--limit", "2", "--batch-size", "2",
                 "--out", str(tmp_path / "ev"), "--no-progress"]) == 0
    res = json.loads((tmp_path / "ev" / "eval_results.json").read_text())
    assert res["pruned"]["tasks"]["n_samples"]["piqa"] == 2


def test_apply_saves_a_tokenizer_that_names_its_special_tokens(tmp_path: Path) -> None:
    base = tmp_path / "base"
    build_tiny_hybrid("bamba", vocab_size=NEOX_VOCAB).save_pretrained(base)
    shutil.copy(bundled_tokenizer_file(), base)
    plan = tmp_path / "plan.json"
    Plan([Unit("block", 1)]).save(plan)
    out = tmp_path / "pruned"
    assert main(["apply", "--model", str(base), "--plan", str(plan), "--out", str(out)]) == 0
    saved = json.loads((out / "tokenizer_config.json").read_text())
    assert saved["eos_token"] == saved["pad_token"] == "<|endoftext|>"
