"""Adapter for ``HymbaForCausalLM`` (hf_shedder's own Hymba, :mod:`hf_shedder.models.hymba`).

Layout: ``model.{embed_tokens, memory_tokens, layers[i], final_layernorm}`` + ``lm_head``. Layer
``i`` holds ``input_layernorm`` + ``mamba`` (the hybrid-head module: attention heads and a Mamba SSM
fed by one ``in_proj``, outputs normalised, averaged, ``out_proj``) and ``pre_moe_layernorm`` +
``moe.experts[0]`` (a gated MLP).

Units (as Mamba-Shedder prunes Hymba):

* ``block``: the hybrid-head module with its norm and residual branch (the reference's
  ``pruned_hymba_block_idx``). The layer's MLP stays, so layer numbering never changes.
* ``attn`` / ``ssm``: the attention or the SSM branch of a hybrid-head module; the other branch
  then feeds ``out_proj`` alone (normalised, not halved), as in the reference.
* ``attn_heads``: query heads. Each kept head reads its own key/value head, whatever else goes;
  key/value heads no remaining reader uses are dropped (layers reusing a producer's keys/values
  count as readers).
* ``ssm_heads``: SSM channels in groups of ``v_head_dim`` (the fused-output slot of one attention
  head), ``num_attention_heads`` of them per layer.
* ``mlp``: a layer's whole MLP (the reference's ``pruned_moe_idx``); ``mlp_channels``: MLP channels.

KV sharing: a layer whose keys/values other layers reuse can lose its ``block`` only after every
such reader lost its attention (``block`` or ``attn``); its ``attn`` can go at any time (the
key/value projection is kept for the readers).

Masking sets plain switches the model reads (``mixer_off``, ``attn_off``, per-head / per-channel
0/1 vectors): reversible, no weight copies. Physical removal slices the weights; a branch that lost
heads or channels keeps normalising over the original width (``mean_over``) and writes into its
original positions of the fused output, so masked and physical models compute the same thing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import PlanError
from ..units import REFERENCE_KEYS, Plan, Unit
from .base import ArchAdapter, Undo
from .width import head_channels, select_depthwise_conv, select_linear, select_vector


class HymbaAdapter(ArchAdapter):
    family = "hymba"
    model_types = ("hymba",)
    unit_kinds = ("block", "attn", "ssm", "attn_heads", "ssm_heads", "mlp", "mlp_channels")
    width_kinds = frozenset({"attn_heads", "ssm_heads", "mlp_channels"})
    # The MLP outlives the removal of its layer's hybrid-head module ("block").
    shared_kinds = frozenset({"mlp", "mlp_channels"})
    mlp_channel_slices = 8
    # The reference's Hymba tool names its block and MLP units its own way; the generic keys are read too.
    reference_keys = {"pruned_hymba_block_idx": "block", "pruned_self_attn_idx": "attn", "pruned_mha_idx": "attn",
                      "pruned_moe_idx": "mlp", "pruned_mlp_idx": "mlp", **REFERENCE_KEYS}
    reference_target_names = {"block": "hymba_block", "attn": "self_attn", "ssm": "ssm", "mlp": "moe"}
    reference_log_target_key = "pruning_target"
    # The full-format keys of hybrid/Hymba-Pruning/prune.py:319-325, in the order it writes them.
    REFERENCE_FULL_KEYS = ("pruned_self_attn_idx", "pruned_ssm_idx", "pruned_hymba_block_idx", "pruned_moe_idx")

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self._producer_of = self.config.kv_producer_of()
        self._readers: dict[int, list[int]] = {}
        for layer, producer in enumerate(self._producer_of):
            if producer is not None:
                self._readers.setdefault(producer, []).append(layer)

    # ---------------------------------------------------------------- the reference's block candidates
    def reference_block_layers(self) -> list[int]:
        """The reference's ``hymba_block`` candidates (hybrid/Hymba-Pruning/prune.py:329-332): the last layer of
        each KV-reuse group plus the global-attention layers."""
        groups: dict[int, list[int]] = {}
        for layer, producer in enumerate(self._producer_of):
            if producer is not None:
                groups.setdefault(producer, [producer]).append(layer)
        last = [max(g) for g in groups.values()]
        return sorted(set(last) | set(self.config.global_attn_idx or []))

    def configure_search(self, options: dict[str, Any]) -> None:
        """``wide_block_candidates=True``: offer every ``block`` the KV-sharing rules allow (hf_shedder's
        wider set, e.g. a group's producer once its readers are gone), not only the reference's."""
        self.wide_block_candidates = bool(options.get("wide_block_candidates", False))

    def candidates(self, plan: Plan, kinds: Sequence[str] | None = None) -> list[Unit]:
        out = super().candidates(plan, kinds)
        if getattr(self, "wide_block_candidates", False):
            return out
        allowed = set(self.reference_block_layers())
        return [u for u in out if u.kind != "block" or u.layer in allowed]

    # ---------------------------------------------------------------- reference plan files
    def plan_from_reference(self, data: dict[str, Any]) -> Plan:
        """Final and per-step files of the reference's Hymba script, every key; ``pruned_mlp_channels`` maps a
        layer to the MLP width it *keeps*, a prefix (MaskLinear, prune.py:52-79, 127-134)."""
        data = dict(data)
        widths = data.pop("pruned_mlp_channels", {})
        if not isinstance(widths, dict):
            raise PlanError(f"pruned_mlp_channels must map layers to kept widths, got {widths!r}")
        unknown = [k for k in data if k not in self.reference_keys]
        if unknown or (not data and not widths):
            raise PlanError(f"not a Mamba-Shedder Hymba plan file: unknown keys {unknown}; known: "
                            f"{sorted([*self.reference_keys, 'pruned_mlp_channels'])}")
        nonempty = {k: v for k, v in data.items() if v != []}
        units = list(Plan.from_dict(nonempty, self.family, self.num_layers(), self.reference_keys)) if nonempty else []
        size = self.config.intermediate_size
        for key, width in sorted(widths.items(), key=lambda kv: int(kv[0])):
            layer = int(key)
            if isinstance(width, bool) or not isinstance(width, int) or not 0 < width <= size:
                raise PlanError(f"pruned_mlp_channels[{key}] must be a width in 1..{size}, got {width!r}")
            if width < size:
                units.append(Unit("mlp_channels", layer, tuple(range(width, size))))
        order = {"attn": 0, "ssm": 1, "block": 2, "mlp": 3, "mlp_channels": 4}
        units.sort(key=lambda u: order.get(u.kind, 5))  # the reference's masks are flags: any valid order
        plan = Plan(units, self.family, self.num_layers())
        self.validate(plan)
        return plan

    def reference_step_file(self, plan: Plan) -> dict[str, Any]:
        """The full format of prune.py:319-325 (kept MLP widths for every layer, keys as JSON strings)."""
        names = {"attn": "pruned_self_attn_idx", "ssm": "pruned_ssm_idx", "block": "pruned_hymba_block_idx",
                 "mlp": "pruned_moe_idx"}
        out: dict[str, Any] = {k: [] for k in self.REFERENCE_FULL_KEYS}
        size = self.config.intermediate_size
        widths = {str(i): size for i in range(self.num_layers())}
        for u in plan:
            if u.kind in names:
                out[names[u.kind]].append(u.layer)
            elif u.kind == "mlp_channels":
                removed = set(range(int(widths[str(u.layer)]), size)) | set(u.indices)
                kept = size - len(removed)
                if removed != set(range(kept, size)):
                    raise PlanError(f"unit {u}: the reference keeps a prefix of the MLP channels, this is not one")
                widths[str(u.layer)] = kept
            else:
                raise PlanError(f"unit {u} has no place in the reference's Hymba file")
        out["pruned_mlp_channels"] = widths
        return out

    @property
    def decoder(self) -> nn.Module:
        return self.model.model

    def layers(self) -> nn.ModuleList:
        return self.decoder.layers

    # ---------------------------------------------------------------- structure
    def num_heads(self) -> int:
        return self.config.num_attention_heads

    def kv_group_size(self) -> int:
        return self.config.num_attention_heads // self.config.num_key_value_heads

    def ssm_head_size(self) -> int:
        return self.config.v_head_dim

    def consumers(self, layer: int) -> list[int]:
        """Layers that reuse ``layer``'s keys/values."""
        return list(self._readers.get(layer, []))

    def has_unit(self, kind: str, layer: int) -> bool:
        if kind in ("mlp", "mlp_channels"):
            return self.config.intermediate_size > 0
        return True

    def width_size(self, kind: str, layer: int) -> int:
        if kind in ("attn_heads", "ssm_heads"):
            return self.num_heads()
        if kind == "mlp_channels":
            return self.config.intermediate_size
        return super().width_size(kind, layer)

    def width_group(self, kind: str) -> int:
        if kind == "attn_heads":
            return self.kv_group_size()
        if kind == "ssm_heads":
            return 1
        if kind == "mlp_channels":
            return max(1, self.config.intermediate_size // self.mlp_channel_slices)
        return 1

    def whole_kind_for(self, width_kind: str) -> str:
        return {"attn_heads": "attn", "ssm_heads": "ssm", "mlp_channels": "mlp"}[width_kind]

    # ---------------------------------------------------------------- validation
    def _check_unit(self, unit: Unit, state: dict[str, Any]) -> None:
        parts = state["parts"]
        if unit.kind in self.width_kinds and (self.whole_kind_for(unit.kind), unit.layer) in parts:
            raise PlanError(f"the {self.whole_kind_for(unit.kind)} of layer {unit.layer} was already removed")
        super()._check_unit(unit, state)

    def _check_part(self, unit: Unit, state: dict[str, Any]) -> None:
        parts, blocks = state["parts"], state["blocks"]
        # Both branches of one layer may go, as in the reference: out_proj then reads the convolved SSM
        # input (see HymbaBlock.forward).
        if unit.kind in ("attn", "ssm") and (unit.kind + "_heads", unit.layer) in state["width"]:
            raise PlanError(f"heads of the {unit.kind} branch of layer {unit.layer} were already removed")
        if unit.kind == "block":
            still_reading = [c for c in self.consumers(unit.layer) if c not in blocks and ("attn", c) not in parts]
            if still_reading:
                raise PlanError(
                    f"layer {unit.layer} computes the keys/values that layers {still_reading} reuse (kv_reuse_group); "
                    "remove those layers' blocks or attention branches first"
                )

    # ---------------------------------------------------------------- masking (search)
    def _mask_unit(self, unit: Unit) -> Undo:
        layer = self.layers()[unit.layer]
        if unit.kind == "block":
            return _set_attr(layer, "mixer_off", True)
        if unit.kind == "mlp":
            return _set_attr(layer, "mlp_off", True)
        return self._mask_part(unit)

    def _mask_part(self, unit: Unit) -> Undo:
        layer = self.layers()[unit.layer]
        block = layer.mamba
        if unit.kind == "attn":
            return _set_attr(block, "attn_off", True)
        if unit.kind == "ssm":
            return _set_attr(block, "ssm_off", True)
        if unit.kind == "attn_heads":
            return _zero_entries(block, "attn_head_mask", unit.indices, self.num_heads(), block.in_proj.weight)
        if unit.kind == "ssm_heads":
            channels = head_channels(unit.indices, self.ssm_head_size())
            return _zero_entries(block, "ssm_channel_mask", channels, block.ssm_size, block.in_proj.weight)
        if unit.kind == "mlp_channels":
            mlp = layer.moe.experts[0]
            return _zero_entries(mlp, "channel_mask", unit.indices, self.config.intermediate_size, mlp.up_proj.weight)
        raise AssertionError(unit)

    # ---------------------------------------------------------------- physical removal
    def apply_plan(self, plan: Plan) -> nn.Module:
        """Remove ``plan``'s units for good. Layers keep their numbers (a layer may end up empty)."""
        self.clear_mask()
        self.validate(plan)
        gone = _Removed(plan, self)
        stored_kv = self._stored_kv_heads(gone)
        for i, layer in enumerate(self.layers()):
            if gone.block(i):
                layer.mamba = layer.input_layernorm = None
            elif gone.any_mixer_change(i) or stored_kv.get(self._kv_source(i)) is not None:
                self._shrink_mixer(i, layer.mamba, gone, stored_kv)
            if gone.has("mlp", i):
                layer.moe = layer.pre_moe_layernorm = None
            elif gone.indices("mlp_channels", i):
                self._shrink_mlp(layer, gone.indices("mlp_channels", i))
        return self.model

    def _kv_source(self, layer: int) -> int:
        producer = self._producer_of[layer]
        return layer if producer is None else producer

    def _stored_kv_heads(self, gone: _Removed) -> dict[int, list[int] | None]:
        """Per layer with its own key/value projection: the KV heads to keep (None: all)."""
        rep = self.kv_group_size()
        out: dict[int, list[int] | None] = {}
        for i in range(self.num_layers()):
            if self._producer_of[i] is not None or gone.block(i):
                continue
            needed: set[int] = set()
            for reader in [i, *self.consumers(i)]:
                needed.update(h // rep for h in gone.kept_heads(reader))
            out[i] = None if len(needed) == self.config.num_key_value_heads else sorted(needed)
        return out

    def _shrink_mixer(self, i: int, block: nn.Module, gone: _Removed, stored_kv: dict[int, list[int] | None]) -> None:
        cfg = self.config
        hd, vd, rep = cfg.head_dim, cfg.v_head_dim, self.kv_group_size()
        q_full = block.q_size
        k_full, v_full, inner = block.k_size, block.v_size, block.ssm_size
        heads = gone.kept_heads(i)
        channels = gone.kept_ssm_channels(i)
        both = gone.has("attn", i) and gone.has("ssm", i)
        if both:  # out_proj reads the convolved SSM input: keep in_proj's x/gate rows and the conv
            channels = list(range(inner))
        kv_kept = stored_kv.get(self._kv_source(i))
        kv_list = list(range(cfg.num_key_value_heads)) if kv_kept is None else kv_kept

        rows = head_channels(heads, hd)
        own_kv: list[int] = []
        if block.k_size:
            own_kv = kv_list
            rows += [q_full + r for r in head_channels(own_kv, hd)]
            rows += [q_full + k_full + r for r in head_channels(own_kv, vd)]
        base = q_full + k_full + v_full
        rows += [base + c for c in channels] + [base + inner + c for c in channels]
        block.in_proj = select_linear(block.in_proj, rows=rows, share=False)
        block.q_size = len(heads) * hd
        if block.k_size:
            block.k_size, block.v_size = len(own_kv) * hd, len(own_kv) * vd
        attn = block.self_attn
        if heads:
            mapping = [kv_list.index(h // rep) for h in heads]
            uniform = len(heads) == self.num_heads() and len(kv_list) == cfg.num_key_value_heads
            attn.kv_map = None if uniform else tuple(mapping)
            attn.num_heads = len(heads)
            if len(heads) < self.num_heads():
                block.attn_out_index = tuple(head_channels(heads, vd))
                _narrow_norm(block.pre_avg_layernorm1, block.attn_out_index, block.fused_size)
            _narrow_head_norm(attn, "q_norm", heads)
        else:
            block.pre_avg_layernorm1 = None
            attn.q_norm = None
        if own_kv:
            attn.num_kv_heads = len(own_kv)
            _narrow_head_norm(attn, "k_norm", own_kv)
        elif block.k_size == 0 and not block.reuse_kv:
            attn.k_norm = None
        if channels:
            if len(channels) < inner:
                block.conv1d = select_depthwise_conv(block.conv1d, channels, share=False)
                block.x_proj[0] = select_linear(block.x_proj[0], cols=channels, share=False)
                block.dt_proj[0] = select_linear(block.dt_proj[0], rows=channels, share=False)
                block.A_log[0] = nn.Parameter(block.A_log[0].detach()[channels].clone())
                block.D[0] = select_vector(block.D[0], channels, share=False)
                block.ssm_size = len(channels)
                block.ssm_out_index = tuple(channels)
                _narrow_norm(block.pre_avg_layernorm2, channels, block.fused_size)
        if both:
            block.conv_passthrough = True
            for name in ("x_proj", "dt_proj", "A_log", "D", "dt_layernorm", "B_layernorm", "C_layernorm",
                         "pre_avg_layernorm2"):
                setattr(block, name, None)
        elif not channels:
            block.ssm_size = 0
            for name in ("conv1d", "x_proj", "dt_proj", "A_log", "D", "dt_layernorm", "B_layernorm",
                         "C_layernorm", "pre_avg_layernorm2"):
                setattr(block, name, None)

    def _shrink_mlp(self, layer: nn.Module, removed: Sequence[int]) -> None:
        mlp = layer.moe.experts[0]
        kept = [c for c in range(self.config.intermediate_size) if c not in set(removed)]
        for name in ("gate_proj", "up_proj"):
            if hasattr(mlp, name):
                setattr(mlp, name, select_linear(getattr(mlp, name), rows=kept, share=False))
        mlp.down_proj = select_linear(mlp.down_proj, cols=kept, share=False)

    # Layers are never deleted (a removed block leaves its MLP), so these base hooks have nothing to do.
    def _remove_part(self, unit: Unit) -> None:  # pragma: no cover - apply_plan is overridden
        raise AssertionError("HymbaAdapter.apply_plan removes all units itself")

    def _renumber(self, layer: nn.Module, new_idx: int) -> None:  # pragma: no cover
        raise AssertionError("Hymba layers keep their numbers")

    def _set_layers(self, layers: nn.ModuleList) -> None:  # pragma: no cover
        self.decoder.layers = layers

    def _update_config_after_block_removal(self, kept: list[int]) -> None:  # pragma: no cover
        raise AssertionError("Hymba layers keep their numbers")

    def block_only_export_supported(self, plan: Plan) -> bool:
        # A Hymba config cannot describe a layer without its hybrid-head module.
        return False

    # ---------------------------------------------------------------- layer-wise forward
    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, Any]:
        # The context carries positions, masks and the keys/values that later layers reuse.
        hidden, ctx = self.decoder.prepare(input_ids=input_ids, attention_mask=attention_mask)
        ctx.first_pass_kv = ctx.shared_kv
        ctx.last_layer_run = None
        return hidden, ctx

    def run_layer(self, index: int, hidden: torch.Tensor, ctx: Any) -> torch.Tensor:
        # The search runs the current plan once from layer 0, then each candidate from its own layer
        # on, starting from cached hidden states. A layer that reuses keys/values of a producer
        # before that start must read what the first pass computed, not the previous candidate's.
        if ctx.last_layer_run is not None and index <= ctx.last_layer_run:
            ctx.shared_kv = {p: kv for p, kv in ctx.first_pass_kv.items() if p < index}
        ctx.last_layer_run = index
        hidden = self.layers()[index](hidden, ctx)
        if index == self.num_layers() - 1:
            # embed() prepended the meta tokens; callers expect one position per input token
            hidden = hidden[:, self.decoder.num_meta_tokens :]
        return hidden

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder.final_layernorm(hidden)

    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    def lora_target_modules(self) -> list[str]:
        # in_proj/out_proj survive branch removal; x_proj/dt_proj go with the SSM branch.
        return ["in_proj", "out_proj", "gate_proj", "up_proj", "down_proj"]


class _Removed:
    """What a plan takes away, per layer, in the original numbering."""

    def __init__(self, plan: Plan, adapter: HymbaAdapter) -> None:
        self.adapter = adapter
        self.parts: set[tuple[str, int]] = set()
        self.width: dict[tuple[str, int], set[int]] = {}
        for unit in plan:
            if unit.indices:
                self.width.setdefault((unit.kind, unit.layer), set()).update(unit.indices)
            else:
                self.parts.add((unit.kind, unit.layer))

    def has(self, kind: str, layer: int) -> bool:
        return (kind, layer) in self.parts

    def block(self, layer: int) -> bool:
        return self.has("block", layer)

    def indices(self, kind: str, layer: int) -> set[int]:
        return self.width.get((kind, layer), set())

    def kept_heads(self, layer: int) -> list[int]:
        if self.block(layer) or self.has("attn", layer):
            return []
        removed = self.indices("attn_heads", layer)
        return [h for h in range(self.adapter.num_heads()) if h not in removed]

    def kept_ssm_channels(self, layer: int) -> list[int]:
        if self.block(layer) or self.has("ssm", layer):
            return []
        removed = set(head_channels(sorted(self.indices("ssm_heads", layer)), self.adapter.ssm_head_size()))
        return [c for c in range(self.adapter.config.ssm_intermediate_size) if c not in removed]

    def any_mixer_change(self, layer: int) -> bool:
        return (
            self.has("attn", layer)
            or self.has("ssm", layer)
            or bool(self.indices("attn_heads", layer))
            or bool(self.indices("ssm_heads", layer))
        )


def _set_attr(owner: nn.Module, name: str, value: Any) -> Undo:
    previous = getattr(owner, name)
    setattr(owner, name, value)

    def undo() -> None:
        setattr(owner, name, previous)

    return undo


def _zero_entries(owner: nn.Module, name: str, indices: Sequence[int], size: int, like: torch.Tensor) -> Undo:
    """Set ``owner.name`` to a 0/1 vector with ``indices`` zeroed (on top of any existing one)."""
    previous = getattr(owner, name)
    mask = torch.ones(size, device=like.device) if previous is None else previous.clone()
    mask[list(indices)] = 0
    setattr(owner, name, mask)

    def undo() -> None:
        setattr(owner, name, previous)

    return undo


def _narrow_norm(norm: nn.Module, positions: Sequence[int], full_width: int) -> None:
    norm.weight = select_vector(norm.weight, positions, share=False)
    norm.mean_over = full_width


def _narrow_head_norm(attn: nn.Module, name: str, heads: Sequence[int]) -> None:
    norm = getattr(attn, name)
    if norm is None or norm.weight.dim() != 4:  # a shared (per-dim) norm has no per-head weights
        return
    norm.weight = nn.Parameter(norm.weight.detach()[:, list(heads)].clone())


__all__ = ["HymbaAdapter"]
