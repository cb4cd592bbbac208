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

The reference's units (hybrid/Zamba2-Pruning, names kept), with its meaning:

* ``mamba_block``: a layer's Mamba decoder. At a Mamba-only layer the same as ``block``; at a hybrid
  layer the layer keeps its use of the shared block: its output is the input plus the shared
  transformer's output (the reference adds ``transformer_hidden_states`` before its mask test).
* ``mha`` / ``mlp``: the attention / the MLP of one *use* of a shared block (by layer; the reference
  numbers uses 0..n-1). ``mlp_width``: the MLP hidden channels of one use, always a prefix kept (its
  ``pruned_mlp_channels``); a search step removes the last ``width_group`` channels still there.
  A use such units touch gets its own copy of the shared block once extracted (the reference copies every
  use beforehand); the copy keeps that use's adapter, which adds the same as the reference's merged LoRA.
  They do not mix with ``attn_heads`` / ``mlp_channels`` (per shared block) in one plan.

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
from ..units import Plan, Unit, as_units
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
from .zamba2_uses import (
    Zamba2MambaSkipped,
    Zamba2UseBlock,
    count_unique_parameters,
    own_copy_of_mlp,
    use_parts,
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
    unit_kinds = ("block", "ssm", "ssm_heads", "hybrid", "attn_heads", "mlp_channels",
                  "mamba_block", "mha", "mlp", "mlp_width")
    width_kinds = frozenset({"ssm_heads", "attn_heads", "mlp_channels", "mlp_width"})
    shared_kinds = frozenset({"attn_heads", "mlp_channels"})
    use_kinds = frozenset({"mha", "mlp", "mlp_width"})  # one use of a shared block (the reference's units)
    reference_target_names = {"block": "mamba_block", "mamba_block": "mamba_block", "ssm": "ssm", "mha": "mha",
                              "mlp": "mlp", "mlp_width": "mlp_width"}
    reference_log_target_key = "pruning_target"
    REFERENCE_KEYS = ("pruned_mamba_block_idx", "pruned_mha_idx", "pruned_mlp_idx", "pruned_mlp_channels",
                      "pruned_ssm_idx")
    # The reference's --mlp_channel_group_size is 1024 of Zamba2-2.7B's 10240 channels: a tenth by default.
    mlp_width_steps = 10

    def extraction_note(self) -> str | None:
        # Per-use units give the touched uses their own (untied) copies of the shared block.
        from .zamba2_uses import untie_message

        return untie_message(self.model)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self._derive_structure()
        self._shared_masks = StackedMasks()  # keyed by (kind, anchor layer)
        self._use_masks = StackedMasks()  # keyed by the use's layer
        self._search_base: list[Unit] = []

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
        self._uses = sorted(self._hybrid_layers)  # the reference's use numbers -> layers

    def _block_key(self, index: int, layer: nn.Module) -> int:
        if isinstance(layer.shared_transformer, Zamba2UseBlock):
            return -1 - index  # an untied copy of its own
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
        if kind == "hybrid" or kind in self.use_kinds:
            return layer in self._hybrid_layers
        if kind in self.shared_kinds:
            return layer in self._blocks
        return True

    def _mlp_size(self, layer: int) -> int:
        return self.config.intermediate_size

    def whole_kind_for(self, width_kind: str) -> str:
        if width_kind == "mlp_width":
            return "mlp"
        return "hybrid" if width_kind in self.shared_kinds else "block"

    def width_size(self, kind: str, layer: int) -> int:
        if kind == "mlp_width":
            return self.config.intermediate_size
        return super().width_size(kind, layer)

    def width_group(self, kind: str) -> int:
        if kind == "mlp_width":
            default = max(1, self.config.intermediate_size // self.mlp_width_steps)
            return int(self.width_groups.get(kind, default))
        return super().width_group(kind)

    def width_candidates(self, kind: str, layer: int) -> list[tuple[int, ...]]:
        if kind == "mlp_width":  # the first prefix step; later ones depend on the plan: see candidates()
            size, group = self.config.intermediate_size, self.width_group(kind)
            return [tuple(range(size - group, size))] if size > group else []
        return super().width_candidates(kind, layer)

    def configure_search(self, options: dict[str, Any]) -> None:
        """``mlp_width_group``: channels per ``mlp_width`` step (the reference's --mlp_channel_group_size);
        ``base_plan``: units (dicts) every plan of the search starts from (a stage of the staged search)."""
        if "mlp_width_group" in options:
            self.width_groups = {**self.width_groups, "mlp_width": int(options["mlp_width_group"])}
        self._search_base = as_units(options.get("base_plan") or [])
        if self._search_base:
            self.validate(self.empty_plan())

    def empty_plan(self) -> Plan:
        return Plan(list(self._search_base), self.family, self.num_layers())

    def candidates(self, plan: Plan, kinds: Sequence[str] | None = None) -> list[Unit]:
        out = [u for u in super().candidates(plan, kinds) if u.kind != "mlp_width"]
        if kinds and "mlp_width" in kinds:
            # The reference's width step: each use whose MLP is still there loses its last channels.
            state = self._walk(plan)
            group, size = self.width_group("mlp_width"), self.config.intermediate_size
            for i in self._uses:
                width = size - len(state["width"].get(("mlp_width", i), ()))
                if width - group <= 0:
                    continue
                unit = Unit("mlp_width", i, tuple(range(width - group, width)))
                try:
                    self._check_unit(unit, state)
                except PlanError:
                    continue
                out.append(unit)
        if kinds:
            order = {k: n for n, k in enumerate(kinds)}
            if set(kinds) <= {"mamba_block", "mha", "mlp", "mlp_width", "ssm"}:
                # kind after kind, as the reference's loops (the first of equal scores wins)
                out.sort(key=lambda u: order[u.kind])
            else:
                out.sort(key=lambda u: (u.layer, order[u.kind]))  # all_units' order
        return out

    def _record(self, unit: Unit, state: dict[str, Any]) -> None:
        if unit.kind == "mamba_block" and unit.layer not in self._hybrid_layers:
            state["blocks"].add(unit.layer)  # a Mamba-only layer: nothing of it is left
        super()._record(unit, state)

    def _check_unit(self, unit: Unit, state: dict[str, Any]) -> None:
        super()._check_unit(unit, state)
        self._check_reference_unit(unit, state)
        if unit.kind in self.shared_kinds:
            live = [i for i in self._blocks[unit.layer]
                    if i not in state["blocks"] and ("hybrid", i) not in state["parts"]]
            if not live:
                raise PlanError(
                    f"every use of the shared block anchored at layer {unit.layer} (layers "
                    f"{self._blocks[unit.layer]}) was already removed; its {unit.kind} no longer matter"
                )

    def _check_reference_unit(self, unit: Unit, state: dict[str, Any]) -> None:
        kind, i, parts = unit.kind, unit.layer, state["parts"]
        touched = {k for k, _ in [*parts, *state["width"]]}
        if (kind in self.use_kinds and touched & self.shared_kinds) or (kind in self.shared_kinds and touched & self.use_kinds):
            raise PlanError("per-use units (mha, mlp, mlp_width) and per-shared-block units (attn_heads, "
                            "mlp_channels) cannot be mixed in one plan")
        if (kind in self.use_kinds or kind == "mamba_block") and ("hybrid", i) in parts:
            raise PlanError(f"the use of the shared block at layer {i} was already removed (hybrid)")
        if kind == "hybrid" and ("mamba_block", i) in parts:
            raise PlanError(f"layer {i} lost its Mamba decoder (mamba_block); remove the whole layer with 'block'")
        if kind in ("ssm", "ssm_heads") and ("mamba_block", i) in parts:
            raise PlanError(f"the Mamba decoder of layer {i} was already removed (mamba_block)")
        if kind == "mlp_width":
            if ("mlp", i) in parts:
                raise PlanError(f"the MLP of the use at layer {i} was already removed (mlp)")
            size = self.config.intermediate_size
            gone = state["width"].get(("mlp_width", i), set()) | set(unit.indices)
            if gone != set(range(size - len(gone), size)):
                raise PlanError(f"mlp_width keeps a prefix of the channels, as the reference's pruned_mlp_channels: "
                                f"remove the last ones (layer {i} would lose {sorted(gone)})")

    # ---------------------------------------------------------------- reference plan files
    def plan_from_reference(self, data: dict[str, Any]) -> Plan:
        """Final and per-step files of the reference's Zamba2 scripts (prune.py, prune_hybrid.py), every key
        in its meaning: ``pruned_mamba_block_idx`` / ``pruned_ssm_idx`` by layer, ``pruned_mha_idx`` /
        ``pruned_mlp_idx`` by use (0..n-1, in layer order), ``pruned_mlp_channels`` the kept prefix width per
        use (JSON string keys)."""
        unknown = [k for k in data if k not in self.REFERENCE_KEYS]
        if unknown or not data:
            raise PlanError(f"not a Mamba-Shedder Zamba2 plan file: unknown keys {unknown}; "
                            f"known: {list(self.REFERENCE_KEYS)}")

        def listed(key: str) -> list[int]:
            values = data.get(key) or []
            if not isinstance(values, list) or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
                raise PlanError(f"{key} must be a list of integers, got {values!r}")
            return values

        def use_layer(key: str, use: int) -> int:
            if not 0 <= use < len(self._uses):
                raise PlanError(f"{key}: use {use} is out of range: the shared blocks of this model have "
                                f"{len(self._uses)} uses (layers {self._uses})")
            return self._uses[use]

        full = self.config.intermediate_size
        widths = data.get("pruned_mlp_channels") or {}
        if not isinstance(widths, dict):
            raise PlanError(f"pruned_mlp_channels must map uses to kept widths, got {widths!r}")
        narrowed = []
        for key, width in widths.items():
            try:
                use = int(key)
            except (TypeError, ValueError):
                raise PlanError(f"pruned_mlp_channels: {key!r} is not a use number") from None
            if isinstance(width, bool) or not isinstance(width, int) or not 0 < width <= full:
                raise PlanError(f"pruned_mlp_channels[{key}] must be a width in 1..{full}, got {width!r}")
            if width < full:
                narrowed.append(Unit("mlp_width", use_layer("pruned_mlp_channels", use), tuple(range(width, full))))
        # The reference's masks are flags: any valid order means the same. SSMs before the blocks holding
        # them, a use's width before its whole MLP.
        units = [Unit("ssm", i) for i in listed("pruned_ssm_idx")]
        units += [Unit("mamba_block", i) for i in listed("pruned_mamba_block_idx")]
        units += [Unit("mha", use_layer("pruned_mha_idx", u)) for u in listed("pruned_mha_idx")]
        units += sorted(narrowed, key=lambda u: u.layer)
        units += [Unit("mlp", use_layer("pruned_mlp_idx", u)) for u in listed("pruned_mlp_idx")]
        plan = Plan(units, self.family, self.num_layers())
        self.validate(plan)
        return plan

    def reference_step_file(self, plan: Plan) -> dict[str, Any]:
        """The five keys the reference writes at every step (prune_hybrid.py), in the order units were chosen."""
        full = self.config.intermediate_size
        use_of = {layer: k for k, layer in enumerate(self._uses)}
        out: dict[str, Any] = {"pruned_mamba_block_idx": [], "pruned_mha_idx": [], "pruned_mlp_idx": [],
                               "pruned_mlp_channels": {str(k): full for k in range(len(self._uses))},
                               "pruned_ssm_idx": []}
        for u in plan:
            if u.kind == "mamba_block" or (u.kind == "block" and u.layer not in self._hybrid_layers):
                out["pruned_mamba_block_idx"].append(u.layer)
            elif u.kind in ("mha", "mlp"):
                out[f"pruned_{u.kind}_idx"].append(use_of[u.layer])
            elif u.kind == "ssm":
                out["pruned_ssm_idx"].append(u.layer)
            elif u.kind == "mlp_width":
                out["pruned_mlp_channels"][str(use_of[u.layer])] -= len(u.indices)
            else:
                raise PlanError(f"unit {u} has no place in the reference's Zamba2 file (its units: mamba_block, "
                                "mha, mlp, mlp_width, ssm)")
        return out

    # ---------------------------------------------------------------- masking
    def _mask_unit(self, unit: Unit) -> Undo:
        if unit.kind == "mamba_block" and unit.layer not in self._hybrid_layers:
            return super()._mask_unit(Unit("block", unit.layer))  # the same thing at a Mamba-only layer
        return super()._mask_unit(unit)

    def _mask_part(self, unit: Unit) -> Undo:
        if unit.kind == "mamba_block":
            layer = self._hybrid_layers[unit.layer]
            original = layer.mamba_decoder
            layer.mamba_decoder = Zamba2MambaSkipped(unit.layer)

            def undo_decoder() -> None:
                layer.mamba_decoder = original

            return undo_decoder
        if unit.kind in self.use_kinds:
            return self._mask_use(unit)
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

    def _mask_use(self, unit: Unit) -> Undo:
        # A view of the use: the tied modules themselves, the MLP narrowed through index views.
        layer = self._hybrid_layers[unit.layer]

        def combine(state: tuple[bool, bool, frozenset[int]] | None) -> tuple[bool, bool, frozenset[int]]:
            attn, mlp, removed = state or (False, False, frozenset())
            if unit.kind == "mlp_width":
                return attn, mlp, removed | frozenset(unit.indices)
            return attn or unit.kind == "mha", mlp or unit.kind == "mlp", removed

        def build(original: nn.Module, state: tuple[bool, bool, frozenset[int]]) -> nn.Module:
            attn, mlp, removed = state
            ff = original.feed_forward
            if removed and not mlp:
                ff = prune_zamba2_mlp(ff, set(removed), share=True)
            return use_parts(original, attn, mlp, ff, own=False, slot=layer.shedder_use)

        return self._use_masks.mask(unit.layer, [(layer, "shared_transformer")], combine, build)

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
    def _remove_use(self, unit: Unit) -> None:
        layer = self.layers()[unit.layer]
        if not self._is_hybrid(layer):
            return  # the use went with its layer (hybrid)
        st = layer.shared_transformer
        if not isinstance(st, Zamba2UseBlock):  # the first unit of this use: it gets its own copy
            slot = layer.shedder_use
            st = use_parts(st, False, False, own_copy_of_mlp(st.feed_forward, slot), own=True, slot=slot)
            layer.shared_transformer = st
        if unit.kind == "mha":
            st.self_attn, st.input_layernorm = None, None
        elif unit.kind == "mlp":
            st.feed_forward, st.pre_ff_layernorm = None, None
        elif st.feed_forward is not None:
            st.feed_forward = prune_zamba2_mlp(st.feed_forward, set(unit.indices), share=False)

    def _remove_part(self, unit: Unit) -> None:
        if unit.kind == "mamba_block":
            self.layers()[unit.layer].mamba_decoder = Zamba2MambaSkipped(unit.layer)
        elif unit.kind in self.use_kinds:
            self._remove_use(unit)
        elif unit.kind in ("ssm", "ssm_heads"):
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
        self.clear_mask()
        self.validate(plan)
        shared = self._shared_parameters_left_unread(plan)
        # ``mamba_block`` at a Mamba-only layer is ``block`` there: the layer goes.
        as_blocks = [Unit("block", u.layer) if u.kind == "mamba_block" and u.layer not in self._hybrid_layers else u
                     for u in plan]
        super().apply_plan(Plan(as_blocks, plan.family, plan.num_layers))
        copies = [layer.shared_transformer for layer in self.layers()
                  if self._is_hybrid(layer) and isinstance(layer.shared_transformer, Zamba2UseBlock)]
        self.model.shedder_untied = {  # read by the commands (untie_message); not saved
            "uses": len(copies), "copy_params": count_unique_parameters(copies), "freed_shared_params": shared,
        } if copies else None
        self._sync_structure()
        return self.model

    def _shared_parameters_left_unread(self, plan: Plan) -> int:
        """Parameters of shared blocks that no use reads as a tied block any more once ``plan`` is applied
        (every use removed or given its own copy)."""
        gone = {u.layer for u in plan if u.kind in ("block", "hybrid")}
        touched = {u.layer for u in plan if u.kind in self.use_kinds}
        if not touched:
            return 0
        freed = 0
        for uses in self._blocks.values():
            if all(i in gone or i in touched for i in uses):
                freed += count_unique_parameters([self._hybrid_layers[uses[0]].shared_transformer])
        return freed

    def _renumber(self, layer: nn.Module, new_idx: int) -> None:
        mamba_layer = layer.mamba_decoder if self._is_hybrid(layer) else layer
        mamba_layer.layer_idx = new_idx
        if hasattr(mamba_layer, "mamba"):  # not a skipped decoder (mamba_block)
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
                if module is None or id(module) in seen:
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
        widths = {layer.shared_transformer.feed_forward.intermediate_size for layer in uses
                  if layer.shared_transformer.feed_forward is not None}
        if len(widths) == 1 and not any(isinstance(layer.shared_transformer, Zamba2UseBlock) for layer in uses):
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
