"""One rule for every command's tokenizer: the model's own, GPT-NeoX-20B for mamba-ssm, refusals before work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoConfig

import hf_shedder.loading
from hf_shedder.cli import main
from hf_shedder.data import bundled_tokenizer_file, load_tokenizer
from hf_shedder.errors import CheckpointError, DataError
from hf_shedder.tokenizer_choice import BUNDLED_NAME, choose_tokenizer
from tests.tiny_models import build_tiny


def test_bundled_tokenizer_is_exactly_gpt_neox_20b() -> None:
    """The bundled copy came with four extra tokens; 'assistant' became id 50279 and 'RWKV' id 50280, past the
    embedding of a 50280-row Mamba (mamba-2.8b)."""
    tok = load_tokenizer()
    assert len(tok) == 50277
    ids = tok("The assistant said RWKV <|im_start|>")["input_ids"]
    assert max(ids) < 50277
    assert tok("Hello world")["input_ids"] == [12092, 1533]


def _prune_argv(model: Path | str, out: Path, *extra: str) -> list[str]:
    return ["prune", "--model", str(model), "--units", "block", "--steps", "1", "--calibration", "bundled",
            "--samples", "2", "--seqlen", "16", "--batch-size", "2", "--out", str(out), "--device", "cpu",
            "--no-progress", *extra]


def test_a_tokenizer_larger_than_the_vocabulary_is_refused_before_any_work(tmp_path: Path, capsys) -> None:
    model = tmp_path / "small"
    build_tiny("mamba", vocab_size=128).save_pretrained(model)
    shutil.copy(bundled_tokenizer_file(), model)  # its own folder, but a tokenizer far larger than the model
    out = tmp_path / "out"
    assert main(_prune_argv(model, out)) == 2
    err = capsys.readouterr().err
    assert "has 50,277 ids but" in err and "embeds only 128 tokens" in err, err
    assert not out.exists()  # refused before the search wrote anything
    assert main(_prune_argv(model, out, "--tokenizer", "bundled")) == 2
    assert "embeds only 128 tokens" in capsys.readouterr().err


def test_a_folder_without_a_tokenizer_gets_gpt_neox_only_when_its_vocabulary_is_gpt_neox(tmp_path: Path) -> None:
    small = tmp_path / "small"
    build_tiny("mamba", vocab_size=128).save_pretrained(small)
    with pytest.raises(DataError, match=r"no tokenizer for .*not GPT-NeoX's.*--tokenizer"):
        choose_tokenizer(str(small))
    neox = tmp_path / "neox"
    build_tiny("mamba", vocab_size=50280).save_pretrained(neox)
    chosen = choose_tokenizer(str(neox))
    assert chosen.name == BUNDLED_NAME and "GPT-NeoX-sized" in chosen.reason


def test_a_folder_uses_its_own_tokenizer_and_eval_records_it(tmp_path: Path, capsys) -> None:
    model = tmp_path / "m"
    build_tiny("mamba", vocab_size=50280).save_pretrained(model)
    load_tokenizer().save_pretrained(model)
    chosen = choose_tokenizer(str(model))
    assert (chosen.name, chosen.reason) == (str(model), "the model's own")
    assert main(["eval", str(model), "--ppl", "bundled", "--seqlen", "16", "--ppl-limit", "1", "--device", "cpu",
                 "--no-progress", "--out", str(tmp_path / "ev")]) == 0
    assert f"tokenizer: {model} (the model's own; 50,277 ids)" in capsys.readouterr().out
    assert json.loads((tmp_path / "ev" / "eval_results.json").read_text())["pruned"]["tokenizer"] == str(model)


def _offline_hub_model(monkeypatch, vocab_size: int) -> str:
    """A hub id whose config is known (as if cached) but whose tokenizer cannot be fetched (offline)."""
    config = AutoConfig.for_model("mamba", vocab_size=vocab_size, hidden_size=16, num_hidden_layers=2)
    monkeypatch.setattr(hf_shedder.loading, "load_config", lambda name: config)
    return "some-org/some-ssm-model"


def test_an_offline_hub_id_of_another_family_gets_a_clear_message_not_gpt_neox(monkeypatch) -> None:
    name = _offline_hub_model(monkeypatch, vocab_size=32000)  # e.g. a Zamba2/Hymba-sized vocabulary
    with pytest.raises(DataError, match=r"hf download some-org/some-ssm-model --include 'tokenizer\*'"):
        choose_tokenizer(name)


def test_an_offline_hub_id_of_a_gpt_neox_model_says_it_uses_the_bundled_copy(monkeypatch) -> None:
    chosen = choose_tokenizer(_offline_hub_model(monkeypatch, vocab_size=50280))
    assert chosen.name == BUNDLED_NAME and "hub repo 'some-org/some-ssm-model'" in chosen.reason


def test_a_hub_id_uses_autotokenizer_on_the_same_name(monkeypatch) -> None:
    name = _offline_hub_model(monkeypatch, vocab_size=50280)
    asked = []

    def fake_auto(n: str):  # noqa: ANN202
        asked.append(n)
        return load_tokenizer()

    monkeypatch.setattr(hf_shedder.loading, "load_tokenizer_for", fake_auto)
    chosen = choose_tokenizer(name)
    assert asked == [name] and chosen.name == name and chosen.reason == "the model's own"


def test_an_unreachable_hub_id_says_so() -> None:
    with pytest.raises(CheckpointError, match=r"cannot fetch 'nobody-hf-shedder/none'"):
        choose_tokenizer("nobody-hf-shedder/none")
