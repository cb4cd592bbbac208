"""mamba-ssm's checkpoint layout (``MambaLMHeadModel``) for the Mamba-1 and Mamba-2 families.

The paper's checkpoints (state-spaces/mamba-2.8b, state-spaces/mamba2-2.7b) are saved by mamba-ssm: a
``config.json`` with its own field names (``d_model``, ``n_layer``, ``ssm_cfg``, ...) and a state dict
under ``backbone.embedding``, ``backbone.layers.N.{norm,mixer.*}``, ``backbone.norm_f``, ``lm_head``.
Transformers' ``MambaForCausalLM`` / ``Mamba2ForCausalLM`` hold the same tensors under the same names
except the embedding (``backbone.embeddings``). This module maps configs and keys both ways, and refuses
what one side cannot express, so the reader/writer (:mod:`hf_shedder.mamba_ssm_format`) knows no names.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ..errors import CheckpointError, PlanError

# mamba-ssm's MambaConfig dataclass (models/config_mamba.py): its fields and their defaults. Its
# from_pretrained builds MambaConfig(**config_json), so a config.json must hold exactly these names.
MAMBA_SSM_DEFAULTS: dict[str, Any] = {
    "d_model": 2560, "d_intermediate": 0, "n_layer": 64, "vocab_size": 50277, "ssm_cfg": {},
    "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
    "pad_vocab_size_multiple": 8, "tie_embeddings": True,
}
# MixerModel's norm_epsilon is not a MambaConfig field: every block norm and norm_f use 1e-5, and
# Mamba2's gated norm is built with eps=1e-5 too.
MAMBA_SSM_NORM_EPS = 1e-5
# <|endoftext|> of GPT-NeoX-20B, the tokenizer of every state-spaces checkpoint: bos, eos and pad.
NEOX_EOS_ID = 0

# Arguments of mamba_ssm.modules.{mamba_simple.Mamba, mamba2.Mamba2} that a checkpoint may set in ssm_cfg.
# The rest of each list only shapes initialisation or kernels, never the forward of loaded weights.
_MAMBA1_ARGS = {"d_state", "d_conv", "expand", "dt_rank", "dt_min", "dt_max", "dt_init", "dt_scale",
                "dt_init_floor", "conv_bias", "bias", "use_fast_path"}
_MAMBA2_ARGS = {"d_state", "d_conv", "conv_init", "expand", "headdim", "d_ssm", "ngroups", "A_init_range",
                "D_has_hdim", "rmsnorm", "norm_before_gate", "dt_min", "dt_max", "dt_init_floor", "dt_limit", "bias",
                "conv_bias", "chunk_size", "use_mem_eff_path", "sequence_parallel"}

EMBEDDING_KEY = ("backbone.embedding.weight", "backbone.embeddings.weight")  # (mamba-ssm, Transformers)
LM_HEAD_KEY = "lm_head.weight"
MODEL_TYPES = ("mamba", "mamba2")  # the Transformers model types this layout converts to and from


def is_mamba_ssm_config(raw: Mapping[str, Any]) -> bool:
    """Whether a parsed ``config.json`` is mamba-ssm's (a Transformers config always names its model_type)."""
    return "model_type" not in raw and "d_model" in raw and "n_layer" in raw


def padded_vocab_size(raw: Mapping[str, Any]) -> int:
    """The embedding rows mamba-ssm allocates: vocab_size rounded up to pad_vocab_size_multiple."""
    vocab, multiple = int(raw.get("vocab_size", 50277)), int(raw.get("pad_vocab_size_multiple", 8))
    return vocab if vocab % multiple == 0 else vocab + multiple - vocab % multiple


def _refuse(where: str, what: str) -> CheckpointError:
    return CheckpointError(
        f"{where}: {what}. Transformers' MambaForCausalLM / Mamba2ForCausalLM cannot hold that, so hf_shedder "
        "cannot convert this mamba-ssm checkpoint"
    )


