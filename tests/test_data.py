"""Calibration / evaluation text: bundled data, local files, reference splits, errors (never the network)."""

from __future__ import annotations

import json

import datasets
import pytest
import torch

from hf_shedder.data import (
    CalibrationSet,
    bundled_tokenizer_file,
    load_calibration,
    load_eval_text,
    load_tokenizer,
    output_tokenizer,
    read_local_texts,
    read_texts,
    require_special_tokens,
    valid_sources,
)
from hf_shedder.errors import DataError


@pytest.fixture(scope="module")
def tok():  # noqa: ANN201
    return load_tokenizer()


def test_bundled_tokenizer_is_gpt_neox(tok) -> None:
    assert tok("Hello world").input_ids == [12092, 1533]
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert tok.eos_token_id == 0


def test_unknown_hub_tokenizer_fails_clearly_offline() -> None:
    with pytest.raises(DataError, match="cannot load tokenizer.*bundled GPT-NeoX"):
        load_tokenizer("no-such-user/no-such-tokenizer-hf-shedder")


def test_folder_with_only_tokenizer_json_gets_gpt_neox_special_tokens(tok) -> None:
    import os

    folder = os.path.dirname(bundled_tokenizer_file())
    assert os.listdir(folder) == ["tokenizer.json"]  # no tokenizer_config.json naming the special tokens
    t = load_tokenizer(folder)
    assert t.eos_token == t.bos_token == t.pad_token == "<|endoftext|>" and t.eos_token_id == 0
    assert t("Hello world").input_ids == tok("Hello world").input_ids
    require_special_tokens(t, "a test")  # no error


def test_tokenizer_without_eos_fails_with_a_clear_error() -> None:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    t = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")))
    with pytest.raises(DataError, match="defines no eos or pad token, which padding needs"):
        require_special_tokens(t, "padding")
    require_special_tokens(t, "nothing", eos=False, pad=False)


def test_missing_tokenizer_folder_is_not_called_a_hub_name(tmp_path) -> None:
    for name in ("/nonexistent_dir_hf_shedder", str(tmp_path / "gone"), "./no/such/tok"):
        with pytest.raises(DataError, match="no such folder") as err:
            load_tokenizer(name)
        assert "hub name" not in str(err.value)


def test_output_tokenizer_falls_back_to_the_bundled_one_only_for_neox_sized_vocabularies(tmp_path) -> None:
    import shutil

    with_json = tmp_path / "with_json"
    with_json.mkdir()
    shutil.copy(bundled_tokenizer_file(), with_json)
    t = output_tokenizer(str(with_json), 50304)
    assert t is not None and t.eos_token == t.pad_token == "<|endoftext|>"
    t.save_pretrained(tmp_path / "saved")
    assert load_tokenizer(str(tmp_path / "saved")).eos_token == "<|endoftext|>"
    # an offline hub name (no tokenizer to be had): the bundled one for a GPT-NeoX-sized model, else nothing
    assert output_tokenizer("no-such-user/no-such-model-hf-shedder", 50280).eos_token == "<|endoftext|>"
    assert output_tokenizer("no-such-user/no-such-model-hf-shedder", 128) is None
    assert output_tokenizer("no-such-user/no-such-model-hf-shedder", None) is None


def _stream(tok, source: str) -> torch.Tensor:
    return torch.tensor(tok("\n\n".join(read_texts(source))).input_ids)


def test_calibration_windows_are_seeded_disjoint_slices_of_the_text(tok) -> None:
    a = load_calibration("bundled", tok, n_samples=8, seqlen=128, seed=42)
    b = load_calibration("bundled", tok, n_samples=8, seqlen=128, seed=42)
    c = load_calibration("bundled", tok, n_samples=8, seqlen=128, seed=7)
    assert a.input_ids.shape == (8, 128) and a.input_ids.dtype == torch.long
    assert a.attention_mask.dtype == torch.long and a.num_tokens == 8 * 128
    assert torch.equal(a.input_ids, b.input_ids) and a.fingerprint() == b.fingerprint()
    assert not torch.equal(a.input_ids, c.input_ids) and a.fingerprint() != c.fingerprint()
    windows = _stream(tok, "bundled").unfold(0, 128, 1)  # every window of the token stream
    starts = []
    for row in a.input_ids:
        hits = (windows == row).all(dim=1).nonzero().flatten().tolist()
        assert hits, "a calibration window is not a slice of the text"
        starts.append(hits[0])
    starts.sort()
    assert all(s2 - s1 >= 128 for s1, s2 in zip(starts, starts[1:]))  # no overlap


