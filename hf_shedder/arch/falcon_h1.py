"""Adapter for ``FalconH1ForCausalLM`` (TII Falcon-H1): attention and Mamba-2 side by side in every layer.

Layout: ``model.{embed_tokens, layers[i], final_layernorm, rotary_emb}`` + ``lm_head``. A decoder layer
computes ``h + ssm_out_mult * mamba(n(h)) + attn_out_mult * self_attn(attn_in_mult * n(h))`` and then
``h + feed_forward(n'(h))``; it returns a 1-tuple. The mixer scales its input by ``ssm_in_multiplier``
and its ``in_proj`` output by the per-section ``mup_vector``; the model scales embeddings by
``embedding_multiplier`` and logits by ``lm_head_multiplier``.

Units: ``block`` (the whole layer), ``attn`` (the attention branch), ``mamba`` (the Mamba branch),
``ssm`` (the scan inside the Mamba branch, Mamba-Shedder's SSM removal), ``ssm_heads`` (Mamba-2 heads),
``attn_heads`` and ``mlp_channels``. Removing ``attn`` of every layer leaves a Mamba-2 model with MLPs,
removing ``mamba`` of every layer a transformer; a layer without both branches keeps its MLP.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..compat import pop_cache
from ..errors import PlanError
from ..units import Plan, Unit
from .base import Undo
from .hybrid_parts import Mamba2HybridAdapter, keep_kv_length
from .layerwise_inputs import layer_type_masks, position_ids_for
from .mamba2_heads import Mamba2MixerEditor, check_ssm_heads, mixer_heads
from .ssm_free import SSMFreeMixer
from .width import (
    head_channels,
    kept_positions,
    select_depthwise_conv,
    select_linear,
    select_vector,
    shallow_clone,
)


class AttentionRemoved(nn.Module):
    """The attention branch of a Falcon-H1 layer, removed: contributes nothing; keeps the cache length."""

    def __init__(self, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        keep_kv_length(pop_cache(kwargs), self.layer_idx, hidden_states)
        return torch.zeros_like(hidden_states), None


class MambaRemoved(nn.Module):
    """The Mamba branch of a Falcon-H1 layer, removed (unit ``mamba``): contributes nothing to the layer's sum.
    Its cache slot's SSM state is then never written; the attention part of the slot still tracks the length."""

    def __init__(self, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


class SiluGate(nn.Module):
    """``y = u * silu(z)``: the gate of a Falcon-H1 mixer without the gated RMSNorm (``mamba_rms_norm=False``)."""

    def forward(self, hidden_states: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return hidden_states * F.silu(gate)


class ScaledLinear(nn.Module):
    """``out_scale * linear(in_scale * x)`` on shared weights (search-time form of folded multipliers)."""

    def __init__(self, linear: nn.Module, in_scale: float, out_scale: torch.Tensor) -> None:
        super().__init__()
        self.linear = linear
        self.in_scale = in_scale
        self.register_buffer("out_scale", out_scale, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x * self.in_scale) * self.out_scale


def prune_falcon_heads(mixer: nn.Module, kept: Sequence[int], *, share: bool) -> nn.Module:
    """Clone of a ``FalconH1Mixer`` keeping the SSD heads at positions ``kept`` (``mup_vector`` follows)."""
    kept = sorted(kept)
    p, inner = mixer.head_dim, mixer.intermediate_size
    bc = 2 * mixer.n_groups * mixer.ssm_state_size
    ch = head_channels(kept, p)
    rows = ch + [inner + c for c in ch] + list(range(2 * inner, 2 * inner + bc)) + [2 * inner + bc + h for h in kept]
    new = shallow_clone(mixer)
    new.in_proj = select_linear(mixer.in_proj, rows=rows, share=share)
    new.conv1d = select_depthwise_conv(mixer.conv1d, ch + list(range(inner, inner + bc)), share=share)
    for name in ("A_log", "D", "dt_bias"):
        setattr(new, name, select_vector(getattr(mixer, name), kept, share=share))
    if getattr(mixer.norm, "weight", None) is not None:  # FalconH1RMSNormGated (grouped like B/C)
        new.norm = shallow_clone(mixer.norm)
        new.norm.weight = select_vector(mixer.norm.weight, ch, share=share)
    new.out_proj = select_linear(mixer.out_proj, cols=ch, share=share)
    new.mup_vector = mixer.mup_vector[..., rows].clone()
    new.num_heads, new.intermediate_size, new.conv_dim = len(kept), len(ch), len(ch) + bc
    held = mixer_heads(mixer)
    new.shedder_heads = tuple(held[k] for k in kept)
    return new


def falcon_ssm_free(mixer: nn.Module, *, share: bool) -> SSMFreeMixer:
    """SSM-free form of a ``FalconH1Mixer``: its input and ``mup_vector`` multipliers are kept exactly.

    A mask keeps them as a :class:`ScaledLinear` around the shared ``in_proj`` rows; extraction folds
    them into a smaller, independent ``in_proj``.
    """
    inner = mixer.intermediate_size
    new = SSMFreeMixer.from_mixer(mixer, "mamba2", share=share)
    if not isinstance(getattr(mixer.norm, "weight", None), torch.Tensor):
        new.norm = SiluGate()
    scale = mixer.mup_vector.reshape(-1)[: 2 * inner].detach()
    if share:
        new.in_proj = ScaledLinear(new.in_proj, mixer.ssm_in_multiplier, scale)
    else:
        with torch.no_grad():
            new.in_proj.weight.mul_((scale * mixer.ssm_in_multiplier)[:, None].to(new.in_proj.weight.dtype))
            if new.in_proj.bias is not None:
                new.in_proj.bias.mul_(scale.to(new.in_proj.bias.dtype))
    new.shedder_heads = mixer_heads(mixer)
    return new


def build_falcon_mixer(original: nn.Module, removed: frozenset[int], ssm: bool, share: bool) -> nn.Module:
    """The original mixer with heads ``removed`` (original numbering) and optionally its SSM removed."""
    mixer = original
    if removed:
        mixer = prune_falcon_heads(mixer, kept_positions(mixer_heads(mixer), removed), share=share)
    if ssm:
        mixer = falcon_ssm_free(mixer, share=share)
    return mixer


# What a layer's Mamba branch lost: heads (original numbering), its SSM, the whole branch.
_Removed = tuple[frozenset[int], bool, bool]


class FalconH1MixerEditor(Mamba2MixerEditor):
    """:class:`Mamba2MixerEditor` for Falcon-H1 mixers (multipliers, optional gated norm), which can also
    remove a layer's whole Mamba branch (``branch=True``, unit ``mamba``).

    Masks and physical removal both rebuild a layer's mixer from its unpruned form with everything removed
    so far, so ``ssm``, ``ssm_heads`` and ``mamba`` units of one layer combine in any order, and the unpruned
    mixer (its heads and groups) stays known while the branch is masked away.
    """

    build = staticmethod(build_falcon_mixer)

    def __init__(self, locate: Any) -> None:
        super().__init__(locate)
        self._removed: dict[int, tuple[nn.Module, _Removed]] = {}

    def check_heads(self, layer: int, removed: set[int]) -> None:
        mixer = self.original(layer)
        check_ssm_heads(removed, len(mixer_heads(mixer)), mixer.n_groups, 1)

    @staticmethod
    def _combine(previous: _Removed | None, heads: Sequence[int], ssm: bool, branch: bool) -> _Removed:
        gone, no_ssm, no_branch = previous or (frozenset(), False, False)
        return gone | frozenset(heads), no_ssm or ssm, no_branch or branch

    def _build(self, layer: int, original: nn.Module, state: _Removed, share: bool) -> nn.Module:
        gone, no_ssm, no_branch = state
        return MambaRemoved(layer) if no_branch else self.build(original, gone, no_ssm, share=share)

    def mask(self, layer: int, heads: Sequence[int] = (), ssm: bool = False, branch: bool = False) -> Undo:
        return self._masks.mask(layer, [self.locate(layer)], lambda prev: self._combine(prev, heads, ssm, branch),
                                lambda original, state: self._build(layer, original, state, share=True))

    def remove(self, layer: int, heads: Sequence[int] = (), ssm: bool = False, branch: bool = False) -> None:
        parent, name = self.locate(layer)
        original, state = self._removed.get(layer, (getattr(parent, name), None))
        state = self._combine(state, heads, ssm, branch)
        self._removed[layer] = (original, state)
        setattr(parent, name, self._build(layer, original, state, share=False))


class FalconH1Adapter(Mamba2HybridAdapter):
    family = "falcon_h1"
    model_types = ("falcon_h1",)
    unit_kinds = ("block", "attn", "mamba", "ssm", "ssm_heads", "attn_heads", "mlp_channels")
    width_kinds = frozenset({"ssm_heads", "attn_heads", "mlp_channels"})
    mixer_editor_class = FalconH1MixerEditor
    layer_returns_tuple = True

    # ---------------------------------------------------------------- structure
    def is_attention(self, layer: int) -> bool:
        return True  # every Falcon-H1 layer holds attention (next to its Mamba-2 mixer)

    def whole_kind_for(self, width_kind: str) -> str:
        return {"attn_heads": "attn", "ssm_heads": "mamba"}.get(width_kind, "block")

    def _check_unit(self, unit: Unit, state: dict[str, Any]) -> None:
        super()._check_unit(unit, state)
        if unit.kind == "attn_heads" and ("attn", unit.layer) in state["parts"]:
            raise PlanError(f"the attention of layer {unit.layer} was already removed (unit 'attn')")
        if unit.kind in ("ssm", "ssm_heads") and ("mamba", unit.layer) in state["parts"]:
            raise PlanError(f"the Mamba branch of layer {unit.layer} was already removed (unit 'mamba')")

    # ---------------------------------------------------------------- masking / physical removal
    def _edit(self, unit: Unit, *, share: bool) -> tuple[nn.Module, str, nn.Module]:
        if unit.kind == "attn":
            return self.layer(unit.layer), "self_attn", AttentionRemoved(unit.layer)
        return super()._edit(unit, share=share)

    # The whole Mamba branch goes through the mixer editor too, so it combines with ssm / ssm_heads.
    def _mask_part(self, unit: Unit) -> Undo:
        if unit.kind == "mamba":
            return self.mamba2_editor.mask(unit.layer, branch=True)
        return super()._mask_part(unit)

    def _remove_part(self, unit: Unit) -> None:
        if unit.kind == "mamba":
            self.mamba2_editor.remove(unit.layer, branch=True)
        else:
            super()._remove_part(unit)

    def apply_plan(self, plan: Plan) -> nn.Module:
        model = super().apply_plan(plan)
        # ``mup_vector`` is a non-persistent buffer that FalconH1Model fills in its own init. A pruned model
        # is rebuilt and pruned before its weights load, and nothing fills it then (pruned mixers also
        # hold sliced copies), so it is saved with the weights instead.
        for layer in self.layers():
            layer.mamba._non_persistent_buffers_set.discard("mup_vector")
        return model

    @contextlib.contextmanager
    def plain_export(self) -> Iterator[None]:
        # The stock model computes mup_vector itself and does not save it (an unexpected key when loading).
        # Plain export only takes whole-block plans, so the kept mixers hold the stock values.
        mixers = [layer.mamba for layer in self.layers()]
        for mixer in mixers:
            mixer._non_persistent_buffers_set.add("mup_vector")
        try:
            yield
        finally:
            for mixer in mixers:
                mixer._non_persistent_buffers_set.discard("mup_vector")

    def _update_config_after_block_removal(self, kept: list[int]) -> None:
        # Every Falcon-H1 layer has the same structure, so fewer layers is all the config has to say.
        self.config.num_hidden_layers = len(kept)

    # ---------------------------------------------------------------- layer-wise forward
    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, Any]:
        hidden = self.decoder.embed_tokens(input_ids) * self.decoder.embedding_multiplier
        position_ids = position_ids_for(hidden)
        masks = layer_type_masks(self.config, hidden, attention_mask, position_ids)
        position_embeddings = self.decoder.rotary_emb(hidden, position_ids=position_ids)
        return hidden, (masks, position_ids, position_embeddings)

    def run_layer(self, index: int, hidden: torch.Tensor, ctx: Any) -> torch.Tensor:
        masks, position_ids, position_embeddings = ctx
        out = self.layers()[index](hidden, attention_mask=masks["full_attention"],
                                   mamba_attention_mask=masks["linear_attention"],
                                   position_ids=position_ids,
                                   position_embeddings=position_embeddings)
        return out[0]

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        # The model multiplies its logits by lm_head_multiplier; lm_head has no bias, so it is folded in here.
        return self.decoder.final_layernorm(hidden) * self.decoder.lm_head_multiplier

    def scale_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits * self.decoder.lm_head_multiplier

    def lora_target_modules(self) -> list[str]:
        return ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "out_proj", "gate_proj", "up_proj", "down_proj"]


__all__ = ["AttentionRemoved", "FalconH1Adapter", "MambaRemoved", "ScaledLinear", "SiluGate", "falcon_ssm_free",
           "prune_falcon_heads"]
