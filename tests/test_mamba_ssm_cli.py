"""Commands on mamba-ssm checkpoints: reference plan files by the same indices, --export mamba_ssm, info, prune."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import hf_shedder
from hf_shedder.cli import main
from hf_shedder.loading import load_model
from hf_shedder.tokenizer_choice import BUNDLED_NAME
from hf_shedder.units import Plan, Unit
from tests.mamba_ssm_checkpoints import mamba_ssm_config, write_mamba_ssm_checkpoint

# GPT-NeoX-sized, as the state-spaces checkpoints: 50277 rows padded to a multiple of 8 (mamba-2.8b: 50280)
NEOX = {"vocab_size": 50277, "pad_vocab_size_multiple": 8, "d_model": 16}


@pytest.fixture(scope="module", params=["Mamba1", "Mamba2"])
def ckpt(request, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("mamba_ssm") / "ckpt"
    write_mamba_ssm_checkpoint(d, mamba_ssm_config(request.param, n_layer=4, **NEOX))
    return d


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([[12092, 1533, 0, 50276, 7, 99]])).logits


def test_reference_plan_file_applies_by_the_same_indices_and_exports_to_mamba_ssm(ckpt: Path, tmp_path: Path,
                                                                                   capsys) -> None:
    ref = tmp_path / "reference_plan.json"
    ref.write_text(json.dumps({"pruned_mamba_block_idx": [2, 0]}))  # the Mamba-Shedder tool's file
    out = tmp_path / "out"
    assert main(["apply", "--model", str(ckpt), "--plan", str(ref), "--out", str(out), "--export", "mamba_ssm"]) == 0
    printed = capsys.readouterr().out
    assert f"tokenizer: {BUNDLED_NAME} (mamba-ssm checkpoints ship no tokenizer" in printed
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["n_layer"] == 2 and "model_type" not in cfg
    provenance = json.loads((out / "shedder_provenance.json").read_text())
    assert provenance["base_model"] == str(ckpt)
    assert provenance["tokenizer"]["name"] == BUNDLED_NAME and provenance["tokenizer"]["size"] == 50277
    assert json.loads((out / "tokenizer_config.json").read_text())["eos_token"] == "<|endoftext|>"
    plan = Plan.load(out / "shedder_plan.json")
    assert [(u.kind, u.layer) for u in plan] == [("block", 2), ("block", 0)]
    # the same indices on the converted model give the same model
    expected = hf_shedder.prune(load_model(str(ckpt)), Plan([Unit("block", 2), Unit("block", 0)]))
    torch.testing.assert_close(_logits(load_model(str(out))), _logits(expected), rtol=0, atol=0)
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["export"] == "mamba_ssm" and info["num_layers"] == 4 and info["summary"] == "2 x block"
    assert info["params_after"] == sum(p.numel() for p in expected.parameters())
    assert main(["card", str(out)]) == 0
    card = (out / "README.md").read_text()
    assert "mamba-ssm export" in card and "MambaLMHeadModel.from_pretrained(" in card and "cg=True" in card


def test_reference_ssm_plan_applies_and_refuses_the_mamba_ssm_export(ckpt: Path, tmp_path: Path, capsys) -> None:
    ref = tmp_path / "ssm.json"
    ref.write_text(json.dumps({"pruned_ssm_idx": [1, 3]}))
    assert main(["apply", "--model", str(ckpt), "--plan", str(ref), "--out", str(tmp_path / "x"),
                 "--export", "mamba_ssm"]) == 2
    err = capsys.readouterr().err
    assert "cannot express this plan (2 x ssm)" in err and "remote_code" in err
    assert not (tmp_path / "x").exists()
    assert main(["apply", "--model", str(ckpt), "--plan", str(ref), "--out", str(tmp_path / "y")]) == 0
    pruned = load_model(str(tmp_path / "y"))
    assert [(u.kind, u.layer) for u in pruned.plan] == [("ssm", 1), ("ssm", 3)]
    expected = hf_shedder.prune(load_model(str(ckpt)), Plan([Unit("ssm", 1), Unit("ssm", 3)]))
    torch.testing.assert_close(_logits(pruned), _logits(expected), rtol=0, atol=0)


def test_prune_searches_a_mamba_ssm_checkpoint_and_exports_it(ckpt: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "search"
    argv = ["prune", "--model", str(ckpt), "--units", "block", "--steps", "1", "--calibration", "bundled",
            "--samples", "2", "--seqlen", "16", "--batch-size", "2", "--out", str(out), "--device", "cpu",
            "--no-progress", "--apply", "--export", "mamba_ssm"]
    assert main(argv) == 0, capsys.readouterr().err
    assert f"tokenizer: {BUNDLED_NAME}" in capsys.readouterr().out
    model_dir = out / "model"
    assert json.loads((model_dir / "config.json").read_text())["n_layer"] == 3
    assert json.loads((model_dir / "shedder_provenance.json").read_text())["tokenizer"]["name"] == BUNDLED_NAME
    assert load_model(str(model_dir)).config.num_hidden_layers == 3
    # an export that cannot hold the units searched is refused before the search
    assert main([*argv[:4], "ssm", *argv[5:]]) == 2
    assert "--export mamba_ssm holds whole-block removal only" in capsys.readouterr().err


def test_gpu_check_script_parses_its_arguments_and_says_why_it_cannot_run(tmp_path: Path, capsys) -> None:
    """benchmarks/check_mamba_ssm_format.py runs on a GPU with mamba-ssm; here it must still import, parse
    its arguments and leave a result that says why it did not run."""
    import importlib.util

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the script would run for real")
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "check_mamba_ssm_format.py"
    spec = importlib.util.spec_from_file_location("check_mamba_ssm_format", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = script.parse_args(["--out", str(tmp_path / "r.json"), "--layers", "6", "--speed-dtypes", "float32,float16"])
    assert (args.layers, args.remove, args.decode_tokens) == (6, "2,5", 256)
    assert script.mamba_ssm_config("mamba2", args)["ssm_cfg"] == {"layer": "Mamba2"}
    assert script.main(["--out", str(tmp_path / "r")]) == 2
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["status"] == "not run" and "GPU" in report["error"]
    assert "**Not run**" in (tmp_path / "r.md").read_text() and "Not run" in capsys.readouterr().out
