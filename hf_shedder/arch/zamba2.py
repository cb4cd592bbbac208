"""Adapter for Zamba2 (``Zamba2ForCausalLM``), the hybrid of the Mamba-Shedder paper.

Layout: ``model.{embed_tokens, layers[i], final_layernorm}`` + ``lm_head``. A layer is either a Mamba
decoder (``input_layernorm`` + ``mamba`` mixer + residual) or a hybrid layer: a *use* of a shared
attention+MLP block (``shared_transformer``, weights tied across the uses of the same block, with
per-use LoRA-style adapters selected by the use's position) whose output, after a per-layer ``linear``,
is added to the input of the layer's own Mamba decoder (``mamba_decoder``).

Units:

* ``block``: a whole layer (for a hybrid layer: its Mamba decoder and its use of the shared block; the
  shared block only feeds that Mamba decoder, so nothing of it survives).
* ``ssm`` / ``ssm_heads``: the selective scan / SSD heads of a layer's Mamba-2 mixer.
* ``hybrid``: one use of the shared block; the layer becomes a plain Mamba layer.
* ``attn_heads`` / ``mlp_channels``: heads / hidden channels of a *shared* block, anchored at the first
  layer that uses it; all uses (and their adapters: q/k/v adapter output rows, gate_up adapter rows)
  are pruned consistently, and the unit outlives the removal of its anchor layer.

Plans of ``block``/``hybrid`` units (and ``mlp_channels`` that leave every shared block the same width)
map onto a stock Zamba2 config when every kept use keeps its shared block (use ``k`` uses block
``k % num_mem_blocks``) and one use is left at least; those export to a plain checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers.models.zamba2.modeling_zamba2 import Zamba2HybridLayer

from ..errors import PlanError
from ..units import Plan, Unit
from .base import ArchAdapter, Undo
from .hybrid_parts import keep_cache_length, refuse_plain_export_without_attention
from .hybrid_stack import WidthUnitsMixin
from .layerwise_inputs import layer_type_masks, position_ids_for
from .stacked_masks import StackedMasks
from .width import (
    attention_head_plan,
    edit_attention_heads,
    head_channels,
    held_heads,
    kept_positions,
    select_linear,
    shallow_clone,
)

_SHARED_ATTR = {"attn_heads": "self_attn", "mlp_channels": "feed_forward"}


def _select_adapters(adapters: nn.ModuleList, rows: Sequence[int], share: bool) -> nn.ModuleList:
    """Per-use adapters (Sequential(down, up) or Identity): keep output ``rows`` of each ``up``."""
    out = []
    for a in adapters:
        if isinstance(a, nn.Sequential):
            out.append(nn.Sequential(a[0], select_linear(a[1], rows=rows, share=share)))
        else:
            out.append(a)
    return nn.ModuleList(out)


def prune_zamba2_attention(attn: nn.Module, removed: set[int], *, share: bool) -> nn.Module:
    """Shared Zamba2 attention without the query heads ``removed`` (original indices), adapters included."""
    new = edit_attention_heads(attn, removed, share=share)
    if hasattr(attn, "linear_q_adapter_list"):
        # The per-use adapters add to the q/k/v projections: they keep the rows of the heads kept.
        hd = attn.head_dim
        kept = kept_positions(held_heads(attn), removed)
        kv, _ = attention_head_plan(kept, attn.q_proj.out_features // hd, attn.k_proj.out_features // hd)
        q_rows, kv_rows = head_channels(kept, hd), head_channels(kv, hd)
        new.linear_q_adapter_list = _select_adapters(attn.linear_q_adapter_list, q_rows, share)
        new.linear_k_adapter_list = _select_adapters(attn.linear_k_adapter_list, kv_rows, share)
        new.linear_v_adapter_list = _select_adapters(attn.linear_v_adapter_list, kv_rows, share)
    return new


def prune_zamba2_mlp(mlp: nn.Module, removed: set[int], *, share: bool) -> nn.Module:
    """Shared Zamba2 MLP (fused gate_up_proj) without hidden channels ``removed`` (original indices)."""
    size = mlp.intermediate_size
    held = getattr(mlp, "shedder_channels", tuple(range(size)))
    kept = kept_positions(held, removed)
    rows = kept + [size + c for c in kept]
    new = shallow_clone(mlp)
    new.gate_up_proj = select_linear(mlp.gate_up_proj, rows=rows, share=share)
    new.down_proj = select_linear(mlp.down_proj, cols=kept, share=share)
    new.gate_up_proj_adapter_list = _select_adapters(mlp.gate_up_proj_adapter_list, rows, share)
    new.intermediate_size = len(kept)
    new.shedder_channels = tuple(held[k] for k in kept)
    return new


class Zamba2Adapter(WidthUnitsMixin, ArchAdapter):
    family = "zamba2"
    model_types = ("zamba2",)
    unit_kinds = ("block", "ssm", "ssm_heads", "hybrid", "attn_heads", "mlp_channels")
    width_kinds = frozenset({"ssm_heads", "attn_heads", "mlp_channels"})
    shared_kinds = frozenset({"attn_heads", "mlp_channels"})

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self._derive_structure()
        self._shared_masks = StackedMasks()  # keyed by (kind, anchor layer)

    def _derive_structure(self) -> None:
        """Index the layers: Mamba decoder of each layer, hybrid layers, shared blocks and their uses."""
        layers = self.layers()
        self._mamba_layers = [layer.mamba_decoder if self._is_hybrid(layer) else layer for layer in layers]
        self._hybrid_layers = {i: layer for i, layer in enumerate(layers) if self._is_hybrid(layer)}
        # Shared blocks, anchored at their first use. Transformers ties the uses of one block only when
        # tie_word_embeddings is set; otherwise every use owns its weights (a block of its own).
        self._blocks: dict[int, list[int]] = {}
        anchors: dict[int, int] = {}
        for i, layer in self._hybrid_layers.items():
            anchor = anchors.setdefault(self._block_key(i, layer), i)
            self._blocks.setdefault(anchor, []).append(i)
        for use, layer in enumerate(self._hybrid_layers.values()):
            layer.shedder_use = use  # position of this use in the per-use adapter lists

    def _block_key(self, index: int, layer: nn.Module) -> int:
        if getattr(self.config, "tie_word_embeddings", False):
            return layer.shared_transformer.block_id
        return -1 - index

    @staticmethod
    def _is_hybrid(layer: nn.Module) -> bool:
        return isinstance(layer, Zamba2HybridLayer)

    @property
    def inner(self) -> nn.Module:
        return self.model.model

    def layers(self) -> nn.ModuleList:
        return self.inner.layers

    def _mixer_location(self, layer: int) -> tuple[nn.Module, str]:
        return self._mamba_layers[layer], "mamba"

    # ---------------------------------------------------------------- units
    def has_unit(self, kind: str, layer: int) -> bool:
        if kind == "hybrid":
            return layer in self._hybrid_layers
        if kind in self.shared_kinds:
            return layer in self._blocks
        return True

    def _mlp_size(self, layer: int) -> int:
        return self.config.intermediate_size

    def whole_kind_for(self, width_kind: str) -> str:
        return "hybrid" if width_kind in self.shared_kinds else "block"

    def _check_unit(self, unit: Unit, state: dict[str, Any]) -> None:
        super()._check_unit(unit, state)
        if unit.kind in self.shared_kinds:
            live = [i for i in self._blocks[unit.layer]
                    if i not in state["blocks"] and ("hybrid", i) not in state["parts"]]
            if not live:
                raise PlanError(
                    f"every use of the shared block anchored at layer {unit.layer} (layers "
                    f"{self._blocks[unit.layer]}) was already removed; its {unit.kind} no longer matter"
                )

    # ---------------------------------------------------------------- reference plan files
    def plan_from_reference(self, data: dict[str, Any]) -> Plan:
        """Files of the reference's Zamba2 scripts (prune.py, prune_hybrid.py). Loaded where our units mean
        what the reference's do: ``pruned_ssm_idx`` and ``pruned_mamba_block_idx`` at Mamba-only layers.
        Its per-use units (``pruned_mha_idx``, ``pruned_mlp_idx``, narrowed ``pruned_mlp_channels``) and
        ``mamba_block`` at a shared-block position (which keeps the shared transformer's output) have no
        hf_shedder unit yet: refused, never read with another meaning."""
        known = ("pruned_mamba_block_idx", "pruned_ssm_idx", "pruned_mha_idx", "pruned_mlp_idx", "pruned_mlp_channels")
        unknown = [k for k in data if k not in known]
        if unknown or not data:
            raise PlanError(f"not a Mamba-Shedder Zamba2 plan file: unknown keys {unknown}; known: {list(known)}")
        full = self.config.intermediate_size
        narrowed = {k: v for k, v in (data.get("pruned_mlp_channels") or {}).items() if v != full}
        per_use = {k: data[k] for k in ("pruned_mha_idx", "pruned_mlp_idx") if data.get(k)}
        hybrid_blocks = [i for i in data.get("pruned_mamba_block_idx") or [] if i in self._hybrid_layers]
        if per_use or narrowed or hybrid_blocks:
            raise PlanError(
                "this Zamba2 plan uses the reference's per-use units, which hf_shedder cannot express yet: "
                + "; ".join(
                    [f"{k}={v} (uses of the shared block)" for k, v in per_use.items()]
                    + ([f"pruned_mlp_channels narrows uses {sorted(narrowed)}"] if narrowed else [])
                    + ([f"pruned_mamba_block_idx {hybrid_blocks} are shared-block positions (the reference keeps the "
                        "shared transformer's output there)"] if hybrid_blocks else [])
                )
            )
        keep = {k: v for k, v in data.items() if k in ("pruned_ssm_idx", "pruned_mamba_block_idx") and v}
        if not keep:
            return self.empty_plan()
        # SSMs first: the reference's masks are flags, and a block may not precede an SSM of its layer here
        ordered = dict(sorted(keep.items(), key=lambda kv: kv[0] != "pruned_ssm_idx"))
        plan = Plan.from_dict(ordered, self.family, self.num_layers(), self.reference_keys)
        self.validate(plan)
        return plan

    # ---------------------------------------------------------------- masking
    def _mask_part(self, unit: Unit) -> Undo:
        if unit.kind in ("ssm", "ssm_heads"):
            return self._mask_mixer_unit(unit.kind, unit.layer, unit.indices)
        if unit.kind == "hybrid":
            layers, i = self.layers(), unit.layer
            original = layers[i]
            layers[i] = self._hybrid_layers[i].mamba_decoder

            def undo() -> None:
                layers[i] = original

            return undo
        return self._mask_shared(unit)

    def _prune_shared(self, kind: str, module: nn.Module, removed: set[int], share: bool) -> nn.Module:
        if kind == "attn_heads":
            return prune_zamba2_attention(module, removed, share=share)
        return prune_zamba2_mlp(module, removed, share=share)

    def _mask_shared(self, unit: Unit) -> Undo:
        # Every use of the block gets its own pruned view of the (tied) shared module.
        attr = _SHARED_ATTR[unit.kind]
        slots = [(self._hybrid_layers[i].shared_transformer, attr) for i in self._blocks[unit.layer]]
        return self._shared_masks.mask(
            (unit.kind, unit.layer), slots, lambda removed: (removed or frozenset()) | frozenset(unit.indices),
            lambda original, removed: self._prune_shared(unit.kind, original, set(removed), share=True),
        )

    # ---------------------------------------------------------------- physical removal
    def _remove_part(self, unit: Unit) -> None:
        if unit.kind in ("ssm", "ssm_heads"):
            self._remove_mixer_unit(unit.kind, unit.layer, unit.indices)
        elif unit.kind == "hybrid":
            self.layers()[unit.layer] = self._hybrid_layers[unit.layer].mamba_decoder
        else:
            attr = _SHARED_ATTR[unit.kind]
            layers = self.layers()
            uses = [layers[i].shared_transformer for i in self._blocks[unit.layer] if self._is_hybrid(layers[i])]
            if not uses:
                return
            # One pruned module, used by every use of the block (their weights were tied anyway).
            pruned = self._prune_shared(unit.kind, getattr(uses[0], attr), set(unit.indices), share=False)
            for st in uses:
                setattr(st, attr, pruned)

    def apply_plan(self, plan: Plan) -> nn.Module:
        super().apply_plan(plan)
        self._sync_structure()
        return self.model

    def _renumber(self, layer: nn.Module, new_idx: int) -> None:
        mamba_layer = layer.mamba_decoder if self._is_hybrid(layer) else layer
        mamba_layer.layer_idx = new_idx
        mamba_layer.mamba.layer_idx = new_idx

    def _set_layers(self, layers: nn.ModuleList) -> None:
        self.inner.layers = layers

    def _update_config_after_block_removal(self, kept: list[int]) -> None:
        pass  # _sync_structure derives the whole config from the pruned layers

    def _sync_structure(self) -> None:
        """Make config, per-use adapter indexing and weight tying follow the (pruned) layer list."""
        layers = self.layers()
        types = ["hybrid" if self._is_hybrid(layer) else "linear_attention" for layer in layers]
        hybrid_ids = [i for i, t in enumerate(types) if t == "hybrid"]
        self.config.layers_block_type = types
        self.config.num_hidden_layers = len(types)
        self.config.hybrid_layer_ids = hybrid_ids
        keep_cache_length(self.config)
        self.inner.layers_block_type = types
        uses = [layers[i] for i in hybrid_ids]
        old_use = [layer.shedder_use for layer in uses]
        layer_dic = {pos: k for k, pos in enumerate(hybrid_ids)}
        seen: set[int] = set()
        for layer in uses:
            for module in (layer.shared_transformer.self_attn, layer.shared_transformer.feed_forward):
                if id(module) in seen:
                    continue
                seen.add(id(module))
                for name in ("linear_q_adapter_list", "linear_k_adapter_list", "linear_v_adapter_list",
                             "gate_up_proj_adapter_list"):
                    if hasattr(module, name):
                        old = getattr(module, name)
                        setattr(module, name, nn.ModuleList([old[k] for k in old_use]))
                module.layer_dic = dict(layer_dic)
                module.num_fwd_mem_blocks = len(uses)
                if hasattr(module, "layer_block_map"):
                    module.layer_block_map = list(hybrid_ids)
        for k, layer in enumerate(uses):
            layer.shedder_use = k
        widths = {layer.shared_transformer.feed_forward.intermediate_size for layer in uses}
        if len(widths) == 1:
            self.config.intermediate_size = widths.pop()
        self._retie(hybrid_ids)
        self._derive_structure()

    def _retie(self, hybrid_ids: list[int]) -> None:
        layers = self.layers()
        tied: dict[str, str] = {}
        anchors: dict[int, int] = {}
        for i in hybrid_ids:
            anchor = anchors.setdefault(self._block_key(i, layers[i]), i)
            if anchor != i:
                tied[f"layers.{i}.shared_transformer"] = f"layers.{anchor}.shared_transformer"
        self.inner._tied_weights_keys = tied
        self.inner.all_tied_weights_keys = self.inner.get_expanded_tied_weights_keys(all_submodels=False)
        top = self.model.get_expanded_tied_weights_keys(all_submodels=False)
        top.update({f"model.{k}": f"model.{v}" for k, v in self.inner.all_tied_weights_keys.items()})
        self.model.all_tied_weights_keys = top

    def block_only_export_supported(self, plan: Plan) -> bool:
        """Stock Zamba2 can express the result: no SSM/head changes, every kept use keeps its shared block,
        and all shared MLPs have the same width. Called on the pruned model."""
        if not plan.kinds() <= {"block", "hybrid", "mlp_channels"}:
            return False
        refuse_plain_export_without_attention(self.config.layers_block_type, self.model)
        uses = [layer for layer in self.layers() if self._is_hybrid(layer)]
        n_blocks = self.config.num_mem_blocks
        if any(layer.shared_transformer.block_id != k % n_blocks for k, layer in enumerate(uses)):
            return False
        widths = {layer.shared_transformer.feed_forward.intermediate_size for layer in uses}
        return len(widths) <= 1

    # ---------------------------------------------------------------- layer-wise forward
    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, Any]:
        hidden = self.inner.embed_tokens(input_ids)
        position_ids = position_ids_for(hidden)
        masks = layer_type_masks(self.config, hidden, attention_mask, position_ids)
        ctx = {
            "original": hidden.clone(),
            "full": masks["full_attention"],
            "linear": masks["linear_attention"],
            "position_ids": position_ids,
            "rope": self.inner.rotary_emb(hidden, position_ids=position_ids) if self.config.use_mem_rope else None,
        }
        return hidden, ctx

    def run_layer(self, index: int, hidden: torch.Tensor, ctx: Any) -> torch.Tensor:
        return self.layers()[index](
            hidden, ctx["original"], index, ctx["linear"], ctx["full"], use_cache=False,
            position_embeddings=ctx["rope"], position_ids=ctx["position_ids"],
        )

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.inner.final_layernorm(hidden)

    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    def lora_target_modules(self) -> list[str]:
        return ["in_proj", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]
