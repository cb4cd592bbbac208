"""Saving pruned models and loading them back through the stock Auto classes."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_shedder import CheckpointError, Plan, PlanError, PrunedMambaForCausalLM, Unit, prune
from hf_shedder.cli import main as cli_main
from tests.tiny_models import VOCAB, build_tiny

ATOL = 1e-5


def _x():
    return torch.randint(0, VOCAB, (2, 9))


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_save_and_automodel_load(tmp_path, family):
    pruned = prune(build_tiny(family), Plan([Unit("ssm", 0), Unit("block", 2)])).eval()
    x = _x()
    pruned.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, PrunedMambaForCausalLM)
    torch.testing.assert_close(loaded(x).logits, pruned(x).logits, atol=ATOL, rtol=0)
    assert loaded.model.config.num_hidden_layers == 3
    assert loaded.plan == pruned.plan
    out = loaded.generate(x[:1, :3], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


def test_load_reports_no_missing_or_unexpected_keys(tmp_path):
    pruned = prune(build_tiny("mamba2"), Plan([Unit("ssm", 1), Unit("block", 3)]))
    pruned.save_pretrained(tmp_path)
    _, info = PrunedMambaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


_NO_HF_SHEDDER = textwrap.dedent(
    """
    import sys, importlib.abc
    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "hf_shedder" or name.startswith("hf_shedder."):
                raise ImportError("hf_shedder is not importable in this check")
    sys.meta_path.insert(0, _Block())
    import torch
    from transformers import AutoModelForCausalLM
    path, ref_path, remote = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=remote)
    x, ref = torch.load(ref_path)
    assert "hf_shedder" not in sys.modules
    print(type(model).__name__, float((model(x).logits - ref).abs().max()))
    """
)


def _run_without_hf_shedder(path, x, ref, remote):
    torch.save((x, ref), os.path.join(path, "..", "ref.pt"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": os.path.join(path, "..", "modules")}
    r = subprocess.run(
        [sys.executable, "-c", _NO_HF_SHEDDER, str(path), os.path.join(path, "..", "ref.pt"), "1" if remote else "0"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    name, diff = r.stdout.split()
    return name, float(diff)


OTHER_FAMILY_FILES = ("bamba", "falcon_h1", "granitemoehybrid", "hymba", "jamba", "nemotron_h", "zamba2", "mamba")


def assert_only_own_family_code(folder, family_file: str) -> None:
    """A remote-code export carries its own family's adapter module, no other family's."""
    names = {p.name for p in folder.glob("*.py")}
    assert f"hf_shedder_arch_{family_file}.py" in names, sorted(names)
    others = {f"hf_shedder_arch_{f}.py" for f in OTHER_FAMILY_FILES if f != family_file} | {
        "hf_shedder_models_hymba_modeling_hymba.py"} - ({"hf_shedder_models_hymba_modeling_hymba.py"}
                                                       if family_file == "hymba" else set())
    assert not names & others, sorted(names & others)


def test_remote_code_export_loads_without_hf_shedder(tmp_path):
    pruned = prune(build_tiny("mamba2"), Plan([Unit("ssm", 1), Unit("block", 2)]))
    x = _x()
    pruned.save_pretrained(tmp_path / "m", export="remote_code")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["auto_map"]
    assert_only_own_family_code(tmp_path / "m", "mamba")
    name, diff = _run_without_hf_shedder(tmp_path / "m", x, pruned(x).logits, remote=True)
    assert name == "PrunedMambaForCausalLM" and diff <= ATOL


@pytest.mark.parametrize("family, cls", [("mamba", "MambaForCausalLM"), ("mamba2", "Mamba2ForCausalLM")])
def test_plain_export_for_block_plans(tmp_path, family, cls):
    pruned = prune(build_tiny(family), Plan([Unit("block", 0), Unit("block", 2)]))
    x = _x()
    pruned.save_pretrained(tmp_path / "m", export="plain")
    name, diff = _run_without_hf_shedder(tmp_path / "m", x, pruned(x).logits, remote=False)
    assert name == cls and diff <= ATOL


def test_plain_export_refuses_ssm_plans(tmp_path):
    pruned = prune(build_tiny("mamba2"), Plan([Unit("ssm", 0)]))
    with pytest.raises(PlanError, match="only whole-block removal"):
        pruned.save_pretrained(tmp_path / "m", export="plain")
    assert not (tmp_path / "m").exists()


def test_directory_without_weights_and_corrupt_checkpoint(tmp_path):
    pruned = prune(build_tiny("mamba2"), Plan([Unit("block", 1)]))
    pruned.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    data = weights.read_bytes()
    weights.unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    weights.write_bytes(data[: len(data) // 2])
    from hf_shedder.loading import load_model

    with pytest.raises(CheckpointError, match="corrupt|cannot load"):
        load_model(str(tmp_path / "m"))
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(str(tmp_path))


def test_cli_apply_and_info(tmp_path, capsys):
    base = build_tiny("mamba2")
    base.save_pretrained(tmp_path / "base")
    (tmp_path / "plan.json").write_text(json.dumps({"pruned_ssm_idx": [2, 0]}))
    rc = cli_main(["apply", "--model", str(tmp_path / "base"), "--plan", str(tmp_path / "plan.json"),
                   "--out", str(tmp_path / "out")])
    assert rc == 0
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    x = _x()
    torch.testing.assert_close(loaded(x).logits, prune(base, Plan([Unit("ssm", 2), Unit("ssm", 0)]))(x).logits,
                               atol=ATOL, rtol=0)
    capsys.readouterr()
    assert cli_main(["info", str(tmp_path / "out"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [u["layer"] for u in info["removed"]] == [2, 0]
    assert info["params_before"] == sum(p.numel() for p in base.parameters())
    assert info["params_after"] == sum(p.numel() for p in loaded.parameters())


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_cli_apply_output_gets_the_umask_modes(tmp_path, umask):
    """The staged folder comes from mkdtemp (0700) and safetensors writes 0600: the result must not keep that."""
    base = build_tiny("mamba2")
    base.save_pretrained(tmp_path / "base")
    (tmp_path / "plan.json").write_text(json.dumps({"pruned_ssm_idx": [1]}))
    old = os.umask(umask)
    try:
        assert cli_main(["apply", "--model", str(tmp_path / "base"), "--plan", str(tmp_path / "plan.json"),
                         "--out", str(tmp_path / "out")]) == 0
    finally:
        os.umask(old)
    out = tmp_path / "out"
    assert (out.stat().st_mode & 0o777) == 0o777 & ~umask
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "model.safetensors" for p in files)
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(0o666 & ~umask)}


def test_cli_apply_bad_plan_writes_nothing(tmp_path, capsys):
    base = build_tiny("mamba")
    base.save_pretrained(tmp_path / "base")
    (tmp_path / "plan.json").write_text(json.dumps({"pruned_mamba_block_idx": [1, 7]}))
    rc = cli_main(["apply", "--model", str(tmp_path / "base"), "--plan", str(tmp_path / "plan.json"),
                   "--out", str(tmp_path / "out")])
    assert rc == 2
    assert "out of range" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_python_api_accepts_the_cli_export_names(tmp_path):
    """``export="hf_shedder"`` (offered by ``hf-shedder apply --export``) is the default checkpoint."""
    pruned = prune(build_tiny("mamba2"), Plan([Unit("block", 1)]))
    pruned.save_pretrained(tmp_path / "a", export="hf_shedder")
    pruned.save_pretrained(tmp_path / "b")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert "auto_map" not in json.loads((tmp_path / "a" / "config.json").read_text())
    with pytest.raises(ValueError, match="'hf_shedder'"):
        pruned.save_pretrained(tmp_path / "c", export="remote-code")
