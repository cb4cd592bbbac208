"""The CLI on the bundled reference model folders as they ship: weights and config, no tokenizer files.

With transformers 5, ``AutoTokenizer.from_pretrained`` on such a folder returns an empty two-token
tokenizer instead of failing; the commands must fall back to the bundled GPT-NeoX tokenizer.
"""

from __future__ import annotations

import json
import os

from hf_shedder.cli import main
from hf_shedder.data import load_tokenizer
from hf_shedder.loading import load_tokenizer_for
from tests.test_reference_models import REFERENCE

MAMBA2 = os.path.join(REFERENCE, "mamba2")
NEOX_SIZE = len(load_tokenizer())


def test_reference_folder_has_no_tokenizer_of_its_own(tmp_path) -> None:
    assert load_tokenizer_for(MAMBA2) is None
    # a folder with a real tokenizer keeps it
    load_tokenizer().save_pretrained(tmp_path)
    tok = load_tokenizer_for(str(tmp_path))
    assert tok is not None and len(tok) == NEOX_SIZE


def test_cli_eval_ppl_on_the_reference_folder(tmp_path, capsys) -> None:
    argv = ["eval", MAMBA2, "--ppl", "bundled", "--seqlen", "64", "--ppl-limit", "1", "--device", "cpu",
            "--out", str(tmp_path), "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    ppl = json.loads((tmp_path / "eval_results.json").read_text())["pruned"]["perplexity"]
    assert ppl["n_tokens"] == 63
    assert ppl["ppl"] < 2000  # the trained model reads the GPT-NeoX ids (random init: ~5e4)


def test_cli_prune_and_apply_on_the_reference_folder(tmp_path, capsys) -> None:
    out = tmp_path / "search"
    argv = ["prune", "--model", MAMBA2, "--units", "ssm", "--steps", "1", "--calibration", "bundled",
            "--samples", "2", "--seqlen", "32", "--batch-size", "2", "--out", str(out), "--device", "cpu",
            "--apply", "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    assert len(json.loads((out / "plan.json").read_text())["units"]) == 1
    # the pruned model carries the tokenizer the search used
    tok = load_tokenizer_for(str(out / "model"))
    assert tok is not None and len(tok) == NEOX_SIZE


def test_cli_apply_does_not_save_an_empty_tokenizer(tmp_path, capsys) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"pruned_ssm_idx": [3]}))
    out = tmp_path / "pruned"
    assert main(["apply", "--model", MAMBA2, "--plan", str(plan), "--out", str(out)]) == 0, capsys.readouterr().err
    assert (out / "config.json").is_file()
    # the reference folder has no tokenizer: the output carries the bundled GPT-NeoX one (the model's
    # vocabulary is NeoX-sized), never the empty one transformers would build from config.json
    tok = load_tokenizer_for(str(out))
    assert tok is not None and len(tok) == NEOX_SIZE and tok.eos_token == "<|endoftext|>"
    assert tok("Hello world", add_special_tokens=False)["input_ids"] == [12092, 1533]


def test_device_map_loading_gives_the_same_ppl_and_plan(tmp_path, capsys) -> None:
    """``--device-map`` (accelerate dispatch, what a model too large for one GPU uses) goes through the
    same evaluator and search code; on one CPU it must reproduce the plain load exactly."""
    ppls, plans = {}, {}
    for name, where in (("plain", ["--device", "cpu"]), ("mapped", ["--device-map", "auto"])):
        out = tmp_path / name
        argv = ["eval", MAMBA2, "--ppl", "bundled", "--seqlen", "64", "--ppl-limit", "2", *where,
                "--out", str(out), "--no-progress"]
        assert main(argv) == 0, capsys.readouterr().err
        ppls[name] = json.loads((out / "eval_results.json").read_text())["pruned"]["perplexity"]["ppl"]
        argv = ["prune", "--model", MAMBA2, "--units", "ssm", "--steps", "2", "--calibration", "bundled",
                "--samples", "2", "--seqlen", "32", "--batch-size", "2", "--out", str(out / "search"),
                *where, "--no-progress"]
        assert main(argv) == 0, capsys.readouterr().err
        plans[name] = json.loads((out / "search" / "plan.json").read_text())["units"]
    assert ppls["mapped"] == ppls["plain"]
    assert plans["mapped"] == plans["plain"] and len(plans["plain"]) == 2
