"""Mamba-2 SSD head pruning, shared by every family with Mamba-2 mixers (unit kind ``"ssm_heads"``).

A Mamba-2 mixer (``Mamba2Mixer``, ``Zamba2MambaMixer``, ``BambaMixer``, ``NemotronHMamba2Mixer`` and the
other Transformers mixers written from the same template) has ``num_heads`` heads of ``head_dim``
channels and ``n_groups`` groups of B/C state projections shared by ``num_heads / n_groups``
consecutive heads. Its weights are laid out as::

    in_proj rows   = [ z (inner) | x (inner) | B (n_groups*N) | C (n_groups*N) | dt (num_heads) ]
    conv1d chans   = [ x (inner) | B | C ]
    A_log, D, dt_bias: one per head;   norm.weight: inner;   out_proj columns: inner

Removing head h drops its ``head_dim`` channels of z, x, conv-x, norm and out_proj, and its entries of
dt, A_log, D and dt_bias; B and C stay (they belong to the group). Constraints, checked by
:func:`check_ssm_heads`:

* every B/C group must keep the same number of heads (the scan repeats B/C ``num_heads/n_groups`` times),
  so a removal takes the same number of heads from each group;
* the gated RMSNorm is grouped in Zamba2/Nemotron-H (``group_size = inner/n_groups``, one group per B/C
  group) and whole-width in Mamba2/Bamba; either way the pruned norm normalises over the *kept* channels
  (the statistics change; masked and physical models compute exactly that, with the same code);
* at least one head stays (otherwise remove the block).

The pruned mixer is a clone of the original mixer class (same forward, cache handling and kernels)
with smaller weights and ``num_heads``/``intermediate_size``/``conv_dim`` updated, so the conv and SSM
cache states that generation allocates follow the physical sizes. It remembers which original heads it
holds in ``shedder_heads``. ``share=True`` gives the search-time mask (weights selected on the fly
from the original mixer, see :mod:`hf_shedder.arch.width`).

Use from an adapter: build a :class:`Mamba2MixerEditor` with a function that locates the mixer of a
layer, then call ``editor.mask(layer, heads=..., ssm=...)`` from ``_mask_part`` and ``editor.remove(...)``
from ``_remove_part``; ``ssm_head_candidates`` gives the search candidates. The editor also handles the
``"ssm"`` unit (:mod:`hf_shedder.arch.ssm_free`), so both can be combined on one layer in any order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

from torch import nn

from ..errors import PlanError
from .ssm_free import SSMFreeMixer
from .stacked_masks import StackedMasks
from .width import (
    head_channels,
    kept_positions,
    removed_per_group,
    select_depthwise_conv,
    select_linear,
    select_vector,
    shallow_clone,
)

Undo = Callable[[], None]


def mixer_heads(mixer: nn.Module) -> tuple[int, ...]:
    """Original indices of the heads a (possibly pruned) mixer still holds."""
    held = getattr(mixer, "shedder_heads", None)
    return tuple(held) if held is not None else tuple(range(mixer.num_heads))


def norm_groups(mixer: nn.Module) -> int:
    """Number of groups the mixer's gated RMSNorm normalises separately (1 = whole width)."""
    group_size = getattr(mixer.norm, "group_size", None)
    return 1 if not group_size else mixer.intermediate_size // group_size


def check_ssm_heads(removed: set[int], num_heads: int, n_groups: int, n_norm_groups: int = 1) -> None:
    """Raise PlanError unless removing ``removed`` keeps every head group the same size."""
    for parts, what in ((n_groups, "B/C groups (n_groups)"), (n_norm_groups, "gated-norm groups")):
        if parts <= 1:
            continue
        per = num_heads // parts
        counts = removed_per_group(removed, num_heads, parts)
        if len(set(counts)) > 1:
            raise PlanError(
                f"Mamba-2 heads come in {parts} {what} of {per} consecutive heads, and every group must keep the "
                f"same number of heads; this removes {dict(enumerate(counts))} heads per group. Remove the same "
                f"number of heads from each group (e.g. heads {[g * per for g in range(parts)]} together)."
            )


def ssm_head_candidates(num_heads: int, n_groups: int, per_group: int = 1) -> list[tuple[int, ...]]:
    """Search candidates: ``per_group`` heads at the same position of every group (one head if n_groups=1)."""
    per = num_heads // max(n_groups, 1)
    return [
        tuple(g * per + q for g in range(n_groups) for q in range(start, min(start + per_group, per)))
        for start in range(0, per, per_group)
    ]


def _prune_norm(norm: nn.Module, channels: list[int], groups: int, share: bool) -> nn.Module:
    new = shallow_clone(norm)
    new.weight = select_vector(norm.weight, channels, share=share)
    if getattr(norm, "group_size", None):
        new.group_size = len(channels) // groups
    return new


def prune_mamba2_heads(mixer: nn.Module, kept: Sequence[int], *, share: bool) -> nn.Module:
    """Clone of a Mamba-2 mixer (or of its SSM-free form) keeping the heads at positions ``kept``."""
    kept = sorted(kept)
    if not kept:
        raise PlanError("a Mamba-2 mixer must keep at least one head; remove the block instead")
    p, inner = mixer.head_dim, mixer.intermediate_size
    groups = norm_groups(mixer)
    ch = head_channels(kept, p)
    new = shallow_clone(mixer)
    if isinstance(mixer, SSMFreeMixer):
        rows = ch + [inner + c for c in ch]
        conv = ch
    else:
        bc = 2 * mixer.n_groups * mixer.ssm_state_size
        rows = ch + [inner + c for c in ch] + list(range(2 * inner, 2 * inner + bc)) + [2 * inner + bc + h for h in kept]
        conv = ch + list(range(inner, inner + bc))
        for name in ("A_log", "D", "dt_bias"):
            setattr(new, name, select_vector(getattr(mixer, name), kept, share=share))
        new.conv_dim = len(ch) + bc
    new.in_proj = select_linear(mixer.in_proj, rows=rows, share=share)
    new.conv1d = select_depthwise_conv(mixer.conv1d, conv, share=share)
    new.norm = _prune_norm(mixer.norm, ch, groups, share)
    new.out_proj = select_linear(mixer.out_proj, cols=ch, share=share)
    new.num_heads = len(kept)
    new.intermediate_size = len(ch)
    held = mixer_heads(mixer)
    new.shedder_heads = tuple(held[k] for k in kept)
    return new


