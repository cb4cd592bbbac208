"""Pieces shared by the Jamba, GraniteMoeHybrid and Falcon-H1 adapters.

All three lay their decoder out as ``model.{..., layers[i]}`` + ``lm_head`` and mix attention
(``self_attn``), Mamba (``mamba``) and MLP / MoE parts inside a layer. Here: module swaps, expert
removal (and the router mask that stands for it without copying weights), stand-ins and config types that
keep HF's hybrid cache consistent once attention is gone (Bamba, Nemotron-H and Zamba2 use those too), and
the adapter base classes
:class:`HybridAdapterMixin` and :class:`Mamba2HybridAdapter`. Query heads and MLP channels are edited
with :func:`~hf_shedder.arch.width.edit_attention_heads` / :func:`~hf_shedder.arch.width.edit_mlp_channels`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F
from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, CacheLayerMixin

from ..compat import pop_cache
from ..errors import PlanError
from ..units import Unit
from .base import ArchAdapter, Undo
from .mamba2_heads import Mamba2UnitsMixin
from .width import (
    check_attention_heads,
    edit_attention_heads,
    edit_mlp_channels,
    kept_positions,
    select_linear,
)


def swap_attr(owner: nn.Module, name: str, new: nn.Module) -> Undo:
    """Replace ``owner.name`` by ``new``; returns the closure that puts the original back."""
    original = getattr(owner, name)
    setattr(owner, name, new)

    def undo() -> None:
        setattr(owner, name, original)

    return undo


def swap_item(items: nn.ModuleList, index: int, new: nn.Module) -> Undo:
    """Replace ``items[index]`` by ``new``; returns the closure that puts the original back."""
    original = items[index]
    items[index] = new

    def undo() -> None:
        items[index] = original

    return undo


# ---------------------------------------------------------------- MoE experts
class ExpertMaskedLogits(nn.Module):
    """Wraps a MoE router so removed experts can never be chosen (logit -inf).

    A router is either a plain logit layer (Jamba up to Transformers 5.17: an ``nn.Linear``) or a top-k
    router returning ``router_logits``, ``top_k_weights`` and ``top_k_index`` (GraniteMoeHybrid; Jamba
    in newer releases), in an order that changed between releases. For a top-k router the choice is
    recomputed from the masked logits and returned in the router's own order, so it routes exactly as a
    router without those experts would. ``normalize`` says how the chosen weights are made:
    ``"all"`` = softmax over all logits, then top-k (Jamba); ``"top_k"`` = top-k, then softmax over the
    chosen logits (GraniteMoeHybrid).
    """

    def __init__(self, router: nn.Module, removed: Sequence[int], num_experts: int, normalize: str = "all") -> None:
        super().__init__()
        if normalize not in ("all", "top_k"):
            raise ValueError(f"unknown router normalisation {normalize!r}")
        self.router = router
        self.normalize = normalize
        mask = torch.zeros(num_experts, dtype=torch.bool)
        mask[list(removed)] = True
        self.register_buffer("removed_mask", mask, persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.router.weight

    def masked(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` with the removed experts' entries at -inf."""
        return logits.masked_fill(self.removed_mask.to(logits.device), float("-inf"))

    def forward(self, hidden_states: torch.Tensor) -> Any:
        out = self.router(hidden_states)
        if isinstance(out, torch.Tensor):
            return self.masked(out)
        at = top_k_router_layout(out, self.removed_mask.numel())
        logits = self.masked(out[at["logits"]])
        top_k = out[at["index"]].shape[-1]
        if self.normalize == "all":
            weights, index = F.softmax(logits, dim=-1, dtype=torch.float).topk(top_k, dim=-1)
        else:
            top_logits, index = logits.topk(top_k, dim=-1)
            weights = F.softmax(top_logits, dim=-1)
        new = list(out)
        new[at["logits"]], new[at["index"]] = logits, index
        new[at["weights"]] = weights.to(out[at["weights"]].dtype)
        return tuple(new)


def top_k_router_layout(out: Sequence[torch.Tensor], num_experts: int) -> dict[str, int]:
    """Positions of ``logits``, ``weights`` and ``index`` in a top-k router's output tuple.

    Told apart by what they are (the index is integer; the logits have one entry per expert, the weights
    one per chosen expert), as the order changed between Transformers releases.
    """
    if len(out) != 3:
        raise TypeError(f"a top-k router returns (logits, weights, index) in some order, got {len(out)} values")
    index = [i for i, t in enumerate(out) if not t.is_floating_point()]
    logits = [i for i, t in enumerate(out) if t.is_floating_point() and t.shape[-1] == num_experts]
    if len(index) != 1 or len(logits) != 1 or out[index[0]].shape[-1] >= num_experts:
        raise TypeError("cannot tell a top-k router's logits, weights and index apart")
    return {"index": index[0], "logits": logits[0], "weights": 3 - index[0] - logits[0]}


