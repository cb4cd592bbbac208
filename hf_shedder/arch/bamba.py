"""Adapter for Bamba (``BambaForCausalLM``).

Layout: ``model.{embed_tokens, layers[i], final_layernorm, rotary_emb}`` + ``lm_head``. Each layer is
``h + mixer(input_layernorm(h))`` then ``h + feed_forward(pre_ff_layernorm(h))``, where the mixer is a
Mamba-2 mixer (``layer.mamba``) or grouped-query attention with RoPE (``layer.self_attn``, layers in
``config.attn_layer_indices``), and the feed-forward a gated MLP (gate/up/down_proj).

Units: ``block`` (a whole layer), ``ssm`` / ``ssm_heads`` (Mamba-2 layers; the gated norm spans the
whole inner width), ``attn_heads`` (attention layers), ``mlp_channels`` (every layer). Plans of whole
blocks export to a stock checkpoint (``attn_layer_indices`` renumbered) unless no attention layer is left.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..units import Plan
from .hybrid_parts import keep_cache_length, refuse_plain_export_without_attention
from .hybrid_stack import ATTENTION, MAMBA, HybridStackAdapter, SkippedTupleLayer
from .layerwise_inputs import layer_type_masks, position_ids_for


class BambaAdapter(HybridStackAdapter):
    family = "bamba"
    model_types = ("bamba",)
    mlp_in_names = ("gate_proj", "up_proj")

    def _layer_type(self, layer: int) -> str:
        return ATTENTION if self.config.layers_block_type[layer] == "full_attention" else MAMBA

    def _has_mlp(self, layer: int) -> bool:
        return True

    def _mixer_location(self, layer: int) -> tuple[nn.Module, str]:
        return self.layer(layer), "mamba"

    def _attn_location(self, layer: int) -> tuple[nn.Module, str]:
        return self.layer(layer), "self_attn"

    def _mlp_location(self, layer: int) -> tuple[nn.Module, str]:
        return self.layer(layer), "feed_forward"

    def _skipped(self, index: int, original: nn.Module) -> nn.Module:
        return SkippedTupleLayer(index)  # Bamba layers return (hidden_states, attn_weights)

    def _renumber(self, layer: nn.Module, new_idx: int) -> None:
        mixer = layer.mamba if layer.block_type == "linear_attention" else layer.self_attn
        mixer.layer_idx = new_idx

    def _update_config_after_block_removal(self, kept: list[int]) -> None:
        types = self.config.layers_block_type  # derived from attn_layer_indices
        self.config.attn_layer_indices = [new for new, old in enumerate(kept) if types[old] == "full_attention"]
        self.config.num_hidden_layers = len(kept)
        keep_cache_length(self.config)

    def block_only_export_supported(self, plan: Plan) -> bool:
        if not super().block_only_export_supported(plan):
            return False
        refuse_plain_export_without_attention(self.config.layers_block_type, self.model)
        return True

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, Any]:
        hidden = self.inner.embed_tokens(input_ids)
        position_ids = position_ids_for(hidden)
        masks = layer_type_masks(self.config, hidden, attention_mask, position_ids)
        rope = self.inner.rotary_emb(hidden, position_ids=position_ids)
        return hidden, {"masks": masks, "position_ids": position_ids, "rope": rope}

    def run_layer(self, index: int, hidden: torch.Tensor, ctx: Any) -> torch.Tensor:
        block_type = self.config.layers_block_type[index]
        out, _ = self.layers()[index](
            hidden, attention_mask=ctx["masks"][block_type], position_ids=ctx["position_ids"],
            use_cache=False, position_embeddings=ctx["rope"],
        )
        return out

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.inner.final_layernorm(hidden)

    def lora_target_modules(self) -> list[str]:
        return ["in_proj", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
