"""Adapters for the pure-SSM families: Mamba-1 (``MambaForCausalLM``, ``FalconMambaForCausalLM``)
and Mamba-2 (``Mamba2ForCausalLM``).

All three share the layout ``backbone.{embeddings, layers[i].{norm, mixer}, norm_f}`` + ``lm_head``,
where a block computes ``h + mixer(norm(h))``. Units: ``block`` (the whole residual branch) and
``ssm`` (the selective scan inside the mixer, see :mod:`hf_shedder.arch.ssm_free`); Mamba-2 also has
``ssm_heads`` (SSD heads inside the mixer, see :mod:`hf_shedder.arch.mamba2_heads`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn
from transformers.masking_utils import create_recurrent_attention_mask

from ..units import Unit
from .base import ArchAdapter, Undo
from .mamba2_heads import Mamba2UnitsMixin
from .ssm_free import SSMFreeMixer


class BackboneSSMAdapter(ArchAdapter):
    """Shared code of the ``backbone``-style Mamba families."""

    unit_kinds: ClassVar[tuple[str, ...]] = ("block", "ssm")
    ssm_variant: ClassVar[str]
    recurrent_cache_only = True

    @property
    def backbone(self) -> nn.Module:
        return self.model.backbone

    def layers(self) -> nn.ModuleList:
        return self.backbone.layers

    # ---------------------------------------------------------------- ssm masking / removal
    def _mixer(self, layer: int) -> nn.Module:
        return self.layer(layer).mixer

    def _mask_part(self, unit: Unit) -> Undo:
        if unit.kind != "ssm":  # validate() already refused other kinds
            raise AssertionError(unit)
        block = self.layer(unit.layer)
        original = block.mixer
        block.mixer = SSMFreeMixer.from_mixer(original, self.ssm_variant, share=True)

        def undo() -> None:
            block.mixer = original

        return undo

    def _remove_part(self, unit: Unit) -> None:
        block = self.layer(unit.layer)
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
        mask = create_recurrent_attention_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask)
        return hidden, mask

    def run_layer(self, index: int, hidden: torch.Tensor, ctx: Any) -> torch.Tensor:
        return self.layers()[index](hidden, attention_mask=ctx)

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.backbone.norm_f(hidden)

    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    def lora_target_modules(self) -> list[str]:
        # in_proj survives every unit kind and is called as a module even on the fused training path.
        # out_proj (and x_proj/dt_proj) are read by weight inside mamba-ssm's fused kernels, where a LoRA
        # wrapper would silently never train; PEFT refuses them on mamba/mamba2 for that reason.
        return ["in_proj"]


class MambaAdapter(BackboneSSMAdapter):
    family = "mamba"
    model_types = ("mamba", "falcon_mamba")
    ssm_variant = "mamba1"


class Mamba2Adapter(Mamba2UnitsMixin, BackboneSSMAdapter):
    family = "mamba2"
    model_types = ("mamba2",)
    ssm_variant = "mamba2"
    unit_kinds = ("block", "ssm", "ssm_heads")
    width_kinds = frozenset({"ssm_heads"})

    def _mixer_location(self, layer: int) -> tuple[nn.Module, str]:
        return self.layer(layer), "mixer"

    def width_size(self, kind: str, layer: int) -> int:
        if kind == "ssm_heads":
            return self._ssm_heads_size(layer)
        return super().width_size(kind, layer)

    def width_candidates(self, kind: str, layer: int) -> list[tuple[int, ...]]:
        return self._ssm_heads_candidates(layer)

    def _check_width(self, unit: Unit, already_removed: set[int]) -> None:
        self._check_ssm_heads(unit.layer, already_removed | set(unit.indices))

    # ssm and ssm_heads both go through the Mamba-2 editor, so they combine on one layer in any order.
    def _mask_part(self, unit: Unit) -> Undo:
        return self._mask_mixer_unit(unit.kind, unit.layer, unit.indices)

    def _remove_part(self, unit: Unit) -> None:
        self._remove_mixer_unit(unit.kind, unit.layer, unit.indices)