def slice_router(router: nn.Module, kept: Sequence[int]) -> nn.Module:
    """A router for the experts at positions ``kept`` only: its weight rows (and bias) sliced, physically."""
    if isinstance(router, nn.Linear):
        return select_linear(router, rows=kept, share=False)
    w = router.weight
    router.weight = nn.Parameter(w.detach()[list(kept)].clone(), requires_grad=w.requires_grad)
    if getattr(router, "bias", None) is not None:
        b = router.bias
        router.bias = nn.Parameter(b.detach()[list(kept)].clone(), requires_grad=b.requires_grad)
    if hasattr(router, "num_experts"):
        router.num_experts = len(kept)
    return router


def remove_experts(experts: nn.Module, removed: Sequence[int], size: int) -> list[int]:
    """Physically drop experts (original numbering) from an HF 3D-weight experts module.

    Returns the positions, in the module as it was, of the experts kept (to slice the router alike).
    """
    held = list(getattr(experts, "shedder_experts", range(size)))
    kept = kept_positions(held, removed)
    for name in ("gate_up_proj", "down_proj", "up_proj", "gate_up_proj_bias", "down_proj_bias", "up_proj_bias"):
        p = getattr(experts, name, None)
        if isinstance(p, nn.Parameter):
            setattr(experts, name, nn.Parameter(p.detach()[kept].clone(), requires_grad=p.requires_grad))
    experts.num_experts = len(kept)
    experts.shedder_experts = tuple(held[p] for p in kept)
    return kept


def check_experts_left(layer: int, left: int, top_k: int) -> None:
    """Raise PlanError if a MoE layer would keep fewer experts than each token is routed to."""
    if left < top_k:
        raise PlanError(
            f"layer {layer} would keep {left} experts but routes every token to "
            f"num_experts_per_tok={top_k}; at least {top_k} experts must remain"
        )


# ---------------------------------------------------------------- skipped layers that keep the cache consistent
def keep_kv_length(past_key_values: Any, layer_idx: int, hidden_states: torch.Tensor) -> None:
    """Record ``seq_len`` placeholder positions in an attention cache layer whose attention is gone.

    HF hybrid caches report the sequence length of their first attention layer; if that layer's
    attention no longer runs, this 1-channel placeholder keeps the reported length right (and so the
    masks of the attention layers that remain). Costs one scalar per token.
    """
    if past_key_values is None or layer_idx >= len(getattr(past_key_values, "layers", ())):
        return
    if not isinstance(past_key_values.layers[layer_idx], CacheLayerMixin):
        return  # a linear-attention (SSM-only) or, in newer releases, dummy (MLP / MoE) cache layer tracks no length
    b, s = hidden_states.shape[:2]
    zeros = hidden_states.new_zeros(b, 1, s, 1)
    past_key_values.update(zeros, zeros, layer_idx)


def tracks_length(layer_type: str) -> bool:
    """Whether HF's cache layer for ``layer_type`` records the sequence length (attention does; SSM,
    MLP and MoE slots do not)."""
    cls = DYNAMIC_LAYER_TYPE_MAPPING.get(layer_type)
    return cls is not None and issubclass(cls, CacheLayerMixin)


def with_length_keeper(layer_types: list[str]) -> list[str]:
    """``layer_types`` for a pruned hybrid, plus one trailing attention entry if none is left.

    HF hybrid caches take the sequence length from their first attention layer and raise when
    there is none, which breaks ``generate`` once every attention layer was pruned. The extra entry
    (past the last layer, so no layer reads it) gives the cache an attention slot; it stays empty.
    """
    if any(tracks_length(t) for t in layer_types):
        return layer_types
    return [*layer_types, "full_attention"]


class PerLayerConfigWithKeeper:
    """Config mixin: one per-layer config for the keeper slot too.

    Newer Transformers (``per_layer_config``, absent in 5.17) build a cache layer per pair of
    ``layer_types`` entry and ``per_layer_config`` entry; the latter has ``num_hidden_layers`` entries,
    so the keeper past the last layer would be dropped. The keeper's slot reads the global config.
    """

    @property
    def per_layer_config(self) -> Any:
        layers = list(super().per_layer_config)  # type: ignore[misc]
        return [*layers, *[self] * (len(getattr(self, "layer_types", None) or ()) - len(layers))]

    @per_layer_config.setter
    def per_layer_config(self, value: Any) -> None:
        super(PerLayerConfigWithKeeper, type(self)).per_layer_config.__set__(self, value)  # type: ignore[misc]


