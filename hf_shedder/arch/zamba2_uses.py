"""Zamba2 per-use modules: one use of a shared block as the Mamba-Shedder reference runs it.

The reference (hybrid/Zamba2-Pruning) first gives every use of the shared attention+MLP block its own
copy, then masks a use's attention (``mha``) or MLP (``mlp``), narrows its MLP to a prefix of channels
(``pruned_mlp_channels``), or skips a layer's Mamba decoder (``mamba_block``) while keeping the shared
transformer's output that the decoder would have added to its input. These modules express that on
Transformers' Zamba2 layers: ``Zamba2UseBlock`` replaces a use's ``shared_transformer`` (a view of the
tied weights while searching, an untied copy once extracted), ``Zamba2MambaSkipped`` replaces a hybrid
layer's ``mamba_decoder``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..compat import CACHE_KWARG, pop_cache

_ADAPTER_LISTS = ("linear_q_adapter_list", "linear_k_adapter_list", "linear_v_adapter_list")


class Zamba2UseBlock(nn.Module):
    """A use of the shared block without the parts that are gone (``None``).

    Computes what the reference's patched ``Zamba2AttentionDecoderLayer`` computes: with the attention
    masked, the MLP reads ``pre_ff_layernorm`` of the layer input (no concatenation with the embeddings);
    with the MLP masked, the attention output is the block output; with both masked, the input is.
    """

    def __init__(self, input_layernorm: nn.Module | None, self_attn: nn.Module | None,
                 pre_ff_layernorm: nn.Module | None, feed_forward: nn.Module | None, block_id: int | None) -> None:
        super().__init__()
        self.input_layernorm = input_layernorm
        self.self_attn = self_attn
        self.pre_ff_layernorm = pre_ff_layernorm
        self.feed_forward = feed_forward
        self.block_id = block_id

    def forward(self, hidden_states: torch.Tensor, original_hidden_states: torch.Tensor | None = None,
                layer_idx: int | None = None, attention_mask: torch.Tensor | None = None,
                position_embeddings: Any = None, **kwargs: Any) -> torch.Tensor:
        # The cache arrives as ``cache`` or ``past_key_values`` by release; hand it on under the installed name.
        cache = pop_cache(kwargs)
        if self.self_attn is not None:
            hidden_states = torch.concatenate([hidden_states, original_hidden_states], dim=-1)
            hidden_states = self.input_layernorm(hidden_states)
            hidden_states, _ = self.self_attn(
                hidden_states=hidden_states, layer_idx=layer_idx, attention_mask=attention_mask,
                position_embeddings=position_embeddings, **{CACHE_KWARG: cache}, **kwargs,
            )
        if self.feed_forward is not None:
            hidden_states = self.pre_ff_layernorm(hidden_states)
            hidden_states = self.feed_forward(hidden_states, layer_idx)
        return hidden_states


class Zamba2MambaSkipped(nn.Module):
    """A hybrid layer's Mamba decoder, skipped as the reference's ``mamba_block`` mask does: the layer
    input plus the shared transformer's output (``prune_hybrid.py`` patch: the addition comes before the
    mask test), no Mamba mixer and no second residual."""

    def __init__(self, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor, transformer_hidden_states: torch.Tensor | None = None,
                **kwargs: Any) -> torch.Tensor:
        if transformer_hidden_states is None:
            return hidden_states
        return hidden_states + transformer_hidden_states


def use_parts(block: nn.Module, drop_attn: bool, drop_mlp: bool, mlp: nn.Module | None,
              own: bool, slot: int) -> Zamba2UseBlock:
    """A ``Zamba2UseBlock`` from a (shared) block: views of its modules, or, with ``own``, copies.

    ``mlp`` is the MLP to use, prepared by the caller (the block's, a narrowed view, an own copy). A copy keeps only this use's adapters
    (``slot``): the others belong to other uses and would be dead weight in it.
    """
    def take(module: nn.Module | None) -> nn.Module | None:
        if module is None or not own:
            return module
        return _only_slot(copy.deepcopy(module), slot)

    return Zamba2UseBlock(
        None if drop_attn else take(block.input_layernorm),
        None if drop_attn else take(block.self_attn),
        None if drop_mlp else take(block.pre_ff_layernorm),
        None if drop_mlp else mlp,
        getattr(block, "block_id", None),
    )


def _only_slot(module: nn.Module, slot: int) -> nn.Module:
    for name in (*_ADAPTER_LISTS, "gate_up_proj_adapter_list"):
        adapters = getattr(module, name, None)
        if adapters is not None:
            setattr(module, name, nn.ModuleList(
                [a if k == slot else nn.Identity() for k, a in enumerate(adapters)]))
    return module


def own_copy_of_mlp(mlp: nn.Module, slot: int) -> nn.Module:
    """An untied copy of a (shared) Zamba2 MLP with only this use's adapter."""
    return _only_slot(copy.deepcopy(mlp), slot)


def count_unique_parameters(modules: list[nn.Module]) -> int:
    """Parameters held by ``modules``, each tensor counted once."""
    seen: dict[int, int] = {}
    for m in modules:
        for p in m.parameters():
            seen[id(p)] = p.numel()
    return sum(seen.values())


def untie_message(model: nn.Module) -> str | None:
    """What extraction did to the tied shared blocks (set by the Zamba2 adapter's ``apply_plan``), or None."""
    info = getattr(getattr(model, "model", model), "shedder_untied", None) or getattr(model, "shedder_untied", None)
    if not info:
        return None
    added = info["copy_params"] - info["freed_shared_params"]
    return (f"untied {info['uses']} use(s) of the shared blocks into their own copies: {info['copy_params']:,} "
            f"parameters in the copies, {info['freed_shared_params']:,} of shared blocks no use reads any more; "
            f"net {added:+,} parameters")


__all__ = ["Zamba2MambaSkipped", "Zamba2UseBlock", "count_unique_parameters", "own_copy_of_mlp", "untie_message",
           "use_parts"]