def hf_config_from_mamba_ssm(raw: Mapping[str, Any], where: str = "config.json") -> tuple[str, dict[str, Any]]:
    """(Transformers model_type, config kwargs) equivalent to a mamba-ssm ``config.json``; refuses what has no
    equivalent (MLPs, attention layers, LayerNorm, Mamba-3, Mamba-2 options Transformers does not implement)."""
    unknown = sorted(set(raw) - set(MAMBA_SSM_DEFAULTS))
    if unknown:
        raise CheckpointError(f"{where}: unknown mamba-ssm config fields {unknown} (mamba-ssm itself would refuse them)")
    cfg = {**MAMBA_SSM_DEFAULTS, **raw}
    if int(cfg["d_intermediate"] or 0) > 0:
        raise _refuse(where, f"d_intermediate={cfg['d_intermediate']} adds a gated MLP after every mixer")
    if cfg["attn_layer_idx"]:
        raise _refuse(where, f"attn_layer_idx={list(cfg['attn_layer_idx'])} makes those layers attention layers")
    if not cfg["rms_norm"]:
        raise _refuse(where, "rms_norm=false uses LayerNorm (with bias) instead of RMSNorm")
    ssm = dict(cfg["ssm_cfg"] or {})
    layer = ssm.pop("layer", "Mamba1")
    d_model = int(cfg["d_model"])
    common = {
        "hidden_size": d_model, "num_hidden_layers": int(cfg["n_layer"]), "vocab_size": padded_vocab_size(cfg),
        "tie_word_embeddings": bool(cfg["tie_embeddings"]), "residual_in_fp32": bool(cfg["residual_in_fp32"]),
        "layer_norm_epsilon": MAMBA_SSM_NORM_EPS, "bos_token_id": NEOX_EOS_ID, "eos_token_id": NEOX_EOS_ID,
        "pad_token_id": NEOX_EOS_ID, "use_cache": True,
    }
    if layer == "Mamba1":
        _check_args(ssm, _MAMBA1_ARGS, layer, where)
        dt_rank = ssm.get("dt_rank", "auto")
        return "mamba", {
            **common, "state_size": ssm.get("d_state", 16), "conv_kernel": ssm.get("d_conv", 4),
            "expand": ssm.get("expand", 2),
            "time_step_rank": math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank),
            "time_step_min": ssm.get("dt_min", 0.001), "time_step_max": ssm.get("dt_max", 0.1),
            "time_step_floor": ssm.get("dt_init_floor", 1e-4), "time_step_scale": ssm.get("dt_scale", 1.0),
            "time_step_init_scheme": ssm.get("dt_init", "random"),
            "use_conv_bias": bool(ssm.get("conv_bias", True)), "use_bias": bool(ssm.get("bias", False)),
        }
    if layer == "Mamba2":
        _check_args(ssm, _MAMBA2_ARGS, layer, where)
        expand = ssm.get("expand", 2)
        d_inner, headdim = int(expand * d_model), int(ssm.get("headdim", 64))
        if ssm.get("d_ssm") not in (None, d_inner):
            raise _refuse(where, f"ssm_cfg.d_ssm={ssm['d_ssm']} < d_inner={d_inner} runs a gated MLP beside the SSM")
        if ssm.get("D_has_hdim", False):
            raise _refuse(where, "ssm_cfg.D_has_hdim=true gives D one value per channel, not per head")
        if not ssm.get("rmsnorm", True):
            raise _refuse(where, "ssm_cfg.rmsnorm=false drops the gated RMSNorm before out_proj")
        if ssm.get("norm_before_gate", False):
            raise _refuse(where, "ssm_cfg.norm_before_gate=true normalises before the gate")
        if int(ssm.get("ngroups", 1)) != 1:
            raise _refuse(where, f"ssm_cfg.ngroups={ssm['ngroups']}: mamba-ssm normalises the gated output per "
                                 "group, Transformers' Mamba-2 over all heads at once (the logits would differ)")
        if d_inner % headdim:
            raise CheckpointError(f"{where}: d_inner={d_inner} is not a multiple of headdim={headdim}")
        return "mamba2", {
            **common, "num_heads": d_inner // headdim, "head_dim": headdim, "state_size": ssm.get("d_state", 128),
            "conv_kernel": ssm.get("d_conv", 4), "expand": expand, "n_groups": 1,
            "chunk_size": int(ssm.get("chunk_size", 256)),
            "time_step_limit": [float(x) for x in ssm.get("dt_limit", (0.0, float("inf")))],
            "time_step_min": ssm.get("dt_min", 0.001), "time_step_max": ssm.get("dt_max", 0.1),
            "time_step_floor": ssm.get("dt_init_floor", 1e-4),
            "use_conv_bias": bool(ssm.get("conv_bias", True)), "use_bias": bool(ssm.get("bias", False)),
        }
    raise _refuse(where, f"ssm_cfg.layer={layer!r} (only Mamba1 and Mamba2 layers have a Transformers class)")


