"""Common adapter for hybrid decoder stacks whose layers each hold one token mixer (Mamba-2 or attention)
and possibly an MLP, such as Bamba and Nemotron-H.

A family subclass says where things are (``_layer_type``, ``_mixer_location``, ``_attn_location``,
``_mlp_location``), how to stand in for a removed layer, and how the config records the layer pattern.
Units: ``block`` (a whole layer), ``ssm`` / ``ssm_heads`` (Mamba-2 layers), ``attn_heads`` (attention
layers; grouped-query structure kept), ``mlp_channels`` (layers with an MLP).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from ..units import Unit
from .base import ArchAdapter, SkippedLayer, Undo
from .mamba2_heads import Mamba2UnitsMixin
from .stacked_masks import StackedMasks
from .width import check_attention_heads, edit_attention_heads, edit_mlp_channels

MAMBA, ATTENTION, MLP, MOE = "mamba", "attention", "mlp", "moe"


class WidthEditor:
    """Masks/removes index units on one module per layer; masks of a layer combine (rebuilt from the original)."""

    def __init__(self, locate: Callable[[int], tuple[nn.Module, str]],
                 prune: Callable[[nn.Module, set[int], bool], nn.Module]) -> None:
        self.locate, self.prune = locate, prune
        self._masks = StackedMasks()

    def mask(self, layer: int, indices: Sequence[int]) -> Undo:
        return self._masks.mask(
            layer, [self.locate(layer)], lambda removed: (removed or frozenset()) | frozenset(indices),
            lambda original, removed: self.prune(original, set(removed), True),
        )

    def remove(self, layer: int, indices: Sequence[int]) -> None:
        parent, name = self.locate(layer)
        setattr(parent, name, self.prune(getattr(parent, name), set(indices), False))


class SkippedTupleLayer(SkippedLayer):
    """Stand-in for a removed layer in stacks whose layers return ``(hidden_states, attn_weights)``."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        return hidden_states, None


class WidthUnitsMixin(Mamba2UnitsMixin):
    """``ssm_heads`` / ``attn_heads`` / ``mlp_channels`` sizes, search candidates and checks for adapters whose
    candidate sizes come from ``width_groups`` (Mamba-2 heads per B/C group, KV groups, MLP channels).

    The adapter says how wide a layer's MLP is (``_mlp_size``).
    """

    # MLP channels per search candidate when width_groups does not say: 1/8 of the width.
    mlp_candidates_per_layer: ClassVar[int] = 8

    def _mlp_size(self, layer: int) -> int:
        raise NotImplementedError

    def width_size(self, kind: str, layer: int) -> int:
        if kind == "ssm_heads":
            return self._ssm_heads_size(layer)
        if kind == "attn_heads":
            return self.config.num_attention_heads
        if kind == "mlp_channels":
            return self._mlp_size(layer)
        return super().width_size(kind, layer)

    def width_group(self, kind: str) -> int:
        if kind == "mlp_channels" and kind not in self.width_groups:
            return max(1, -(-self.config.intermediate_size // self.mlp_candidates_per_layer))
        return super().width_group(kind)

    def width_candidates(self, kind: str, layer: int) -> list[tuple[int, ...]]:
        if kind == "ssm_heads":
            return self._ssm_heads_candidates(layer)
        if kind == "attn_heads":  # whole KV groups keep grouped-query attention valid (single heads for MHA)
            rep = self.config.num_attention_heads // self.config.num_key_value_heads
            n, groups = self.width_group(kind), self.config.num_key_value_heads
            return [tuple(range(g * rep, min(g + n, groups) * rep)) for g in range(0, groups, n)]
        return super().width_candidates(kind, layer)

    def _check_width(self, unit: Unit, already_removed: set[int]) -> None:
        removed = already_removed | set(unit.indices)
        if unit.kind == "ssm_heads":
            self._check_ssm_heads(unit.layer, removed)
        elif unit.kind == "attn_heads":
            check_attention_heads(removed, self.config.num_attention_heads, self.config.num_key_value_heads)


class HybridStackAdapter(WidthUnitsMixin, ArchAdapter):
    unit_kinds: ClassVar[tuple[str, ...]] = ("block", "ssm", "ssm_heads", "attn_heads", "mlp_channels")
    width_kinds = frozenset({"ssm_heads", "attn_heads", "mlp_channels"})
    mlp_in_names: ClassVar[tuple[str, ...]]

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.attn_editor = WidthEditor(self._attn_location, lambda m, r, s: edit_attention_heads(m, r, share=s))
        self.mlp_editor = WidthEditor(
            self._mlp_location, lambda m, r, s: edit_mlp_channels(m, r, share=s, in_names=self.mlp_in_names)
        )

    # ---------------------------------------------------------------- family hooks
    def _layer_type(self, layer: int) -> str:
        raise NotImplementedError

    def _has_mlp(self, layer: int) -> bool:
        raise NotImplementedError

    def _attn_location(self, layer: int) -> tuple[nn.Module, str]:
        raise NotImplementedError

    def _mlp_location(self, layer: int) -> tuple[nn.Module, str]:
        raise NotImplementedError

    @property
    def inner(self) -> nn.Module:
        return self.model.model

    def layers(self) -> nn.ModuleList:
        return self.inner.layers

    # ---------------------------------------------------------------- units
    def has_unit(self, kind: str, layer: int) -> bool:
        if kind in ("ssm", "ssm_heads"):
            return self._layer_type(layer) == MAMBA
        if kind == "attn_heads":
            return self._layer_type(layer) == ATTENTION
        if kind == "mlp_channels":
            return self._has_mlp(layer)
        return True

    def _mlp_size(self, layer: int) -> int:
        parent, name = self._mlp_location(layer)
        return getattr(parent, name).intermediate_size

    # ---------------------------------------------------------------- masking / removal
    def _mask_part(self, unit: Unit) -> Undo:
        if unit.kind in ("ssm", "ssm_heads"):
            return self._mask_mixer_unit(unit.kind, unit.layer, unit.indices)
        editor = self.attn_editor if unit.kind == "attn_heads" else self.mlp_editor
        return editor.mask(unit.layer, unit.indices)

    def _remove_part(self, unit: Unit) -> None:
        if unit.kind in ("ssm", "ssm_heads"):
            self._remove_mixer_unit(unit.kind, unit.layer, unit.indices)
        else:
            editor = self.attn_editor if unit.kind == "attn_heads" else self.mlp_editor
            editor.remove(unit.layer, unit.indices)

    def _set_layers(self, layers: nn.ModuleList) -> None:
        self.inner.layers = layers

    def lm_head(self) -> nn.Module:
        return self.model.lm_head