class Mamba2MixerEditor:
    """Masks (reversibly) and removes ``ssm`` / ``ssm_heads`` units on the Mamba-2 mixers of one model.

    ``locate(layer)`` returns ``(parent_module, attribute_name)`` of the mixer of an original layer.
    Masks of one layer are combined: each new mask rebuilds the layer's mixer from the original one
    with everything masked so far (removed heads, SSM removed), so units stack in any order.
    """

    def __init__(self, locate: Callable[[int], tuple[nn.Module, str]]) -> None:
        self.locate = locate
        self._masks = StackedMasks()

    def original(self, layer: int) -> nn.Module:
        """The layer's mixer as it is without masks."""
        held = self._masks.originals(layer)
        if held is not None:
            return held[0]
        parent, name = self.locate(layer)
        return getattr(parent, name)

    def check_heads(self, layer: int, removed: set[int]) -> None:
        mixer = self.original(layer)
        check_ssm_heads(removed, len(mixer_heads(mixer)), mixer.n_groups, norm_groups(mixer))

    def candidates(self, layer: int, per_group: int = 1) -> list[tuple[int, ...]]:
        mixer = self.original(layer)
        return ssm_head_candidates(len(mixer_heads(mixer)), mixer.n_groups, per_group)

    @staticmethod
    def build(original: nn.Module, removed: frozenset[int], ssm: bool, share: bool) -> nn.Module:
        mixer = SSMFreeMixer.from_mixer(original, "mamba2", share=share) if ssm else original
        if removed:
            mixer = prune_mamba2_heads(mixer, kept_positions(mixer_heads(mixer), removed), share=share)
        return mixer

    def mask(self, layer: int, heads: Sequence[int] = (), ssm: bool = False) -> Undo:
        def combine(previous: tuple[frozenset[int], bool] | None) -> tuple[frozenset[int], bool]:
            gone, no_ssm = previous or (frozenset(), False)
            return gone | frozenset(heads), no_ssm or ssm

        return self._masks.mask(layer, [self.locate(layer)], combine,
                                lambda original, state: self.build(original, state[0], state[1], share=True))

    def remove(self, layer: int, heads: Sequence[int] = (), ssm: bool = False) -> None:
        """Physical removal on the current (possibly already pruned) mixer; heads are original indices."""
        parent, name = self.locate(layer)
        mixer = getattr(parent, name)
        if heads:
            mixer = prune_mamba2_heads(mixer, kept_positions(mixer_heads(mixer), heads), share=False)
        if ssm:
            mixer = SSMFreeMixer.from_mixer(mixer, "mamba2", share=False)
        setattr(parent, name, mixer)


class Mamba2UnitsMixin:
    """``ssm`` and ``ssm_heads`` units for an :class:`~hf_shedder.arch.base.ArchAdapter` with Mamba-2 mixers.

    The adapter implements ``_mixer_location(layer) -> (parent, attribute)`` and routes its
    ``ssm``/``ssm_heads`` units to ``_mask_mixer_unit`` / ``_remove_mixer_unit``; ``width_size``,
    ``width_candidates`` and ``_check_width`` delegate here for ``ssm_heads``. ``width_groups`` (an
    instance attribute, e.g. ``adapter.width_groups = {"ssm_heads": 2}``) sets how many heads per B/C
    group one search candidate removes.
    """

    width_groups: dict[str, int] = {}  # noqa: RUF012  (read-only default; set a new dict per adapter)
    mixer_editor_class: ClassVar[type[Mamba2MixerEditor]] = Mamba2MixerEditor

    def _mixer_location(self, layer: int) -> tuple[nn.Module, str]:
        raise NotImplementedError

    @property
    def mamba2_editor(self) -> Mamba2MixerEditor:
        editor = self.__dict__.get("_mamba2_editor")
        if editor is None:
            editor = self.__dict__["_mamba2_editor"] = self.mixer_editor_class(self._mixer_location)
        return editor

    def width_group(self, kind: str) -> int:
        return int(self.width_groups.get(kind, 1))

    def _ssm_heads_size(self, layer: int) -> int:
        return len(mixer_heads(self.mamba2_editor.original(layer)))

    def _ssm_heads_candidates(self, layer: int) -> list[tuple[int, ...]]:
        return self.mamba2_editor.candidates(layer, self.width_group("ssm_heads"))

    def _check_ssm_heads(self, layer: int, removed_after: set[int]) -> None:
        self.mamba2_editor.check_heads(layer, removed_after)

    def _mask_mixer_unit(self, kind: str, layer: int, indices: Sequence[int]) -> Undo:
        if kind == "ssm":
            return self.mamba2_editor.mask(layer, ssm=True)
        return self.mamba2_editor.mask(layer, heads=indices)

    def _remove_mixer_unit(self, kind: str, layer: int, indices: Sequence[int]) -> None:
        if kind == "ssm":
            self.mamba2_editor.remove(layer, ssm=True)
        else:
            self.mamba2_editor.remove(layer, heads=indices)
