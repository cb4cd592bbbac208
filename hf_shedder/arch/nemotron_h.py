"""Adapter for Nemotron-H (``NemotronHForCausalLM``).

Layout: ``model.{embeddings, layers[i].{norm, mixer}, norm_f}`` + ``lm_head``; each layer computes
``h + mixer(norm(h))`` with one mixer given by ``config.layers_block_type[i]``: a Mamba-2 mixer
(``linear_attention``), grouped-query attention without positional encoding (``full_attention``), a
non-gated MLP (``mlp``: up_proj -> act -> down_proj) or a mixture of experts (``moe``).

Units: ``block`` (any layer), ``ssm`` / ``ssm_heads`` (Mamba-2 layers; the gated norm is grouped per
B/C group), ``attn_heads`` (attention layers), ``mlp_channels`` (MLP layers) and ``experts`` (routed
experts of MoE layers; the shared experts stay). Plans of whole blocks, and of experts when every kept MoE
layer keeps the same number, export to a stock checkpoint (``layers_block_type`` lists the kept layers,
``n_routed_experts`` the experts per layer).

The MoE router (``mixer.gate``) scores experts with a sigmoid, adds ``e_score_correction_bias`` for the
choice only, splits the experts into ``n_group`` groups of consecutive ids, keeps the ``topk_group`` groups
whose two best experts score highest, and routes each token to the ``num_experts_per_tok`` best experts
of those groups. Removed experts therefore cannot simply get logit -inf (the sigmoid maps it to 0 and the
bias is added after); their correction bias becomes -inf instead, so they never win a group's top two nor
the final top-k, while the weights of the chosen experts still come from the unbiased scores. That is what
a router without them computes as long as every group keeps the same number (>= 2) of experts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import PlanError
from ..units import Plan, Unit
from .base import SkippedLayer, Undo
from .hybrid_parts import (
    check_experts_left,
    keep_cache_length,
    refuse_plain_export_without_attention,
    remove_experts,
    swap_attr,
)
from .hybrid_stack import ATTENTION, MAMBA, MLP, MOE, HybridStackAdapter
from .layerwise_inputs import layer_type_masks, position_ids_for
from .mamba2_heads import ssm_head_candidates
from .width import removed_per_group, shallow_clone

_TYPES = {"linear_attention": MAMBA, "full_attention": ATTENTION, "mlp": MLP, "moe": MOE}


def masked_router(router: nn.Module, removed: Sequence[int]) -> nn.Module:
    """Search-time stand-in for a ``NemotronHTopkRouter`` that never picks experts ``removed`` (ids as
    held by ``router``): a clone sharing the router weight whose correction bias is -inf for them."""
    new = shallow_clone(router)
    mask = torch.zeros_like(router.e_score_correction_bias, dtype=torch.bool)
    mask[list(removed)] = True
    new.e_score_correction_bias = router.e_score_correction_bias.masked_fill(mask, float("-inf"))
    return new


def check_expert_groups(layer: int, removed: set[int], num_experts: int, n_group: int, topk_group: int,
                        top_k: int) -> None:
    """Raise PlanError unless a grouped top-k router without experts ``removed`` is still well formed."""
    check_experts_left(layer, num_experts - len(removed), top_k)
    per = num_experts // n_group
    counts = removed_per_group(removed, num_experts, n_group)
    if len(set(counts)) > 1:
        raise PlanError(
            f"layer {layer}'s router splits its experts into n_group={n_group} groups of {per} consecutive ids, "
            f"and every group must keep the same number of experts; this removes {dict(enumerate(counts))} "
            f"experts per group. Remove the same number of experts from each group (e.g. experts "
            f"{[g * per for g in range(n_group)]} together)"
        )
    left = per - counts[0]
    if left < 2:
        raise PlanError(
            f"layer {layer}'s router ranks each of its n_group={n_group} groups by its two best experts, so every "
            f"group must keep at least 2 experts, but this leaves {left} per group; remove fewer experts "
            f"(at most {per - 2} per group) or remove the 'block' unit of that layer instead"
        )
    if topk_group * left < top_k:
        need = -(-top_k // topk_group)
        raise PlanError(
            f"layer {layer}'s router picks num_experts_per_tok={top_k} experts from its topk_group={topk_group} "
            f"best groups, but groups of {left} experts offer only {topk_group * left}; keep at least {need} "
            f"experts per group (remove at most {per - need} per group)"
        )


class NemotronHAdapter(HybridStackAdapter):
    family = "nemotron_h"
    model_types = ("nemotron_h",)
    mlp_in_names = ("up_proj",)
    unit_kinds = ("block", "ssm", "ssm_heads", "attn_heads", "mlp_channels", "experts")
    width_kinds = frozenset({"ssm_heads", "attn_heads", "mlp_channels", "experts"})

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        # Plans number experts as in the unpruned model; apply_plan may lower the config's count.
        self._num_experts = self.config.n_routed_experts

    def _layer_type(self, layer: int) -> str:
        return _TYPES[self.config.layers_block_type[layer]]

    def _has_mlp(self, layer: int) -> bool:
        return self._layer_type(layer) == MLP

    def _mixer_location(self, layer: int) -> tuple[nn.Module, str]:
        return self.layer(layer), "mixer"

    _attn_location = _mlp_location = _mixer_location

    # ---------------------------------------------------------------- experts
    def has_unit(self, kind: str, layer: int) -> bool:
        if kind == "experts":
            return self._layer_type(layer) == MOE
        return super().has_unit(kind, layer)

    def width_size(self, kind: str, layer: int) -> int:
        if kind == "experts":
            return self._num_experts
        return super().width_size(kind, layer)

    def width_candidates(self, kind: str, layer: int) -> list[tuple[int, ...]]:
        if kind == "experts":  # the expert at the same position of every router group
            return ssm_head_candidates(self._num_experts, self.config.n_group, self.width_group(kind))
        return super().width_candidates(kind, layer)

    def _check_width(self, unit: Unit, already_removed: set[int]) -> None:
        if unit.kind == "experts":
            cfg = self.config
            check_expert_groups(unit.layer, already_removed | set(unit.indices), self._num_experts, cfg.n_group,
                                cfg.topk_group, cfg.num_experts_per_tok)
        else:
            super()._check_width(unit, already_removed)

    def _mask_part(self, unit: Unit) -> Undo:
        if unit.kind == "experts":
            moe = self.layer(unit.layer).mixer
            return swap_attr(moe, "gate", masked_router(moe.gate, unit.indices))
        return super()._mask_part(unit)

    def _remove_part(self, unit: Unit) -> None:
        if unit.kind != "experts":
            super()._remove_part(unit)
            return
        moe = self.layer(unit.layer).mixer
        gate = moe.gate
        kept = remove_experts(moe.experts, unit.indices, self._num_experts)  # router rows follow the experts
        gate.weight = nn.Parameter(gate.weight.detach()[kept].clone(), requires_grad=gate.weight.requires_grad)
        gate.e_score_correction_bias = gate.e_score_correction_bias[kept].clone()
        gate.num_experts = len(kept)

    def _moe_expert_counts(self) -> set[int]:
        return {layer.mixer.experts.num_experts for layer in self.layers() if layer.block_type == "moe"}

    def apply_plan(self, plan: Plan) -> nn.Module:
        model = super().apply_plan(plan)
        counts = self._moe_expert_counts()
        if len(counts) == 1:  # the stock config can say how many experts every MoE layer has
            self.config.n_routed_experts = counts.pop()
        return model

    def block_only_export_supported(self, plan: Plan) -> bool:
        if not plan.kinds() <= {"block", "experts"}:
            return False
        refuse_plain_export_without_attention(self.config.layers_block_type, self.model)
        counts = self._moe_expert_counts()
        return len(counts) <= 1 and counts <= {self.config.n_routed_experts}

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
        keep_cache_length(self.config)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, Any]:
        hidden = self.inner.embeddings(input_ids)
        position_ids = position_ids_for(hidden)
        masks = layer_type_masks(self.config, hidden, attention_mask, position_ids)
        return hidden, {"masks": masks, "position_ids": position_ids}

    def run_layer(self, index: int, hidden: torch.Tensor, ctx: Any) -> torch.Tensor:
        block_type = self.config.layers_block_type[index]
        return self.layers()[index](
            hidden, attention_mask=ctx["masks"].get(block_type), position_ids=ctx["position_ids"],
            use_cache=False,
        )

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.inner.norm_f(hidden)

    def lora_target_modules(self) -> list[str]:
        return ["in_proj", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
