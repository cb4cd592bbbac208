"""mamba-ssm checkpoints in and out (the paper's own checkpoints: state-spaces/mamba-2.8b, mamba2-2.7b)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

import hf_shedder
from hf_shedder.cli import main
from hf_shedder.errors import CheckpointError, PlanError
from hf_shedder.loading import checkpoint_format, load_model
from hf_shedder.units import Plan, Unit
from tests.mamba_ssm_checkpoints import mamba_ssm_config, stock_hf_model, write_mamba_ssm_checkpoint

IDS = torch.tensor([[1, 5, 9, 33, 64, 2, 99, 17, 3, 40, 41, 7], [8, 8, 1, 0, 5, 6, 90, 91, 92, 12, 13, 14]])

VARIANTS = {
    "mamba1": mamba_ssm_config("Mamba1"),
    "mamba1-untied-fp16-residual": mamba_ssm_config("Mamba1", tie_embeddings=False, residual_in_fp32=False,
                                                    ssm_cfg={"d_state": 4, "d_conv": 3, "expand": 3, "dt_rank": 5,
                                                             "conv_bias": False, "bias": True}),
    "mamba2": mamba_ssm_config("Mamba2"),
    "mamba2-options": mamba_ssm_config("Mamba2", pad_vocab_size_multiple=8, tie_embeddings=False,
                                       ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 16, "chunk_size": 4,
                                                "d_conv": 2, "dt_limit": [0.01, 5.0], "bias": True}),
}


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_mamba_ssm_checkpoint_loads_with_the_logits_of_transformers_class(tmp_path: Path, variant: str) -> None:
    cfg = VARIANTS[variant]
    sd = write_mamba_ssm_checkpoint(tmp_path / "ckpt", cfg, safetensors=variant == "mamba2")
    assert checkpoint_format(str(tmp_path / "ckpt")) == "mamba_ssm"
    model = load_model(str(tmp_path / "ckpt"))
    expected = stock_hf_model(cfg, sd)
    assert type(model) is type(expected)
    assert model.config.vocab_size == expected.config.vocab_size > cfg["vocab_size"]  # padded rows kept
    assert (model.lm_head.weight is model.backbone.embeddings.weight) == cfg["tie_embeddings"]
    torch.testing.assert_close(_logits(model), _logits(expected), rtol=0, atol=0)
    # the AutoModel-style loader keeps the stored dtype unless told otherwise
    half = load_model(str(tmp_path / "ckpt"), dtype=torch.bfloat16)
    assert half.backbone.embeddings.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
def test_block_pruned_export_round_trips_and_matches_the_checkpoint_minus_its_blocks(tmp_path: Path,
                                                                                      layer: str) -> None:
    cfg = mamba_ssm_config(layer, n_layer=5)
    sd = write_mamba_ssm_checkpoint(tmp_path / "ckpt", cfg)
    pruned = hf_shedder.prune(load_model(str(tmp_path / "ckpt")), Plan([Unit("block", 1), Unit("block", 3)]))
    pruned.save_pretrained(tmp_path / "out", export="mamba_ssm")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    # explicit where the source left mamba-ssm's defaults (Mamba: d_conv 4, dt_rank ceil(32/16); Mamba2: ngroups 1)
    defaults = ({"d_conv": 4, "dt_rank": 2, "conv_bias": True, "bias": False} if layer == "Mamba1" else
                {"d_conv": 4, "expand": 2, "ngroups": 1, "conv_bias": True, "bias": False})
    assert written == {**cfg, "n_layer": 3, "vocab_size": 112, "pad_vocab_size_multiple": 16,
                       "ssm_cfg": {**defaults, **cfg["ssm_cfg"]}}
    out_sd = torch.load(tmp_path / "out" / "pytorch_model.bin", weights_only=True)
    kept = {0: 0, 2: 1, 4: 2}  # original layer -> new index
    expected = {}
    for k, v in sd.items():
        if k.startswith("backbone.layers."):
            i = int(k.split(".")[2])
            if i not in kept:
                continue
            k = k.replace(f"layers.{i}.", f"layers.{kept[i]}.", 1)
        expected[k] = v
    assert sorted(out_sd) == sorted(expected)
    for k, v in expected.items():
        assert torch.equal(out_sd[k], v), k
    assert Plan.load(tmp_path / "out" / "shedder_plan.json").removed_blocks() == {1, 3}
    # and back in: the exported checkpoint computes what the pruned model computes
    back = load_model(str(tmp_path / "out"))
    torch.testing.assert_close(_logits(back), _logits(pruned), rtol=0, atol=0)


def test_exports_that_mamba_ssm_cannot_hold_are_refused(tmp_path: Path) -> None:
    cfg = mamba_ssm_config("Mamba2")
    write_mamba_ssm_checkpoint(tmp_path / "ckpt", cfg)
    pruned = hf_shedder.prune(load_model(str(tmp_path / "ckpt")), Plan([Unit("ssm", 1)]))
    with pytest.raises(PlanError, match=r"cannot express this plan \(1 x ssm\).*remote_code"):
        pruned.save_pretrained(tmp_path / "out", export="mamba_ssm")
    heads = hf_shedder.prune(load_model(str(tmp_path / "ckpt")), Plan([Unit("ssm_heads", 0, (0, 1))]))
    with pytest.raises(PlanError, match="only whole-block removal"):
        heads.save_pretrained(tmp_path / "out", export="mamba_ssm")
    from tests.tiny_models import build_tiny

    falcon = hf_shedder.prune(build_tiny("falcon_mamba"), Plan([Unit("block", 0)]))
    with pytest.raises(PlanError, match="falcon_mamba.*remote_code"):
        falcon.save_pretrained(tmp_path / "out", export="mamba_ssm")
    grouped = hf_shedder.prune(build_tiny("mamba2"), Plan([Unit("block", 0)]))  # n_groups=2
    with pytest.raises(PlanError, match="n_groups=2"):
        grouped.save_pretrained(tmp_path / "out", export="mamba_ssm")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("over", "message"), [
    ({"d_intermediate": 64}, "d_intermediate=64 adds a gated MLP"),
    ({"attn_layer_idx": [1]}, r"attn_layer_idx=\[1\] makes those layers attention"),
    ({"rms_norm": False}, "LayerNorm"),
    ({"ssm_cfg": {"layer": "Mamba3"}}, "Mamba3"),
    ({"ssm_cfg": {"layer": "Mamba2", "d_state": 16, "headdim": 8, "ngroups": 2}}, "ngroups=2"),
    ({"ssm_cfg": {"layer": "Mamba2", "d_state": 16, "headdim": 8, "norm_before_gate": True}}, "norm_before_gate"),
    ({"ssm_cfg": {"d_state": 8, "frobnicate": 1}}, r"\['frobnicate'\]"),
    ({"mystery": 1}, "unknown mamba-ssm config fields"),
])
def test_what_transformers_cannot_hold_is_refused(tmp_path: Path, over: dict, message: str) -> None:
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(mamba_ssm_config("Mamba1", **over)))
    torch.save({"x": torch.zeros(1)}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=message):
        load_model(str(d))
    assert main(["apply", "--model", str(d), "--plan", str(tmp_path / "p.json"), "--out", str(tmp_path / "o")]) == 2


class _Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (Path(self.marker),))


def test_a_pickle_that_would_run_code_is_refused_and_never_run(tmp_path: Path) -> None:
    d = tmp_path / "ckpt"
    sd = write_mamba_ssm_checkpoint(d, mamba_ssm_config("Mamba1"))
    marker = tmp_path / "pwned"
    for save in (torch.save, pickle.dump):  # torch's zip container and a bare pickle
        with open(d / "pytorch_model.bin", "wb") as f:
            save({**sd, "evil": _Payload(str(marker))}, f)
        with pytest.raises(CheckpointError, match=r"cannot be loaded safely.*weights_only=True.*Weights only load"):
            load_model(str(d))
        assert not marker.exists()
    # the same tensors without the payload, in the legacy (non-zip) container, load
    torch.save(sd, d / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    assert load_model(str(d)).config.num_hidden_layers == 4


def test_weights_that_do_not_match_the_config_are_refused(tmp_path: Path) -> None:
    cfg = mamba_ssm_config("Mamba1")
    write_mamba_ssm_checkpoint(tmp_path / "ckpt", {**cfg, "n_layer": 3})
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfg))  # claims 4 layers
    with pytest.raises(CheckpointError, match=r"missing \['backbone.layers.3"):
        load_model(str(tmp_path / "ckpt"))


def test_a_hub_id_of_a_mamba_ssm_repo_offline_says_how_to_get_it() -> None:
    with pytest.raises(CheckpointError, match=r"cannot fetch 'state-spaces/mamba-2.8b'.*hf download"):
        load_model("state-spaces/mamba-2.8b")


def test_a_hub_id_of_a_mamba_ssm_repo_loads_from_the_local_hub_cache_offline(tmp_path: Path, monkeypatch) -> None:
    """As state-spaces/mamba-2.8b once downloaded: config.json + pytorch_model.bin in the hub cache, no
    model.safetensors (offline, that file cannot be asked for and must not stop the load)."""
    from huggingface_hub import constants

    from hf_shedder.tokenizer_choice import BUNDLED_NAME, choose_tokenizer

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--some-lab--mamba-tiny"
    cfg = mamba_ssm_config("Mamba2", vocab_size=50277, d_model=16)
    sd = write_mamba_ssm_checkpoint(repo / "snapshots" / commit, cfg)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert checkpoint_format("some-lab/mamba-tiny") == "mamba_ssm"
    model = load_model("some-lab/mamba-tiny")
    torch.testing.assert_close(_logits(model), _logits(stock_hf_model(cfg, sd)), rtol=0, atol=0)
    assert model.config._name_or_path == "some-lab/mamba-tiny"  # recorded as the base model
    assert choose_tokenizer("some-lab/mamba-tiny").name == BUNDLED_NAME