@functools.cache
def config_class_with_keeper(base: type) -> type:
    """``base`` with :class:`PerLayerConfigWithKeeper` mixed in (for configs that hold the keeper as a plain list)."""
    if issubclass(base, PerLayerConfigWithKeeper):
        return base
    cls = type(base.__name__, (PerLayerConfigWithKeeper, base), {})
    cls.__qualname__ = base.__qualname__
    return cls


@functools.cache
def _cache_types_with_keeper(base: type) -> type:
    class WithLengthKeeper(PerLayerConfigWithKeeper, base):  # type: ignore[misc, valid-type]
        # The cache reads ``layer_types``; the layer pattern (what the model indexes per layer) stays as it is.
        attribute_map = {k: v for k, v in base.attribute_map.items() if k != "layer_types"}

        @property
        def layer_types(self) -> list[str] | None:
            pattern = self.layers_block_type
            return None if pattern is None else with_length_keeper(list(pattern))

        @layer_types.setter
        def layer_types(self, value: list[str] | None) -> None:  # the base class's own __post_init__ sets it
            self.layers_block_type = value

    WithLengthKeeper.__name__ = WithLengthKeeper.__qualname__ = base.__name__
    return WithLengthKeeper


def keep_cache_length(config: Any) -> None:
    """Apply :func:`with_length_keeper` to a config whose ``layer_types`` is an alias of its layer pattern
    ``layers_block_type`` (Bamba, Nemotron-H, Zamba2).

    Appending to the pattern itself would add a layer (Nemotron-H derives ``num_hidden_layers`` from it;
    Bamba derives the pattern), so the config gets a class whose ``layer_types`` is the pattern plus the
    keeper. Only for pruned models that have no attention left; such configs are not exported as plain
    checkpoints (:func:`refuse_plain_export_without_attention`).
    """
    if with_length_keeper(list(config.layers_block_type)) != list(config.layers_block_type):
        config.__class__ = _cache_types_with_keeper(type(config))


def refuse_plain_export_without_attention(layer_types: list[str], model: nn.Module) -> None:
    """Raise PlanError when a pruned hybrid has no layer left whose cache tracks the sequence length."""
    if with_length_keeper(list(layer_types)) != list(layer_types):
        raise PlanError(
            "this plan removes every attention layer; Transformers cannot generate with a cache from a "
            f"{type(model).__name__} that has no attention layer, so no plain checkpoint is written. "
            "Save without export= (or export='remote_code') instead"
        )


class SkippedAttentionLayer(nn.Module):
    """Stands in for a masked attention decoder layer: identity on the residual stream; keeps cache length."""

    def __init__(self, layer_idx: int, returns_tuple: bool = False) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.returns_tuple = returns_tuple

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        keep_kv_length(pop_cache(kwargs), self.layer_idx, hidden_states)
        return (hidden_states,) if self.returns_tuple else hidden_states


