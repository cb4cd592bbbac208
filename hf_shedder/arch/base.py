"""The interface every model family implements.

An adapter knows one family's module layout (and nothing else in the package does). It lists the
removable units, masks them reversibly for the search (module swaps, no weight copies), removes them
physically for extraction, and exposes a layer-by-layer forward so the search can cache the hidden
states entering each layer.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import PlanError
from ..units import REFERENCE_KEYS, Plan, Unit

Undo = Callable[[], None]


class SkippedLayer(nn.Module):
    """Stands in for a masked block: the residual stream passes through unchanged."""

    def __init__(self, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


class ArchAdapter(ABC):
    """Family-specific knowledge behind one common interface.

    Subclasses set ``family``, ``model_types`` (HF ``config.model_type`` values) and ``unit_kinds``,
    and implement the abstract methods. Plans always use the layer numbering of the unpruned model;
    masking and ``apply_plan`` expect an unpruned model.
    """

    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    unit_kinds: ClassVar[tuple[str, ...]]
    # Kinds whose units carry indices (heads, channels); the rest are whole components.
    width_kinds: ClassVar[frozenset[str]] = frozenset()
    # Kinds that live in a module shared by several layers (Zamba2's shared attention+MLP block): a unit is
    # anchored at one layer but outlives that layer's removal, since other layers still use the module.
    shared_kinds: ClassVar[frozenset[str]] = frozenset()
    # The reference tool's plan-file keys for this family -> unit kinds (the first key of a kind is written).
    reference_keys: ClassVar[Mapping[str, str]] = REFERENCE_KEYS
    # Whether the generation cache holds only fixed-size recurrent state (conv window, SSM state), so a
    # decode step can be captured as a CUDA graph (hf_shedder.runtime); attention caches grow.
    recurrent_cache_only: ClassVar[bool] = False
    # Unit kind -> the reference script's name for it in step-file names (``config.{target}.{step}.json``),
    # and the key its log.json uses for that name.
    reference_target_names: ClassVar[Mapping[str, str]] = {"block": "mamba_block", "ssm": "ssm"}
    reference_log_target_key: ClassVar[str] = "prune_target"

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config
        self._undo: list[Undo] = []
        self._masked_plan: Plan | None = None
        self._masked_blocks: dict[int, nn.Module] = {}  # layer index -> the layer a block mask replaced

    # ------------------------------------------------------------------ structure
    @abstractmethod
    def layers(self) -> nn.ModuleList:
        """The decoder layers, in order."""

    def layer(self, index: int) -> nn.Module:
        """Decoder layer ``index`` as it is without a block mask.

        The search keeps its plan masked while it lists the next candidates, so a removed block is then a
        stand-in; sizes and locations of the layer's parts must still come from the layer itself.
        """
        held = self._masked_blocks.get(index)
        return held if held is not None else self.layers()[index]

    def num_layers(self) -> int:
        return len(self.layers())

    def configure_search(self, options: dict[str, Any]) -> None:
        """Family options of a search (``SearchSettings.extra``); none by default."""

    # ------------------------------------------------------------------ reference plan files
    def plan_from_reference(self, data: dict[str, Any]) -> Plan:
        """A plan from a file the reference writes or ships (final or per-step), in its meaning."""
        return Plan.from_dict(data, self.family, self.num_layers(), self.reference_keys)

    def reference_step_file(self, plan: Plan) -> dict[str, Any]:
        """What the reference writes for ``plan`` (its per-step and final files)."""
        return plan.to_reference(self.reference_keys)

    def empty_plan(self) -> Plan:
        return Plan([], self.family, self.num_layers())

    def width_size(self, kind: str, layer: int) -> int:
        """How many indices a width kind has at ``layer`` (heads, channels)."""
        raise PlanError(f"{self.family} has no width unit kind {kind!r}")

    def width_group(self, kind: str) -> int:
        """Indices removed together by one search candidate of a width kind."""
        return 1

    def width_candidates(self, kind: str, layer: int) -> list[tuple[int, ...]]:
        """Index sets the search may remove at once (default: consecutive runs of ``width_group``)."""
        size, group = self.width_size(kind, layer), self.width_group(kind)
        return [tuple(range(start, min(start + group, size))) for start in range(0, size, group)]

    # ------------------------------------------------------------------ units
    def all_units(self, kinds: Sequence[str] | None = None) -> list[Unit]:
        kinds = list(kinds) if kinds else [k for k in self.unit_kinds if k not in self.width_kinds]
        self._check_kinds(kinds)
        units: list[Unit] = []
        for layer in range(self.num_layers()):
            for kind in kinds:
                if not self.has_unit(kind, layer):
                    continue
                if kind in self.width_kinds:
                    units.extend(Unit(kind, layer, idx) for idx in self.width_candidates(kind, layer))
                else:
                    units.append(Unit(kind, layer))
        return units

    def has_unit(self, kind: str, layer: int) -> bool:
        """Whether ``layer`` has a component of ``kind`` (hybrids: attention layers have no SSM)."""
        return True

    def candidates(self, plan: Plan, kinds: Sequence[str] | None = None) -> list[Unit]:
        """Units that can still be removed on top of ``plan``."""
        self.validate(plan)
        state = self._walk(plan)
        out = []
        for unit in self.all_units(kinds):
            if unit in plan:
                continue
            try:
                self._check_unit(unit, state)
            except PlanError:
                continue
            out.append(unit)
        return out

    # ------------------------------------------------------------------ validation
    def _check_kinds(self, kinds: Sequence[str]) -> None:
        for kind in kinds:
            if kind not in self.unit_kinds:
                raise PlanError(
                    f"the {self.family} family has no unit kind {kind!r}; its kinds are {list(self.unit_kinds)}"
                )

    def validate(self, plan: Plan) -> None:
        """Raise PlanError with a precise message unless ``plan`` fits this (unpruned) model."""
        if plan.family is not None and plan.family != self.family:
            raise PlanError(
                f"this plan was made for the {plan.family!r} family but the model is {self.family!r} "
                f"({type(self.model).__name__})"
            )
        if plan.num_layers is not None and plan.num_layers != self.num_layers():
            raise PlanError(
                f"this plan was made for a model with {plan.num_layers} layers but this model has "
                f"{self.num_layers()}"
            )
        self._walk(plan)

    def _walk(self, plan: Plan) -> dict[str, Any]:
        state: dict[str, Any] = {"blocks": set(), "parts": {}, "width": {}}
        for pos, unit in enumerate(plan):
            try:
                self._check_unit(unit, state)
            except PlanError as e:
                raise PlanError(f"plan unit #{pos} ({unit}): {e}") from None
            self._record(unit, state)
        return state

    def _check_unit(self, unit: Unit, state: dict[str, Any]) -> None:
        self._check_kinds([unit.kind])
        n = self.num_layers()
        if unit.layer >= n:
            raise PlanError(f"layer {unit.layer} is out of range: the model has layers 0..{n - 1}")
        if unit.layer in state["blocks"] and unit.kind not in self.shared_kinds:
            raise PlanError(f"layer {unit.layer} was already removed as a whole block")
        if not self.has_unit(unit.kind, unit.layer):
            raise PlanError(f"layer {unit.layer} has no {unit.kind!r} component")
        if unit.kind in self.width_kinds:
            if not unit.indices:
                raise PlanError(f"a {unit.kind!r} unit needs the indices it removes")
            size = self.width_size(unit.kind, unit.layer)
            bad = [i for i in unit.indices if i >= size]
            if bad:
                raise PlanError(f"{unit.kind} indices {bad} out of range at layer {unit.layer} (size {size})")
            done = state["width"].get((unit.kind, unit.layer), set())
            again = sorted(done.intersection(unit.indices))
            if again:
                raise PlanError(f"{unit.kind} indices {again} at layer {unit.layer} were already removed")
            if len(done) + len(unit.indices) >= size:
                raise PlanError(
                    f"this would remove all {size} {unit.kind} of layer {unit.layer}; remove the "
                    f"{self.whole_kind_for(unit.kind)!r} unit of that layer instead"
                )
            self._check_width(unit, done)
        else:
            if unit.indices:
                raise PlanError(f"a {unit.kind!r} unit takes no indices")
            if unit.kind != "block" and (unit.kind, unit.layer) in state["parts"]:
                raise PlanError(f"{unit.kind} of layer {unit.layer} was already removed")
            self._check_part(unit, state)

    def _check_width(self, unit: Unit, already_removed: set[int]) -> None:
        """Family hook: structural constraints on width removal (e.g. grouped-query attention)."""

    def _check_part(self, unit: Unit, state: dict[str, Any]) -> None:
        """Family hook: constraints between whole-component units."""

    def whole_kind_for(self, width_kind: str) -> str:
        return "block"

    def _record(self, unit: Unit, state: dict[str, Any]) -> None:
        if unit.kind == "block":
            state["blocks"].add(unit.layer)
        elif unit.kind in self.width_kinds:
            state["width"].setdefault((unit.kind, unit.layer), set()).update(unit.indices)
        else:
            state["parts"][(unit.kind, unit.layer)] = True

    # ------------------------------------------------------------------ masking (search time)
    def set_mask(self, plan: Plan) -> None:
        """Make the model behave as if ``plan`` were applied, by swapping modules (reversible)."""
        self.clear_mask()
        self.validate(plan)
        try:
            for unit in plan:
                self._undo.append(self._mask_unit(unit))
        except Exception:
            self.clear_mask()
            raise
        self._masked_plan = plan

    def clear_mask(self) -> None:
        while self._undo:
            self._undo.pop()()
        self._masked_plan = None

    @contextlib.contextmanager
    def masked(self, plan: Plan) -> Iterator[nn.Module]:
        previous = self._masked_plan
        self.set_mask(plan)
        try:
            yield self.model
        finally:
            self.clear_mask()
            if previous is not None:
                self.set_mask(previous)

    def mask_unit(self, unit: Unit) -> Undo:
        """Mask one more unit on top of the current mask (the caller must have validated the extension);
        returns the closure that undoes it. Lets the search try candidates without re-masking the plan."""
        return self._mask_unit(unit)

    def _mask_unit(self, unit: Unit) -> Undo:
        if unit.kind == "block":
            layers, i = self.layers(), unit.layer
            original = layers[i]
            layers[i] = self._skipped(i, original)
            self._masked_blocks[i] = original

            def undo() -> None:
                layers[i] = original
                self._masked_blocks.pop(i, None)

            return undo
        return self._mask_part(unit)

    def _skipped(self, index: int, original: nn.Module) -> nn.Module:
        """Family hook: the stand-in for masked layer ``index`` (the residual stream passes unchanged)."""
        return SkippedLayer(index)

    @abstractmethod
    def _mask_part(self, unit: Unit) -> Undo:
        """Mask one non-block unit; return the closure that undoes it."""

    # ------------------------------------------------------------------ physical removal
    def apply_plan(self, plan: Plan) -> nn.Module:
        """Remove ``plan``'s units for good (smaller weights, fewer layers); returns the model."""
        self.clear_mask()
        self.validate(plan)
        blocks = plan.removed_blocks()
        for unit in plan:
            if unit.kind != "block" and (unit.layer not in blocks or unit.kind in self.shared_kinds):
                self._remove_part(unit)
        if blocks:
            layers = self.layers()
            kept = [i for i in range(len(layers)) if i not in blocks]
            new_layers = [layers[i] for i in kept]
            for new_idx, layer in enumerate(new_layers):
                self._renumber(layer, new_idx)
            self._set_layers(nn.ModuleList(new_layers))
            self._update_config_after_block_removal(kept)
        return self.model

    @abstractmethod
    def _remove_part(self, unit: Unit) -> None:
        """Physically remove one non-block unit (layer numbering still original)."""

    @abstractmethod
    def _renumber(self, layer: nn.Module, new_idx: int) -> None:
        """Give a kept layer its new position (cache indices)."""

    @abstractmethod
    def _set_layers(self, layers: nn.ModuleList) -> None: ...

    @abstractmethod
    def _update_config_after_block_removal(self, kept: list[int]) -> None: ...

    def block_only_export_supported(self, plan: Plan) -> bool:
        """Whether the pruned model is expressible as a plain base-architecture checkpoint."""
        return plan.kinds() <= {"block"}

    @contextlib.contextmanager
    def plain_export(self) -> Iterator[None]:
        """Family hook around saving a plain checkpoint: the model as the stock architecture saves it."""
        yield

    # ------------------------------------------------------------------ layer-wise forward (search)
    @abstractmethod
    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, Any]:
        """Embeddings plus whatever per-batch context the layers need (masks, positions)."""

    @abstractmethod
    def run_layer(self, index: int, hidden: torch.Tensor, ctx: Any) -> torch.Tensor:
        """Run decoder layer ``index`` (as currently masked) on ``hidden``."""

    @abstractmethod
    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def lm_head(self) -> nn.Module: ...

    def scale_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """What the model's forward does to ``lm_head``'s output (perplexity with a chunked head repeats it)."""
        return logits

    def layerwise_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Full forward through the layer-wise API (used to check it matches ``model(...)``)."""
        hidden, ctx = self.embed(input_ids, attention_mask)
        for i in range(self.num_layers()):
            hidden = self.run_layer(i, hidden, ctx)
        head = self.lm_head()
        return head(self.final_norm(hidden).to(head.weight.dtype)).float()

    def extraction_note(self) -> str | None:
        """What extraction did beyond removing units that the user should be told (None: nothing)."""
        return None

    # ------------------------------------------------------------------ recovery
    @abstractmethod
    def lora_target_modules(self) -> list[str]:
        """Module-name suffixes LoRA should adapt in this family (those that survive pruning)."""
