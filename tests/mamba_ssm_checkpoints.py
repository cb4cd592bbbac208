"""Tiny checkpoints in mamba-ssm's own layout, written from this file's own description of it.

Shapes and names follow mamba_ssm (models/mixer_seq_simple.py: ``MambaLMHeadModel`` -> ``backbone.embedding``,
``backbone.layers.N.{norm, mixer}``, ``backbone.norm_f``, ``lm_head``; modules/mamba_simple.py and
modules/mamba2.py for the mixers) and its ``save_pretrained`` (``config.json`` = the MambaConfig fields,
``pytorch_model.bin`` = ``torch.save(state_dict)``). Nothing here uses hf_shedder's conversion code, so the
tests compare hf_shedder's reader against an independent statement of the format.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM


def mamba_ssm_config(layer: str = "Mamba1", **over: Any) -> dict[str, Any]:
    ssm = {"d_state": 8, "expand": 2} if layer == "Mamba1" else {"layer": "Mamba2", "d_state": 16, "headdim": 8,
                                                                     "chunk_size": 8}
    cfg = {"d_model": 32, "d_intermediate": 0, "n_layer": 4, "vocab_size": 100, "ssm_cfg": ssm,
           "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
           "pad_vocab_size_multiple": 16, "tie_embeddings": True}
    cfg.update(over)
    return cfg


def _padded(cfg: dict[str, Any]) -> int:
    v, m = cfg["vocab_size"], cfg["pad_vocab_size_multiple"]
    return math.ceil(v / m) * m


def mamba_ssm_state_dict(cfg: dict[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with mamba-ssm's names and shapes (a tied lm_head shares the embedding, as in
    ``MambaLMHeadModel.state_dict()``)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    d, ssm = cfg["d_model"], dict(cfg["ssm_cfg"])
    layer = ssm.get("layer", "Mamba1")
    sd: dict[str, torch.Tensor] = {"backbone.embedding.weight": rnd(_padded(cfg), d, scale=1.0)}
    for i in range(cfg["n_layer"]):
        p = f"backbone.layers.{i}."
        sd[p + "norm.weight"] = 1 + rnd(d)
        di, ds, k = ssm.get("expand", 2) * d, ssm["d_state"], ssm.get("d_conv", 4)
        conv_bias, bias = ssm.get("conv_bias", True), ssm.get("bias", False)
        if layer == "Mamba1":
            r = ssm.get("dt_rank", math.ceil(d / 16))
            sd |= {p + "mixer.in_proj.weight": rnd(2 * di, d), p + "mixer.conv1d.weight": rnd(di, 1, k),
                   p + "mixer.x_proj.weight": rnd(r + 2 * ds, di),
                   p + "mixer.dt_proj.weight": rnd(di, r), p + "mixer.dt_proj.bias": rnd(di) - 2,
                   p + "mixer.A_log": torch.log(torch.arange(1, ds + 1).float()).repeat(di, 1) + rnd(di, ds),
                   p + "mixer.D": 1 + rnd(di), p + "mixer.out_proj.weight": rnd(d, di)}
            conv, proj = di, 2 * di
        else:
            nh, ng = di // ssm["headdim"], ssm.get("ngroups", 1)
            conv, proj = di + 2 * ng * ds, 2 * di + 2 * ng * ds + nh
            sd |= {p + "mixer.in_proj.weight": rnd(proj, d), p + "mixer.conv1d.weight": rnd(conv, 1, k),
                   p + "mixer.dt_bias": rnd(nh) - 2, p + "mixer.A_log": torch.log(torch.linspace(1, 16, nh)) + rnd(nh),
                   p + "mixer.D": 1 + rnd(nh), p + "mixer.norm.weight": 1 + rnd(di),
                   p + "mixer.out_proj.weight": rnd(d, di)}
        if conv_bias:
            sd[p + "mixer.conv1d.bias"] = rnd(conv)
        if bias:
            sd |= {p + "mixer.in_proj.bias": rnd(proj), p + "mixer.out_proj.bias": rnd(d)}
    sd["backbone.norm_f.weight"] = 1 + rnd(d)
    sd["lm_head.weight"] = sd["backbone.embedding.weight"] if cfg["tie_embeddings"] else rnd(_padded(cfg), d)
    return sd


def write_mamba_ssm_checkpoint(directory: Path, cfg: dict[str, Any], seed: int = 0,
                               safetensors: bool = False) -> dict[str, torch.Tensor]:
    directory.mkdir(parents=True, exist_ok=True)
    sd = mamba_ssm_state_dict(cfg, seed)
    (directory / "config.json").write_text(json.dumps(cfg, indent=4))
    if safetensors:
        from safetensors.torch import save_file

        save_file({k: v.contiguous().clone() for k, v in sd.items()}, str(directory / "model.safetensors"))
    else:
        torch.save(sd, directory / "pytorch_model.bin")
    return sd


def stock_hf_model(cfg: dict[str, Any], sd: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Transformers' own class, configured by hand from the mamba-ssm config and given the same weights."""
    ssm = dict(cfg["ssm_cfg"])
    common = dict(hidden_size=cfg["d_model"], num_hidden_layers=cfg["n_layer"], vocab_size=_padded(cfg),
                  tie_word_embeddings=cfg["tie_embeddings"], residual_in_fp32=cfg["residual_in_fp32"],
                  layer_norm_epsilon=1e-5, state_size=ssm["d_state"], expand=ssm.get("expand", 2),
                  conv_kernel=ssm.get("d_conv", 4), use_conv_bias=ssm.get("conv_bias", True),
                  use_bias=ssm.get("bias", False))
    if ssm.get("layer", "Mamba1") == "Mamba1":
        model = MambaForCausalLM(MambaConfig(**common, time_step_rank=ssm.get("dt_rank", "auto")))
    else:
        di = ssm.get("expand", 2) * cfg["d_model"]
        model = Mamba2ForCausalLM(Mamba2Config(**common, num_heads=di // ssm["headdim"], head_dim=ssm["headdim"],
                                               n_groups=1, chunk_size=ssm["chunk_size"],
                                               time_step_limit=tuple(ssm.get("dt_limit", (0.0, float("inf"))))))
    renamed = {k.replace("backbone.embedding.", "backbone.embeddings."): v for k, v in sd.items()}
    model.load_state_dict(renamed, strict=True)
    return model.eval()
