"""Adapters for the pure-SSM families: Mamba-1 (``MambaForCausalLM``, ``FalconMambaForCausalLM``)
and Mamba-2 (``Mamba2ForCausalLM``).

All three share the layout ``backbone.{embeddings, layers[i].{norm, mixer}, norm_f}`` + ``lm_head``,
where a block computes ``h + mixer(norm(h))``. Units: ``block`` (the whole residual branch) and
``ssm`` (the selective scan inside the mixer, see :mod:`hf_shedder.arch.ssm_free`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn
from transformers.masking_utils import create_recurrent_attention_mask

from ..units import Unit
from .base import ArchAdapter, Undo
from .ssm_free import SSMFreeMixer


class BackboneSSMAdapter(ArchAdapter):
    """Shared code of the ``backbone``-style Mamba families."""

    unit_kinds: ClassVar[tuple[str, ...]] = ("block", "ssm")
    ssm_variant: ClassVar[str]

    @property
    def backbone(self) -> nn.Module:
        return self.model.backbone

    def layers(self) -> nn.ModuleList:
        return self.backbone.layers

    # ---------------------------------------------------------------- ssm masking / removal
    def _mixer(self, layer: int) -> nn.Module:
        return self.layers()[layer].mixer

    def _mask_part(self, unit: Unit) -> Undo:
        if unit.kind != "ssm":  # validate() already refused other kinds
            raise AssertionError(unit)
        block = self.layers()[unit.layer]
        original = block.mixer
        block.mixer = SSMFreeMixer.from_mixer(original, self.ssm_variant, share=True)

        def undo() -> None:
            block.mixer = original

        return undo

    def _remove_part(self, unit: Unit) -> None:
        block = self.layers()[unit.layer]
        block.mixer = SSMFreeMixer.from_mixer(block.mixer, self.ssm_variant, share=False)

    def _renumber(self, layer: nn.Module, new_idx: int) -> None:
        layer.layer_idx = new_idx
        layer.mixer.layer_idx = new_idx

    def _set_layers(self, layers: nn.ModuleList) -> None:
        self.backbone.layers = layers

    def _update_config_after_block_removal(self, kept: list[int]) -> None:
        self.config.num_hidden_layers = len(kept)

    # ---------------------------------------------------------------- layer-wise forward
    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, Any]:
        hidden = self.backbone.embeddings(input_ids)
        mask = create_recurrent_attention_mask(
            config=self.config, inputs_embeds=hidden, attention_mask=attention_mask, past_key_values=None
        )
        return hidden, mask

    def run_layer(self, index: int, hidden: torch.Tensor, ctx: Any) -> torch.Tensor:
        return self.layers()[index](hidden, cache_params=None, attention_mask=ctx)

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.backbone.norm_f(hidden)

    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    def lora_target_modules(self) -> list[str]:
        # in_proj/out_proj survive SSM removal; x_proj/dt_proj do not, so they are left out.
        return ["in_proj", "out_proj"]


class MambaAdapter(BackboneSSMAdapter):
    family = "mamba"
    model_types = ("mamba", "falcon_mamba")
    ssm_variant = "mamba1"


class Mamba2Adapter(BackboneSSMAdapter):
    family = "mamba2"
    model_types = ("mamba2",)
    ssm_variant = "mamba2"
