"""Model card from real results; the exact file set of a push; token / offline errors.

Only the network call (HfApi.create_repo / upload_folder) is stubbed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import huggingface_hub
import pytest
import torch

import hf_shedder
from hf_shedder.cli import main
from hf_shedder.data import load_calibration
from hf_shedder.evaluation.perplexity import evaluate_perplexity
from hf_shedder.hub import (
    HubError,
    card_context_from_dir,
    files_to_upload,
    push_to_hub,
    render_model_card,
    resolve_token,
)
from tests._helpers_eval import neox_tiny, tokenizer

JUNK = ("notes.txt", "search_journal.json", "checkpoint-1/optimizer.pt")


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory) -> Path:
    """A pruned tiny model folder with real search, eval and speed results (as the commands write them)."""
    root = tmp_path_factory.mktemp("hub")
    base_dir, out = root / "base", root / "pruned"
    tok = tokenizer()
    base = neox_tiny("mamba", num_layers=4)
    base.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)

    # a real two-step greedy block search with the project's perplexity evaluator
    adapter = hf_shedder.get_adapter(base)
    calib = load_calibration("bundled", tok, n_samples=2, seqlen=32, seed=42)
    plan, trajectory = adapter.empty_plan(), []
    for _ in range(2):
        scores = {}
        for unit in adapter.candidates(plan, ["block"]):
            with adapter.masked(plan.extended(unit)):
                scores[unit] = evaluate_perplexity(base, calib, progress=False).ppl
        best = min(scores, key=scores.get)
        plan = plan.extended(best)
        trajectory.append({"unit": best.to_dict(), "ppl": scores[best]})
    pruned = hf_shedder.prune(base, plan, provenance={"base_model": str(base_dir)})
    pruned.save_pretrained(out, export="remote_code")
    pruned.save_pretrained(out / "plain_export", export="plain")
    tok.save_pretrained(out)
    search = {
        "base_model": str(base_dir),
        "units": [u.to_dict() for u in plan],
        "settings": {"unit_kinds": ["block"], "steps": 2, "calibration": "bundled", "n_samples": 2,
                     "seqlen": 32, "seed": 42},
        "trajectory": trajectory,
    }
    (out / "shedder_search.json").write_text(json.dumps(search))

    assert main(["eval", str(out), "--base", str(base_dir), "--ppl", "bundled", "--seqlen", "32", "--ppl-limit", "2",
                 "--tasks", "piqa", "--limit", "2", "--no-progress"]) == 0
    assert main(["bench", str(out), "--base", str(base_dir), "--prefill-len", "16", "--decode-tokens", "3",
                 "--decode-batch-sizes", "1", "--warmup", "1", "--repeats", "1"]) == 0
    assert main(["card", str(out)]) == 0
    return out


def test_card_has_every_field_from_real_results(pruned_dir: Path) -> None:
    assert main(["card", str(pruned_dir), "--repo", "someone/tiny-pruned"]) == 0
    card = (pruned_dir / "README.md").read_text()
    ctx = card_context_from_dir(pruned_dir)
    evals = json.loads((pruned_dir / "eval_results.json").read_text())
    speed = json.loads((pruned_dir / "speed_results.json").read_text())
    search = json.loads((pruned_dir / "shedder_search.json").read_text())

    speed_section = card.split("## Speed")[1].split("## How to load")[0]
    assert "not measured" not in card.replace(speed_section, "")
    for label in ("base", "pruned"):  # decode rows are shown when measurable (CPU timing noise can void them)
        for value in speed[label]["decode_tokens_per_s"].values():
            assert f"{value:,.1f}" in speed_section
    assert str(search["base_model"]) in card
    for i, unit in enumerate(search["units"], 1):  # the removal table, in order
        assert re.search(rf"\| {i} \| block \| {unit['layer']} \| all \|", card)
    n_before, n_after = evals["base"]["n_params"], evals["pruned"]["n_params"]
    assert ctx["params_before"] == n_before and ctx["params_after"] == n_after and n_after < n_before
    assert f"{n_before:,}" in card and f"{n_after:,}" in card
    assert "| calibration data | bundled |" in card and "| samples | 2 |" in card
    for label in ("base", "pruned"):
        assert f"{evals[label]['perplexity']['ppl']:.3f}" in card
        for task, value in evals[label]["tasks"]["scores"].items():
            assert f"{100 * value:.1f}" in card and task in card
    assert "NOT benchmark results" in card  # bundled slices are labelled as such
    assert f"{speed['base']['prefill_tokens_per_s']:,.0f}" in card and "ideal speed-up" in card
    assert "No recovery tuning was run" in card
    assert 'from_pretrained("someone/tiny-pruned", trust_remote_code=True)' in card
    assert 'subfolder="plain_export"' in card
    assert "2501.17088" in card and "Mamba-Shedder" in card


def test_card_says_not_measured_instead_of_inventing() -> None:
    card = render_model_card({"base_model": "state-spaces/mamba-130m-hf"})
    assert card.count("not measured") >= 4
    body = card.split("## Citation")[0]
    assert not re.search(r"\d+\.\d", body)  # no measurement-like numbers appear from nowhere
    rec = render_model_card({"recovery": {"method": "LoRA", "r": 8, "learning_rate": 1e-4, "epochs": 1}})
    assert "| r | 8 |" in rec and "| learning_rate | 0.0001 |" in rec


def test_files_to_upload_is_exactly_the_model(pruned_dir: Path) -> None:
    for junk in JUNK:
        (pruned_dir / junk).parent.mkdir(exist_ok=True)
        (pruned_dir / junk).write_text("x")
    (pruned_dir / "README.md").write_text("card")
    files = files_to_upload(pruned_dir)
    everything = sorted(str(p.relative_to(pruned_dir)) for p in pruned_dir.rglob("*") if p.is_file())
    assert files == sorted(set(everything) - set(JUNK))
    for required in ("config.json", "model.safetensors", "README.md", "tokenizer.json",
                     "modeling_hf_shedder.py", "configuration_hf_shedder.py", "plain_export/model.safetensors",
                     "eval_results.json", "speed_results.json", "shedder_search.json"):
        assert required in files


def test_push_uploads_that_file_set(pruned_dir: Path, monkeypatch) -> None:
    calls = {}
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda self, repo_id, **kw: calls.setdefault("create", (repo_id, kw, self.token)))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder",
                        lambda self, **kw: calls.setdefault("upload", kw) and "https://hf.co/x/commit/1")
    push_to_hub(pruned_dir, "someone/tiny-pruned", token="hf_test", private=True)
    repo_id, kw, token = calls["create"]
    assert repo_id == "someone/tiny-pruned" and kw["private"] and kw["exist_ok"] and token == "hf_test"
    assert calls["upload"]["allow_patterns"] == files_to_upload(pruned_dir)
    assert calls["upload"]["folder_path"] == str(pruned_dir)


def test_push_errors(pruned_dir: Path, monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no_token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no_tokens"))
    with pytest.raises(HubError, match="no Hugging Face token: pass --token, set HF_TOKEN"):
        resolve_token()
    assert main(["push", str(pruned_dir), "--repo", "someone/x"]) == 2
    assert "no Hugging Face token" in capsys.readouterr().err
    monkeypatch.setenv("HF_TOKEN", "hf_env")
    assert resolve_token() == "hf_env" and resolve_token("hf_arg") == "hf_arg"
    # real huggingface_hub, offline (HF_HUB_OFFLINE=1 in the test session): a clear error, no network
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        with pytest.raises(HubError, match="offline"):
            push_to_hub(pruned_dir, "someone/x")
    with pytest.raises(HubError, match="user/name"):
        push_to_hub(pruned_dir, "no-slash")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(HubError, match=r"missing README.md, weights .*hf-shedder card"):
        files_to_upload(empty)


def test_push_without_a_network_is_a_clear_error(pruned_dir: Path, monkeypatch, capsys) -> None:
    from hf_shedder.hub import http_client_modules

    client = http_client_modules()[0]  # what the installed huggingface_hub raises through (httpx2 or httpx)

    def unreachable(self, repo_id, **kw):  # noqa: ANN001, ANN003, ANN202
        raise client.ConnectError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", unreachable)
    with pytest.raises(HubError, match="cannot reach the Hugging Face Hub .*ConnectError"):
        push_to_hub(pruned_dir, "someone/x", token="hf_fake")
    assert main(["push", str(pruned_dir), "--repo", "someone/x", "--token", "hf_fake"]) == 2
    assert "cannot reach the Hugging Face Hub" in capsys.readouterr().err


def test_eval_on_a_folder_that_is_not_a_model(tmp_path, capsys) -> None:
    assert main(["eval", str(tmp_path), "--ppl", "bundled"]) == 2
    assert "not a saved model directory" in capsys.readouterr().err
    assert main(["card", str(tmp_path)]) == 2


def test_loaded_pruned_model_matches_saved_plan(pruned_dir: Path) -> None:
    from hf_shedder.loading import load_model

    model = load_model(str(pruned_dir))
    search = json.loads((pruned_dir / "shedder_search.json").read_text())
    assert [u.to_dict() for u in model.plan] == search["units"]
    with torch.no_grad():
        assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape[-1] == model.config.vocab_size


def test_card_of_a_recovered_model_labels_its_numbers_pruned_plus_lora() -> None:
    evals = {"base": {"perplexity": {"ppl": 10.0, "source": "bundled"}},
             "pruned": {"perplexity": {"ppl": 12.5, "source": "bundled"}}}
    plain = render_model_card({"eval": evals})
    rec = render_model_card({"eval": evals, "recovery": {"method": "LoRA", "r": 8}})
    assert "| metric | base | pruned |" in plain and "pruned + LoRA" not in plain
    assert "| metric | base | pruned + LoRA |" in rec and "| metric | base | pruned |" not in rec
    full = render_model_card({"eval": evals, "recovery": {"method": "full fine-tune"}})
    assert "| metric | base | pruned + fine-tune |" in full and "Full fine-tune" in full and "LoRA" not in full