def test_batches_cover_all_samples(tok) -> None:
    calib = load_calibration("bundled", tok, n_samples=5, seqlen=32)
    sizes = [b["input_ids"].shape[0] for b in calib.batches(2)]
    assert sizes == [2, 2, 1]
    assert torch.equal(torch.cat([b["input_ids"] for b in calib.batches(2)]), calib.input_ids)


def test_local_txt_json_jsonl(tmp_path, tok) -> None:
    txt = tmp_path / "t.txt"
    txt.write_text("To be, or not to be, that is the question. " * 40)
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": f"line {i} of some text to read"}) for i in range(50)))
    alpaca = tmp_path / "a.json"
    alpaca.write_text(json.dumps([
        {"instruction": "Name a colour.", "input": "", "output": "Blue."},
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    ] * 20))
    assert len(read_local_texts(str(jsonl))) == 50
    rows = read_local_texts(str(alpaca))
    assert "### Instruction:\nName a colour." in rows[0] and "### Input:\n2 and 3" in rows[1]
    for path in (txt, jsonl, alpaca):
        calib = load_calibration(str(path), tok, n_samples=2, seqlen=32)
        assert calib.input_ids.shape == (2, 32) and calib.source == str(path)


def test_eval_text_cuts_the_whole_split(tok) -> None:
    ev = load_eval_text("bundled", tok, seqlen=256)
    n_tokens = _stream(tok, "bundled-validation").numel()
    assert ev.input_ids.shape == (n_tokens // 256, 256)
    # the validation slice is disjoint from the calibration slice
    calib_text = read_texts("bundled")[0]
    assert tok.decode(ev.input_ids[0, :64]) not in calib_text


def test_errors_are_actionable(tmp_path, tok) -> None:
    with pytest.raises(DataError, match="unknown .*source 'wikitext'.*wikitext2.*bundled"):
        load_calibration("wikitext", tok)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n ")
    with pytest.raises(DataError, match="empty"):
        load_calibration(str(empty), tok, n_samples=1, seqlen=8)
    short = tmp_path / "short.txt"
    short.write_text("only a few words here")
    with pytest.raises(DataError, match=r"needs 4 x 1024 = 4096 tokens, the text gives \d+ tokens; lower --samples/--seqlen"):
        load_calibration(str(short), tok, n_samples=4, seqlen=1024)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "no text field"}\n')
    with pytest.raises(DataError, match="row 1 has neither a 'text'"):
        load_calibration(str(bad), tok)
    assert set(valid_sources()) >= {"alpaca", "wikitext2", "ptb", "c4", "bundled"}


def test_hub_dataset_offline_says_how_to_pass_a_file(monkeypatch, tok) -> None:
    def offline(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise ConnectionError("Couldn't reach 'tatsu-lab/alpaca' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="cannot fetch tatsu-lab/alpaca offline.*--calibration path/to/text.txt"):
        load_calibration("alpaca", tok, n_samples=2, seqlen=16)


def test_alpaca_uses_the_reference_split_and_text_column(monkeypatch, tok) -> None:
    rows = [f"Row {i}: an instruction and its answer, rendered as text." for i in range(100)]
    fake = datasets.DatasetDict({"train": datasets.Dataset.from_dict(
        {"instruction": ["x"] * 100, "input": [""] * 100, "output": ["y"] * 100, "text": rows})})
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda path, **kw: calls.append((path, kw)) or fake)
    test_rows = read_texts("alpaca")
    assert calls[0][0] == "tatsu-lab/alpaca"
    expected = fake["train"].train_test_split(test_size=0.2, seed=42)["test"].train_test_split(test_size=0.5, seed=42)
    assert test_rows == expected["train"]["text"] and len(test_rows) == 10
    assert read_texts("alpaca", split="validation") == expected["test"]["text"]
    ref = load_calibration("alpaca", tok, n_samples=5, seqlen=16, mode="reference")
    assert ref.input_ids.shape[1] == 16 and ref.n_samples >= 1


def test_calibration_set_checks_shapes() -> None:
    with pytest.raises(DataError):
        CalibrationSet(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 4, dtype=torch.long), source="x")
