"""Adapter for Nemotron-H (``NemotronHForCausalLM``).

Layout: ``model.{embeddings, layers[i].{norm, mixer}, norm_f}`` + ``lm_head``; each layer computes
``h + mixer(norm(h))`` with one mixer given by ``config.layers_block_type[i]``: a Mamba-2 mixer
(``linear_attention``), grouped-query attention without positional encoding (``full_attention``), a
non-gated MLP (``mlp``: up_proj -> act -> down_proj) or a mixture of experts (``moe``).

Units: ``block`` (any layer), ``ssm`` / ``ssm_heads`` (Mamba-2 layers; the gated norm is grouped per
B/C group), ``attn_heads`` (attention layers) and ``mlp_channels`` (MLP layers). Plans of whole blocks
export to a stock checkpoint (``layers_block_type`` lists the kept layers).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import SkippedLayer
from .hybrid_stack import ATTENTION, MAMBA, MLP, MOE, HybridStackAdapter
from .layerwise_inputs import layer_type_masks, position_ids_for

_TYPES = {"linear_attention": MAMBA, "full_attention": ATTENTION, "mlp": MLP, "moe": MOE}


class NemotronHAdapter(HybridStackAdapter):
    family = "nemotron_h"
    model_types = ("nemotron_h",)
    mlp_in_names = ("up_proj",)

    def _layer_type(self, layer: int) -> str:
        return _TYPES[self.config.layers_block_type[layer]]

    def _has_mlp(self, layer: int) -> bool:
        return self._layer_type(layer) == MLP

    def _mixer_location(self, layer: int) -> tuple[nn.Module, str]:
        return self.layers()[layer], "mixer"

    _attn_location = _mlp_location = _mixer_location

    def _skipped(self, index: int, original: nn.Module) -> nn.Module:
        skipped = SkippedLayer(index)
        skipped.block_type = original.block_type  # the model picks each layer's mask by block_type
        return skipped

    def _renumber(self, layer: nn.Module, new_idx: int) -> None:
        layer.layer_idx = new_idx
        layer.mixer.layer_idx = new_idx

    def _update_config_after_block_removal(self, kept: list[int]) -> None:
        # num_hidden_layers is derived from the pattern in this config.
        self.config.layers_block_type = [self.config.layers_block_type[i] for i in kept]

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, Any]:
        hidden = self.inner.embeddings(input_ids)
        position_ids = position_ids_for(hidden)
        masks = layer_type_masks(self.config, hidden, attention_mask, position_ids)
        return hidden, {"masks": masks, "position_ids": position_ids}

    def run_layer(self, index: int, hidden: torch.Tensor, ctx: Any) -> torch.Tensor:
        block_type = self.config.layers_block_type[index]
        return self.layers()[index](
            hidden, attention_mask=ctx["masks"].get(block_type), position_ids=ctx["position_ids"],
            past_key_values=None, use_cache=False,
        )

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.inner.norm_f(hidden)

    def lora_target_modules(self) -> list[str]:
        return ["in_proj", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
