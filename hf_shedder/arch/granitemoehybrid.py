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

from ..units import Plan, Unit
from .base import Undo
from .hybrid_parts import (
    ExpertMaskedLogits,
    Mamba2HybridAdapter,
    config_class_with_keeper,
    refuse_plain_export_without_attention,
    remove_experts,
    slice_router,
    swap_attr,
    with_length_keeper,
)
from .layerwise_inputs import layer_type_masks, position_ids_for
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


class GraniteMoeHybridAdapter(Mamba2HybridAdapter):
    family = "granitemoehybrid"
    model_types = ("granitemoehybrid",)
    unit_kinds = ("block", "ssm", "ssm_heads", "attn_heads", "mlp_channels", "experts")
    width_kinds = frozenset({"ssm_heads", "attn_heads", "mlp_channels", "experts"})
    mlp_size_field = "shared_intermediate_size"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self._types = list(self.config.layer_types[: len(self.layers())])

    # ---------------------------------------------------------------- structure
    def is_attention(self, layer: int) -> bool:
        return self._types[layer] == "full_attention"

    def num_experts(self, layer: int) -> int:
        return self.config.num_local_experts

    def has_unit(self, kind: str, layer: int) -> bool:
        if kind in ("ssm", "ssm_heads"):
            return not self.is_attention(layer)
        if kind == "attn_heads":
            return self.is_attention(layer)
        if kind == "experts":
            return (self.config.num_local_experts or 0) > 0
        return True

    # ---------------------------------------------------------------- masking / physical removal
    def _edit(self, unit: Unit, *, share: bool) -> tuple[nn.Module, str, nn.Module]:
        if unit.kind == "mlp_channels":
            layer = self.layer(unit.layer)
            return layer, "shared_mlp", edit_shared_mlp(layer.shared_mlp, unit.indices, self.mlp_size(), share=share)
        return super()._edit(unit, share=share)

    # A mask hides removed experts from the router; removal slices the expert weights and the router alike.
    def _mask_part(self, unit: Unit) -> Undo:
        if unit.kind == "experts":
            moe = self.layer(unit.layer).block_sparse_moe
            return swap_attr(moe, "router", ExpertMaskedLogits(moe.router, unit.indices, self.num_experts(unit.layer),
                                                              normalize="top_k"))
        return super()._mask_part(unit)

    def _remove_part(self, unit: Unit) -> None:
        if unit.kind == "experts":
            moe = self.layer(unit.layer).block_sparse_moe
            kept = remove_experts(moe.experts, unit.indices, self.config.num_local_experts)
            moe.router = slice_router(moe.router, kept)
        else:
            super()._remove_part(unit)

    def _update_config_after_block_removal(self, kept: list[int]) -> None:
        types = [self._types[i] for i in kept]
        self.config.num_hidden_layers = len(kept)
        # An extra trailing attention entry when none is left keeps HF's hybrid cache usable (see
        # with_length_keeper); such a config is not a valid stock config any more, so no plain export.
        self.config.layer_types = with_length_keeper(types)
        if len(self.config.layer_types) > len(types):
            self.config.__class__ = config_class_with_keeper(type(self.config))
        self._types = types

    def block_only_export_supported(self, plan: Plan) -> bool:
        if not plan.kinds() <= {"block"}:
            return False
        refuse_plain_export_without_attention(self.config.layer_types[: self.config.num_hidden_layers], self.model)
        return True

    # ---------------------------------------------------------------- layer-wise forward
    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, Any]:
        hidden = self.decoder.embed_tokens(input_ids) * self.decoder.embedding_multiplier
        position_ids = position_ids_for(hidden)
        masks = layer_type_masks(self.config, hidden, attention_mask)  # as the model does: no position_ids
        rope = self.decoder.rotary_emb
        position_embeddings = rope(hidden, position_ids) if rope is not None else None
        return hidden, (masks, position_embeddings)

    def run_layer(self, index: int, hidden: torch.Tensor, ctx: Any) -> torch.Tensor:
        masks, position_embeddings = ctx
        return self.layers()[index](hidden, attention_mask=masks[self._types[index]],
                                    position_embeddings=position_embeddings)

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        # The model divides its logits by logits_scaling; lm_head has no bias, so it is folded in here.
        return self.decoder.norm(hidden) / self.config.logits_scaling

    def scale_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits / self.config.logits_scaling

    def lora_target_modules(self) -> list[str]:
        return ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "out_proj", "input_linear", "output_linear"]

