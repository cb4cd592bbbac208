"""Adapter for ``JambaForCausalLM`` (AI21 Jamba): Mamba-1 mixers, attention layers and MoE layers.

Layout: ``model.{embed_tokens, layers[i], final_layernorm}`` + ``lm_head``. Layer ``i`` is
``JambaMambaDecoderLayer`` (``mamba``) or ``JambaAttentionDecoderLayer`` (``self_attn``), both with
``feed_forward`` = ``JambaMLP`` (dense) or ``JambaSparseMoeBlock`` (``router`` + ``experts``).

Units: ``block`` (a whole decoder layer), ``ssm`` (the scan inside a Mamba mixer, as Mamba-Shedder
defines it), ``attn_heads`` (query heads of an attention layer; KV-group structure kept valid),
``mlp_channels`` (intermediate channels of a dense MLP) and ``experts`` (experts of a MoE layer).

The first half of this module holds the pieces the other hybrid adapters (GraniteMoeHybrid,
Falcon-H1) share: head / channel / expert removal, and the search-time masks that stand for them
without copying weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.masking_utils import create_causal_mask, create_recurrent_attention_mask

from ..errors import PlanError
from ..units import Plan, Unit
from .base import ArchAdapter, Undo
from .ssm_free import SSMFreeMixer
from .width import (
    check_attention_heads,
    kept_positions,
    prune_attention_heads,
    prune_mlp_channels,
    select_linear,
)

# ====================================================================== shared hybrid pieces


def swap_attr(owner: nn.Module, name: str, new: nn.Module) -> Undo:
    """Replace ``owner.name`` by ``new``; returns the closure that puts the original back."""
    original = getattr(owner, name)
    setattr(owner, name, new)

    def undo() -> None:
        setattr(owner, name, original)

    return undo


# ---------------------------------------------------------------- attention heads / MLP channels
def edit_attention_heads(attn: nn.Module, removed: Sequence[int], num_heads: int, *, share: bool) -> nn.Module:
    """Clone of an HF attention module without the query heads ``removed`` (original numbering).

    Works on an already pruned (or masked) module too: it remembers the original heads it holds in
    ``shedder_heads``. KV heads left without queries go as well (see :mod:`hf_shedder.arch.width`).
    """
    held = list(getattr(attn, "shedder_heads", range(num_heads)))
    kept = kept_positions(held, removed)
    new = prune_attention_heads(attn, kept, len(held), len(held) // attn.num_key_value_groups, share=share)
    new.shedder_heads = tuple(held[p] for p in kept)
    return new


def edit_mlp_channels(mlp: nn.Module, removed: Sequence[int], size: int, *, share: bool,
                      in_names: Sequence[str] = ("gate_proj", "up_proj"), out_name: str = "down_proj") -> nn.Module:
    """Clone of a gated MLP without the hidden channels ``removed`` (original numbering)."""
    held = list(getattr(mlp, "shedder_channels", range(size)))
    kept = kept_positions(held, removed)
    new = prune_mlp_channels(mlp, kept, share=share, in_names=in_names, out_name=out_name)
    new.shedder_channels = tuple(held[p] for p in kept)
    return new


# ---------------------------------------------------------------- MoE experts
class ExpertMaskedLogits(nn.Module):
    """Wraps a router's logit computation so removed experts can never be chosen (logit -inf).

    Both Jamba (softmax over all logits, then top-k) and GraniteMoeHybrid (top-k, then softmax over
    the chosen logits) then route exactly as a router without those experts would.
    """

    def __init__(self, router: nn.Module, removed: Sequence[int], num_experts: int) -> None:
        super().__init__()
        self.router = router
        mask = torch.zeros(num_experts, dtype=torch.bool)
        mask[list(removed)] = True
        self.register_buffer("removed_mask", mask, persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.router.weight

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = self.router(hidden_states)
        return logits.masked_fill(self.removed_mask.to(logits.device), float("-inf"))


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


# ---------------------------------------------------------------- skipped layers that keep the cache consistent
def keep_kv_length(past_key_values: Any, layer_idx: int, hidden_states: torch.Tensor) -> None:
    """Record ``seq_len`` placeholder positions in an attention cache layer whose attention is gone.

    HF hybrid caches report the sequence length of their first attention layer; if that layer's
    attention no longer runs, this 1-channel placeholder keeps the reported length right (and so the
    masks of the attention layers that remain). Costs one scalar per token.
    """
    if past_key_values is None or layer_idx >= len(getattr(past_key_values, "layers", ())):
        return
    if not hasattr(past_key_values.layers[layer_idx], "keys"):
        return  # a linear-attention (SSM-only) cache layer tracks no length
    b, s = hidden_states.shape[:2]
    zeros = hidden_states.new_zeros(b, 1, s, 1)
    past_key_values.update(zeros, zeros, layer_idx)


def with_length_keeper(layer_types: list[str]) -> list[str]:
    """``layer_types`` for a pruned hybrid, plus one trailing attention entry if none is left.

    HF hybrid caches take the sequence length from their first attention layer and raise when
    there is none, which breaks ``generate`` once every attention layer was pruned. The extra entry
    (past the last layer, so no layer reads it) gives the cache an attention slot; it stays empty.
    """
    if any(t != "linear_attention" for t in layer_types):
        return layer_types
    return [*layer_types, "full_attention"]


class SkippedAttentionLayer(nn.Module):
    """Stands in for a masked attention decoder layer: identity on the residual stream; keeps cache length."""

    def __init__(self, layer_idx: int, returns_tuple: bool = False) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.returns_tuple = returns_tuple

    def forward(self, hidden_states: torch.Tensor, *args: Any, past_key_values: Any = None, **kwargs: Any) -> Any:
        keep_kv_length(past_key_values, self.layer_idx, hidden_states)
        return (hidden_states,) if self.returns_tuple else hidden_states


# ---------------------------------------------------------------- shared adapter behaviour
class HybridAdapterMixin(ArchAdapter):
    """Width-unit bookkeeping common to the hybrid adapters of this module family."""

    # Indices one search candidate removes: whole KV groups for heads; MLP channels in this many slices.
    mlp_channel_slices: ClassVar[int] = 8

    def width_group(self, kind: str) -> int:
        if kind == "attn_heads":
            return self.num_heads() // self.num_kv_heads()
        if kind == "mlp_channels":
            return max(1, self.config.intermediate_size // self.mlp_channel_slices)
        return 1

    def num_heads(self) -> int:
        return self.config.num_attention_heads

    def num_kv_heads(self) -> int:
        return self.config.num_key_value_heads or self.config.num_attention_heads

    def _check_width(self, unit: Unit, already_removed: set[int]) -> None:
        if unit.kind == "attn_heads":
            check_attention_heads(set(already_removed) | set(unit.indices), self.num_heads(), self.num_kv_heads())
        elif unit.kind == "experts":
            left = self.width_size("experts", unit.layer) - len(already_removed) - len(unit.indices)
            top_k = self.config.num_experts_per_tok
            if left < top_k:
                raise PlanError(
                    f"layer {unit.layer} would keep {left} experts but routes every token to "
                    f"num_experts_per_tok={top_k}; at least {top_k} experts must remain"
                )


def fit_period(flags: Sequence[bool]) -> tuple[int, int] | None:
    """(period, offset) with ``flags[i] == (i % period == offset)`` for every i, or None."""
    n = len(flags)
    for period in range(1, n + 2):
        for offset in range(period):
            if all((i % period == offset) == bool(f) for i, f in enumerate(flags)):
                return period, offset
    return None


# ====================================================================== Jamba


def _explicit_layout_class(base: type) -> type:
    """A subclass of a Jamba config whose layer layout is an explicit list (any pruned pattern)."""

    class ExplicitLayout(base):  # type: ignore[misc, valid-type]
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

    @property
    def decoder(self) -> nn.Module:
        return self.model.model

    def layers(self) -> nn.ModuleList:
        return self.decoder.layers

    # ---------------------------------------------------------------- structure
    def is_attention(self, layer: int) -> bool:
        return self._block_types[layer] == "attention"

    def is_moe(self, layer: int) -> bool:
        return self._num_experts[layer] > 1

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

    def width_size(self, kind: str, layer: int) -> int:
        if not self.has_unit(kind, layer):
            return 0
        if kind == "attn_heads":
            return self.num_heads()
        if kind == "mlp_channels":
            return self.config.intermediate_size
        if kind == "experts":
            return self._num_experts[layer]
        return super().width_size(kind, layer)

    # ---------------------------------------------------------------- masking
    def _mask_unit(self, unit: Unit) -> Undo:
        if unit.kind == "block" and self.is_attention(unit.layer):
            layers, i = self.layers(), unit.layer
            original = layers[i]
            layers[i] = SkippedAttentionLayer(i)

            def undo() -> None:
                layers[i] = original

            return undo
        return super()._mask_unit(unit)

    def _mask_part(self, unit: Unit) -> Undo:
        layer = self.layers()[unit.layer]
        if unit.kind == "ssm":
            return swap_attr(layer, "mamba", self._ssm_free(layer.mamba, share=True))
        if unit.kind == "attn_heads":
            return swap_attr(layer, "self_attn",
                             edit_attention_heads(layer.self_attn, unit.indices, self.num_heads(), share=True))
        if unit.kind == "mlp_channels":
            return swap_attr(layer, "feed_forward", edit_mlp_channels(
                layer.feed_forward, unit.indices, self.config.intermediate_size, share=True))
        if unit.kind == "experts":
            moe = layer.feed_forward
            return swap_attr(moe, "router", ExpertMaskedLogits(moe.router, unit.indices, moe.num_experts))
        raise AssertionError(unit)

    @staticmethod
    def _ssm_free(mixer: nn.Module, share: bool) -> SSMFreeMixer:
        new = SSMFreeMixer.from_mixer(mixer, "mamba1", share=share)
        new.act = ACT2FN["silu"]  # Jamba gates the scan output with SiLU whatever hidden_act is
        return new

    # ---------------------------------------------------------------- physical removal
    def _remove_part(self, unit: Unit) -> None:
        layer = self.layers()[unit.layer]
        if unit.kind == "ssm":
            layer.mamba = self._ssm_free(layer.mamba, share=False)
        elif unit.kind == "attn_heads":
            layer.self_attn = edit_attention_heads(layer.self_attn, unit.indices, self.num_heads(), share=False)
        elif unit.kind == "mlp_channels":
            layer.feed_forward = edit_mlp_channels(layer.feed_forward, unit.indices, self.config.intermediate_size,
                                                   share=False)
        elif unit.kind == "experts":
            moe = layer.feed_forward
            pos = remove_experts(moe.experts, unit.indices, self._num_experts[unit.layer])
            moe.router = select_linear(moe.router, rows=pos, share=False)
            moe.num_experts = len(pos)
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
        if "attention" not in self._block_types:
            raise PlanError(
                "this plan removes every attention layer; Transformers cannot generate with a cache from a "
                f"{type(self.model).__name__} that has no attention layer, so no plain checkpoint is written. "
                "Save without export= (or export='remote_code') instead"
            )
        # Otherwise a plain Jamba config expresses the layout iff it is still periodic.
        return not getattr(self.config, "_shedder_explicit_layout", False)

    # ---------------------------------------------------------------- layer-wise forward
    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, Any]:
        hidden = self.decoder.embed_tokens(input_ids)
        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        kw = {"config": self.config, "inputs_embeds": hidden, "attention_mask": attention_mask,
              "past_key_values": None, "position_ids": position_ids}
        masks = {"full_attention": create_causal_mask(**kw), "linear_attention": create_recurrent_attention_mask(**kw)}
        return hidden, (masks, position_ids)

    def run_layer(self, index: int, hidden: torch.Tensor, ctx: Any) -> torch.Tensor:
        masks, position_ids = ctx
        kind = "full_attention" if self.is_attention(index) else "linear_attention"
        return self.layers()[index](hidden, attention_mask=masks[kind], position_ids=position_ids,
                                    past_key_values=None)

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder.final_layernorm(hidden)

    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    def lora_target_modules(self) -> list[str]:
        # Expert weights are 3D parameters (no nn.Linear), so LoRA adapts the dense parts only.
        return ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "out_proj", "gate_proj", "up_proj", "down_proj"]


__all__ = [
    "ExpertMaskedLogits", "HybridAdapterMixin", "JambaAdapter", "SkippedAttentionLayer", "edit_attention_heads",
    "edit_mlp_channels", "fit_period", "keep_kv_length", "remove_experts", "swap_attr", "with_length_keeper",
]