def _check_args(ssm: Mapping[str, Any], known: set[str], layer: str, where: str) -> None:
    unknown = sorted(set(ssm) - known)
    if unknown:
        raise CheckpointError(f"{where}: ssm_cfg has arguments {unknown} that mamba-ssm's {layer} does not take")


def _pad_multiple(vocab_size: int) -> int:
    """A pad_vocab_size_multiple that leaves the (already padded) vocabulary as it is."""
    return next(m for m in (16, 8, 4, 2, 1) if vocab_size % m == 0)


def mamba_ssm_config_from_hf(config: Any) -> dict[str, Any]:
    """The mamba-ssm ``config.json`` of a Transformers Mamba / Mamba-2 config (PlanError when it has none)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_TYPES:
        raise PlanError(f"mamba-ssm has no layout for model_type {model_type!r}; it holds Mamba and Mamba-2 only")
    if abs(float(config.layer_norm_epsilon) - MAMBA_SSM_NORM_EPS) > 1e-12:
        raise PlanError(f"layer_norm_epsilon={config.layer_norm_epsilon}: mamba-ssm's norms always use "
                        f"{MAMBA_SSM_NORM_EPS}")
    if model_type == "mamba":
        ssm = {"d_state": config.state_size, "d_conv": config.conv_kernel, "expand": config.expand,
               "dt_rank": int(config.time_step_rank), "conv_bias": bool(config.use_conv_bias),
               "bias": bool(config.use_bias)}
    else:
        if int(config.n_groups) != 1:
            raise PlanError(f"n_groups={config.n_groups}: mamba-ssm normalises the gated output per group, "
                            "Transformers' Mamba-2 over all heads at once, so the exported model would compute "
                            "other logits")
        ssm = {"layer": "Mamba2", "d_state": config.state_size, "d_conv": config.conv_kernel,
               "expand": config.expand, "headdim": config.head_dim, "ngroups": 1, "chunk_size": config.chunk_size,
               "conv_bias": bool(config.use_conv_bias), "bias": bool(config.use_bias)}
        limit = [float(x) for x in config.time_step_limit]
        if limit != [0.0, float("inf")]:
            ssm["dt_limit"] = limit
    vocab = int(config.vocab_size)
    return {
        "d_model": int(config.hidden_size), "d_intermediate": 0, "n_layer": int(config.num_hidden_layers),
        "vocab_size": vocab, "ssm_cfg": ssm, "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True,
        "residual_in_fp32": bool(config.residual_in_fp32), "fused_add_norm": True,
        "pad_vocab_size_multiple": _pad_multiple(vocab), "tie_embeddings": bool(config.tie_word_embeddings),
    }


def state_dict_to_hf(state_dict: dict[str, Any], tied: bool, where: str) -> dict[str, Any]:
    """mamba-ssm keys -> Transformers keys. A tied lm_head is dropped (Transformers ties it on load) after
    checking that it is the embedding, as mamba-ssm's own tie would make it."""
    import torch

    src_emb, dst_emb = EMBEDDING_KEY
    if src_emb not in state_dict:
        raise CheckpointError(f"{where}: no {src_emb!r}: not a mamba-ssm MambaLMHeadModel state dict")
    out = {(dst_emb if k == src_emb else k): v for k, v in state_dict.items()}
    if tied and LM_HEAD_KEY in out:
        head = out.pop(LM_HEAD_KEY)
        if head.shape != out[dst_emb].shape or not torch.equal(head, out[dst_emb]):
            raise CheckpointError(f"{where}: tie_embeddings is true but lm_head.weight differs from the embedding")
    return out


def state_dict_to_mamba_ssm(state_dict: dict[str, Any], tied: bool) -> dict[str, Any]:
    """Transformers keys -> mamba-ssm keys; a tied lm_head is written too (mamba-ssm loads strictly and its
    state dict lists the shared weight under both names)."""
    src_emb, dst_emb = EMBEDDING_KEY[1], EMBEDDING_KEY[0]
    out = {(dst_emb if k == src_emb else k): v for k, v in state_dict.items()}
    if tied:
        out[LM_HEAD_KEY] = out[dst_emb]
    return out
