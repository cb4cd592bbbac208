"""Adapter for ``GraniteMoeHybridForCausalLM`` (IBM Granite 4.0 hybrids).

Layout: ``model.{embed_tokens, layers[i], norm, rotary_emb}`` + ``lm_head``. Every decoder layer has
either a Mamba-2 mixer (``mamba``) or attention (``self_attn``), then ``block_sparse_moe`` (router +
experts, absent when ``num_local_experts == 0``) plus ``shared_mlp`` (``input_linear`` = [gate; up],
``output_linear``), with ``residual_multiplier`` on both branches.

Units: ``block``, ``ssm`` and ``ssm_heads`` (Mamba layers, see :mod:`hf_shedder.arch.mamba2_heads`),
``attn_heads`` (attention layers), ``mlp_channels`` (hidden channels of the shared MLP) and ``experts``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers.masking_utils import create_causal_mask, create_recurrent_attention_mask

from ..errors import PlanError
from ..units import Plan, Unit
from .base import Undo
from .jamba import (
    HybridAdapterMixin,
    SkippedAttentionLayer,
    edit_attention_heads,
    remove_experts,
    swap_attr,
    with_length_keeper,
)
from .mamba2_heads import Mamba2UnitsMixin
from .width import kept_positions, select_linear, shallow_clone


def edit_shared_mlp(mlp: nn.Module, removed: Sequence[int], size: int, *, share: bool) -> nn.Module:
    """Clone of a ``GraniteMoeHybridMLP`` without hidden channels ``removed`` (original numbering).

    ``input_linear`` stacks the gate rows and then the up rows, so channel c is rows c and size + c.
    """
    held = list(getattr(mlp, "shedder_channels", range(size)))
    kept = kept_positions(held, removed)
    new = shallow_clone(mlp)
    new.input_linear = select_linear(mlp.input_linear, rows=kept + [len(held) + k for k in kept], share=share)
    new.output_linear = select_linear(mlp.output_linear, cols=kept, share=share)
    new.hidden_size = len(kept)
    new.shedder_channels = tuple(held[p] for p in kept)
    return new


class MaskedTopKRouter(nn.Module):
    """Search-time stand-in for a ``GraniteMoeHybridTopKRouter`` whose removed experts get logit -inf.

    Top-k then never picks them and the softmax over the chosen logits is what a router without
    those experts computes. Shares the router's weight.
    """

    def __init__(self, router: nn.Module, removed: Sequence[int]) -> None:
        super().__init__()
        self.router = router
        self.top_k = router.top_k
        mask = torch.zeros(router.weight.shape[0], dtype=torch.bool)
        mask[list(removed)] = True
        self.register_buffer("removed_mask", mask, persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.router.weight

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.router(hidden_states)[2].masked_fill(self.removed_mask.to(hidden_states.device), float("-inf"))
        top_logits, top_index = logits.topk(self.top_k, dim=-1)
        return top_index, F.softmax(top_logits, dim=-1).type_as(hidden_states), logits


class GraniteMoeHybridAdapter(Mamba2UnitsMixin, HybridAdapterMixin):
    family = "granitemoehybrid"
    model_types = ("granitemoehybrid",)
    unit_kinds = ("block", "ssm", "ssm_heads", "attn_heads", "mlp_channels", "experts")
    width_kinds = frozenset({"ssm_heads", "attn_heads", "mlp_channels", "experts"})

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self._types = list(self.config.layer_types[: len(self.layers())])

    @property
    def decoder(self) -> nn.Module:
        return self.model.model

    def layers(self) -> nn.ModuleList:
        return self.decoder.layers

    def _mixer_location(self, layer: int) -> tuple[nn.Module, str]:
        return self.layers()[layer], "mamba"

    # ---------------------------------------------------------------- structure
    def is_attention(self, layer: int) -> bool:
        return self._types[layer] == "full_attention"

    def has_unit(self, kind: str, layer: int) -> bool:
        if kind in ("ssm", "ssm_heads"):
            return not self.is_attention(layer)
        if kind == "attn_heads":
            return self.is_attention(layer)
        if kind == "experts":
            return (self.config.num_local_experts or 0) > 0
        return True

    def width_size(self, kind: str, layer: int) -> int:
        if not self.has_unit(kind, layer):
            return 0
        if kind == "ssm_heads":
            return self._ssm_heads_size(layer)
        if kind == "attn_heads":
            return self.num_heads()
        if kind == "mlp_channels":
            return self.config.shared_intermediate_size
        if kind == "experts":
            return self.config.num_local_experts
        return super().width_size(kind, layer)

    def width_group(self, kind: str) -> int:
        if kind == "ssm_heads":
            return Mamba2UnitsMixin.width_group(self, kind)
        if kind == "mlp_channels":
            return max(1, self.config.shared_intermediate_size // self.mlp_channel_slices)
        return HybridAdapterMixin.width_group(self, kind)

    def width_candidates(self, kind: str, layer: int) -> list[tuple[int, ...]]:
        if kind == "ssm_heads":
            return self._ssm_heads_candidates(layer)
        return super().width_candidates(kind, layer)

    def _check_width(self, unit: Unit, already_removed: set[int]) -> None:
        if unit.kind == "ssm_heads":
            self._check_ssm_heads(unit.layer, set(already_removed) | set(unit.indices))
        else:
            super()._check_width(unit, already_removed)

    # ---------------------------------------------------------------- masking
    def _mask_unit(self, unit: Unit) -> Undo:
        if unit.kind == "block" and self.is_attention(unit.layer):
            return swap_item(self.layers(), unit.layer, SkippedAttentionLayer(unit.layer))
        return super()._mask_unit(unit)

    def _mask_part(self, unit: Unit) -> Undo:
        layer = self.layers()[unit.layer]
        if unit.kind in ("ssm", "ssm_heads"):
            return self._mask_mixer_unit(unit.kind, unit.layer, unit.indices)
        if unit.kind == "attn_heads":
            return swap_attr(layer, "self_attn",
                             edit_attention_heads(layer.self_attn, unit.indices, self.num_heads(), share=True))
        if unit.kind == "mlp_channels":
            return swap_attr(layer, "shared_mlp", edit_shared_mlp(
                layer.shared_mlp, unit.indices, self.config.shared_intermediate_size, share=True))
        if unit.kind == "experts":
            moe = layer.block_sparse_moe
            return swap_attr(moe, "router", MaskedTopKRouter(moe.router, unit.indices))
        raise AssertionError(unit)

    # ---------------------------------------------------------------- physical removal
    def _remove_part(self, unit: Unit) -> None:
        layer = self.layers()[unit.layer]
        if unit.kind in ("ssm", "ssm_heads"):
            self._remove_mixer_unit(unit.kind, unit.layer, unit.indices)
        elif unit.kind == "attn_heads":
            layer.self_attn = edit_attention_heads(layer.self_attn, unit.indices, self.num_heads(), share=False)
        elif unit.kind == "mlp_channels":
            layer.shared_mlp = edit_shared_mlp(layer.shared_mlp, unit.indices, self.config.shared_intermediate_size,
                                               share=False)
        elif unit.kind == "experts":
            moe = layer.block_sparse_moe
            kept = remove_experts(moe.experts, unit.indices, self.config.num_local_experts)
            w = moe.router.weight
            moe.router.weight = nn.Parameter(w.detach()[kept].clone(), requires_grad=w.requires_grad)
            moe.router.num_experts = len(kept)
        else:
            raise AssertionError(unit)

    def _renumber(self, layer: nn.Module, new_idx: int) -> None:
        for name in ("mamba", "self_attn"):
            sub = getattr(layer, name, None)
            if sub is not None:
                sub.layer_idx = new_idx

    def _set_layers(self, layers: nn.ModuleList) -> None:
        self.decoder.layers = layers

    def _update_config_after_block_removal(self, kept: list[int]) -> None:
        types = [self._types[i] for i in kept]
        self.config.num_hidden_layers = len(kept)
        # An extra trailing attention entry when none is left keeps HF's hybrid cache usable (see
        # with_length_keeper); such a config is not a valid stock config any more, so no plain export.
        self.config.layer_types = with_length_keeper(types)
        self._types = types

    def block_only_export_supported(self, plan: Plan) -> bool:
        if not plan.kinds() <= {"block"}:
            return False
        if "full_attention" not in self.config.layer_types[: self.config.num_hidden_layers]:
            raise PlanError(
                "this plan removes every attention layer; Transformers cannot generate with a cache from a "
                f"{type(self.model).__name__} that has no attention layer, so no plain checkpoint is written. "
                "Save without export= (or export='remote_code') instead"
            )
        return True

    # ---------------------------------------------------------------- layer-wise forward
    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, Any]:
        hidden = self.decoder.embed_tokens(input_ids) * self.decoder.embedding_multiplier
        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        kw = {"config": self.config, "inputs_embeds": hidden, "attention_mask": attention_mask,
              "past_key_values": None}
        masks = {"full_attention": create_causal_mask(**kw), "linear_attention": create_recurrent_attention_mask(**kw)}
        rope = self.decoder.rotary_emb
        position_embeddings = rope(hidden, position_ids) if rope is not None else None
        return hidden, (masks, position_embeddings)

    def run_layer(self, index: int, hidden: torch.Tensor, ctx: Any) -> torch.Tensor:
        masks, position_embeddings = ctx
        return self.layers()[index](hidden, attention_mask=masks[self._types[index]], past_key_values=None,
                                    position_embeddings=position_embeddings)

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        # The model divides its logits by logits_scaling; lm_head has no bias, so it is folded in here.
        return self.decoder.norm(hidden) / self.config.logits_scaling

    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    def lora_target_modules(self) -> list[str]:
        return ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "out_proj", "input_linear", "output_linear"]


def swap_item(items: nn.ModuleList, index: int, new: nn.Module) -> Undo:
    original = items[index]
    items[index] = new

    def undo() -> None:
        items[index] = original

    return undo