# ---------------------------------------------------------------- shared adapter behaviour
class HybridAdapterMixin(ArchAdapter):
    """Layout, width-unit bookkeeping and attention / MLP edits common to the Jamba-like hybrid adapters.

    A subclass says which layers hold attention (``is_attention``), how many experts a MoE layer has
    (``num_experts``) and which config field holds the MLP width (``mlp_size_field``).
    """

    # Indices one search candidate removes: whole KV groups for heads; MLP channels in this many slices.
    mlp_channel_slices: ClassVar[int] = 8
    mlp_size_field: ClassVar[str] = "intermediate_size"
    # Whether decoder layers return a tuple (the stand-in for a masked layer must too).
    layer_returns_tuple: ClassVar[bool] = False

    @property
    def decoder(self) -> nn.Module:
        return self.model.model

    def layers(self) -> nn.ModuleList:
        return self.decoder.layers

    def _set_layers(self, layers: nn.ModuleList) -> None:
        self.decoder.layers = layers

    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    # ---------------------------------------------------------------- structure
    def is_attention(self, layer: int) -> bool:
        raise NotImplementedError

    def num_experts(self, layer: int) -> int:
        raise NotImplementedError

    def num_heads(self) -> int:
        return self.config.num_attention_heads

    def num_kv_heads(self) -> int:
        return self.config.num_key_value_heads or self.config.num_attention_heads

    def mlp_size(self) -> int:
        return getattr(self.config, self.mlp_size_field)

    def width_size(self, kind: str, layer: int) -> int:
        if not self.has_unit(kind, layer):
            return 0
        if kind == "attn_heads":
            return self.num_heads()
        if kind == "mlp_channels":
            return self.mlp_size()
        if kind == "experts":
            return self.num_experts(layer)
        return super().width_size(kind, layer)

    def width_group(self, kind: str) -> int:
        if kind == "attn_heads":
            return self.num_heads() // self.num_kv_heads()
        if kind == "mlp_channels":
            return max(1, self.mlp_size() // self.mlp_channel_slices)
        return 1

    def _check_width(self, unit: Unit, already_removed: set[int]) -> None:
        if unit.kind == "attn_heads":
            check_attention_heads(set(already_removed) | set(unit.indices), self.num_heads(), self.num_kv_heads())
        elif unit.kind == "experts":
            left = self.width_size("experts", unit.layer) - len(already_removed) - len(unit.indices)
            check_experts_left(unit.layer, left, self.config.num_experts_per_tok)

    # ---------------------------------------------------------------- masking / physical removal
    def _skipped(self, index: int, original: nn.Module) -> nn.Module:
        if self.is_attention(index):
            return SkippedAttentionLayer(index, self.layer_returns_tuple)
        return super()._skipped(index, original)

    def _edit(self, unit: Unit, *, share: bool) -> tuple[nn.Module, str, nn.Module]:
        """``(owner, attribute, replacement)`` for a unit: masking (``share=True``) swaps it in reversibly,
        physical removal (``share=False``) for good, so both run the same edit."""
        layer = self.layer(unit.layer)
        if unit.kind == "attn_heads":
            return layer, "self_attn", edit_attention_heads(layer.self_attn, unit.indices, share=share)
        if unit.kind == "mlp_channels":
            return layer, "feed_forward", edit_mlp_channels(layer.feed_forward, unit.indices, share=share)
        raise AssertionError(unit)

    def _mask_part(self, unit: Unit) -> Undo:
        return swap_attr(*self._edit(unit, share=True))

    def _remove_part(self, unit: Unit) -> None:
        owner, name, new = self._edit(unit, share=False)
        setattr(owner, name, new)

    def _renumber(self, layer: nn.Module, new_idx: int) -> None:
        for name in ("mamba", "self_attn"):
            sub = getattr(layer, name, None)
            if sub is not None:
                sub.layer_idx = new_idx


class Mamba2HybridAdapter(Mamba2UnitsMixin, HybridAdapterMixin):
    """:class:`HybridAdapterMixin` whose Mamba layers hold a Mamba-2 mixer (``layer.mamba``): adds the
    ``ssm`` / ``ssm_heads`` units of :mod:`hf_shedder.arch.mamba2_heads`."""

    def _mixer_location(self, layer: int) -> tuple[nn.Module, str]:
        return self.layer(layer), "mamba"

    def width_size(self, kind: str, layer: int) -> int:
        if kind == "ssm_heads" and self.has_unit(kind, layer):
            return self._ssm_heads_size(layer)
        return super().width_size(kind, layer)

    def width_group(self, kind: str) -> int:
        if kind == "ssm_heads":
            return Mamba2UnitsMixin.width_group(self, kind)
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

    # ssm and ssm_heads both go through the Mamba-2 editor, so they combine on one layer in any order.
    def _mask_part(self, unit: Unit) -> Undo:
        if unit.kind in ("ssm", "ssm_heads"):
            return self._mask_mixer_unit(unit.kind, unit.layer, unit.indices)
        return super()._mask_part(unit)

    def _remove_part(self, unit: Unit) -> None:
        if unit.kind in ("ssm", "ssm_heads"):
            self._remove_mixer_unit(unit.kind, unit.layer, unit.indices)
        else:
            super()._remove_part(unit)


__all__ = [
    "ExpertMaskedLogits", "HybridAdapterMixin", "Mamba2HybridAdapter", "PerLayerConfigWithKeeper", "SkippedAttentionLayer",
    "check_experts_left", "config_class_with_keeper", "keep_cache_length", "keep_kv_length",
    "refuse_plain_export_without_attention", "remove_experts", "slice_router", "swap_attr", "swap_item",
    "top_k_router_layout", "tracks_length", "with_length_keeper",
]
