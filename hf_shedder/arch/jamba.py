"""Adapter for ``JambaForCausalLM`` (AI21 Jamba): Mamba-1 mixers, attention layers and MoE layers.

Layout: ``model.{embed_tokens, layers[i], final_layernorm}`` + ``lm_head``. Layer ``i`` is
``JambaMambaDecoderLayer`` (``mamba``) or ``JambaAttentionDecoderLayer`` (``self_attn``), both with
``feed_forward`` = ``JambaMLP`` (dense) or ``JambaSparseMoeBlock`` (``router`` + ``experts``).

Units: ``block`` (a whole decoder layer), ``ssm`` (the scan inside a Mamba mixer, as Mamba-Shedder
defines it), ``attn_heads`` (query heads of an attention layer; KV-group structure kept valid),
``mlp_channels`` (intermediate channels of a dense MLP) and ``experts`` (experts of a MoE layer).
The pieces shared with the GraniteMoeHybrid and Falcon-H1 adapters live in
:mod:`hf_shedder.arch.hybrid_parts`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers.activations import ACT2FN

from ..units import Plan, Unit
from .base import Undo
from .hybrid_parts import (
    ExpertMaskedLogits,
    HybridAdapterMixin,
    PerLayerConfigWithKeeper,
    refuse_plain_export_without_attention,
    remove_experts,
    slice_router,
    swap_attr,
    with_length_keeper,
)
from .layerwise_inputs import layer_type_masks, position_ids_for
from .ssm_free import SSMFreeMixer


def fit_period(flags: Sequence[bool]) -> tuple[int, int] | None:
    """(period, offset) with ``flags[i] == (i % period == offset)`` for every i, or None."""
    n = len(flags)
    for period in range(1, n + 2):
        for offset in range(period):
            if all((i % period == offset) == bool(f) for i, f in enumerate(flags)):
                return period, offset
    return None


def _explicit_layout_class(base: type) -> type:
    """A subclass of a Jamba config whose layer layout is an explicit list (any pruned pattern)."""

    class ExplicitLayout(PerLayerConfigWithKeeper, base):  # type: ignore[misc, valid-type]
        @property
        def layers_block_type(self) -> list[str]:
            return list(self.__dict__["_shedder_block_types"])

        @property
        def layers_num_experts(self) -> list[int]:
            return list(self.__dict__["_shedder_num_experts"])

        @property
        def layer_types(self) -> list[str]:
            return with_length_keeper(
                ["full_attention" if t == "attention" else "linear_attention" for t in self.layers_block_type]
            )

        def to_dict(self) -> dict[str, Any]:
            out = super().to_dict()
            out.pop("_shedder_block_types", None)
            out.pop("_shedder_num_experts", None)
            return out

    ExplicitLayout.__name__ = ExplicitLayout.__qualname__ = base.__name__
    ExplicitLayout._shedder_explicit_layout = True
    return ExplicitLayout


class JambaAdapter(HybridAdapterMixin):
    family = "jamba"
    model_types = ("jamba",)
    unit_kinds = ("block", "ssm", "attn_heads", "mlp_channels", "experts")
    width_kinds = frozenset({"attn_heads", "mlp_channels", "experts"})

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        # Layout of the model as given (a pruned model's config may hold an explicit list).
        self._block_types = list(self.config.layers_block_type)
        self._num_experts = list(self.config.layers_num_experts)

    # ---------------------------------------------------------------- structure
    def is_attention(self, layer: int) -> bool:
        return self._block_types[layer] == "attention"

    def is_moe(self, layer: int) -> bool:
        return self._num_experts[layer] > 1

    def num_experts(self, layer: int) -> int:
        return self._num_experts[layer]

    def has_unit(self, kind: str, layer: int) -> bool:
        if kind == "ssm":
            return not self.is_attention(layer)
        if kind == "attn_heads":
            return self.is_attention(layer)
        if kind == "mlp_channels":
            return not self.is_moe(layer)
        if kind == "experts":
            return self.is_moe(layer)
        return True

    # ---------------------------------------------------------------- masking / physical removal
    @staticmethod
    def _ssm_free(mixer: nn.Module, share: bool) -> SSMFreeMixer:
        new = SSMFreeMixer.from_mixer(mixer, "mamba1", share=share)
        new.act = ACT2FN["silu"]  # Jamba gates the scan output with SiLU whatever hidden_act is
        return new

    def _edit(self, unit: Unit, *, share: bool) -> tuple[nn.Module, str, nn.Module]:
        if unit.kind == "ssm":
            layer = self.layer(unit.layer)
            return layer, "mamba", self._ssm_free(layer.mamba, share=share)
        return super()._edit(unit, share=share)

    # A mask hides removed experts from the router; removal slices the expert weights and the router alike.
    def _mask_part(self, unit: Unit) -> Undo:
        if unit.kind == "experts":
            moe = self.layer(unit.layer).feed_forward
            return swap_attr(moe, "router", ExpertMaskedLogits(moe.router, unit.indices, moe.num_experts))
        return super()._mask_part(unit)

    def _remove_part(self, unit: Unit) -> None:
        if unit.kind == "experts":
            moe = self.layer(unit.layer).feed_forward
            pos = remove_experts(moe.experts, unit.indices, self._num_experts[unit.layer])
            moe.router = slice_router(moe.router, pos)
            moe.num_experts = len(pos)
        else:
            super()._remove_part(unit)

    def _update_config_after_block_removal(self, kept: list[int]) -> None:
        cfg = self.config
        types = [self._block_types[i] for i in kept]
        # Layers are already renumbered here: new position j holds original layer kept[j].
        experts = [self._layer_num_experts(j, i) for j, i in enumerate(kept)]
        attn = fit_period([t == "attention" for t in types])
        moe = fit_period([n > 1 for n in experts])
        uniform = all(n == cfg.num_experts for n in experts if n > 1)
        cfg.num_hidden_layers = len(kept)
        expressible = attn is not None and moe is not None and uniform and "attention" in types
        if expressible and not getattr(cfg, "_shedder_explicit_layout", False):
            # Expressible with the stock config fields: a plain Jamba checkpoint can describe it.
            cfg.attn_layer_period, cfg.attn_layer_offset = attn
            cfg.expert_layer_period, cfg.expert_layer_offset = moe
        else:
            if not getattr(cfg, "_shedder_explicit_layout", False):
                cfg.__class__ = _explicit_layout_class(type(cfg))
            cfg.__dict__["_shedder_block_types"] = types
            cfg.__dict__["_shedder_num_experts"] = experts
        self._block_types, self._num_experts = types, experts

    def _layer_num_experts(self, position: int, original: int) -> int:
        ff = self.layers()[position].feed_forward
        return getattr(ff, "num_experts", 1) if self._num_experts[original] > 1 else 1

    def block_only_export_supported(self, plan: Plan) -> bool:
        if not plan.kinds() <= {"block"}:
            return False
        refuse_plain_export_without_attention(self.config.layer_types[: self.config.num_hidden_layers], self.model)
        # Otherwise a plain Jamba config expresses the layout iff it is still periodic.
        return not getattr(self.config, "_shedder_explicit_layout", False)

    # ---------------------------------------------------------------- layer-wise forward
    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, Any]:
        hidden = self.decoder.embed_tokens(input_ids)
        position_ids = position_ids_for(hidden)
        masks = layer_type_masks(self.config, hidden, attention_mask, position_ids)
        return hidden, (masks, position_ids)

    def run_layer(self, index: int, hidden: torch.Tensor, ctx: Any) -> torch.Tensor:
        masks, position_ids = ctx
        kind = "full_attention" if self.is_attention(index) else "linear_attention"
        return self.layers()[index](hidden, attention_mask=masks[kind], position_ids=position_ids)

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder.final_layernorm(hidden)

    def lora_target_modules(self) -> list[str]:
        # Expert weights are 3D parameters (no nn.Linear), so LoRA adapts the dense parts only.
        return ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "out_proj", "gate_proj", "up_proj", "down_proj"]


__all__ = ["JambaAdapter", "fit_period"]
