"""Search-time masks that stack: several units of one layer (or one shared block) masked together.

A mask swaps modules for pruned clones that read the original weights. When a second unit of the
same layer is masked, its clone has to be built from the *unmasked* module with everything masked so
far, or the two edits would not combine (original-index bookkeeping, SSM removal before head removal).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

from torch import nn

from .base import Undo


class StackedMasks:
    """Reversible module swaps that accumulate a state per key (a layer, a shared block).

    ``mask(key, slots, combine, build)`` folds the new unit into the key's state with ``combine`` and
    puts ``build(original, state)`` in every ``(parent, attribute)`` slot, ``original`` being what the
    slot held before the key's first mask. Undos, run in reverse order as ``ArchAdapter.clear_mask``
    does, restore exactly the previous modules and state.
    """

    def __init__(self) -> None:
        self._state: dict[Hashable, Any] = {}
        self._originals: dict[Hashable, list[nn.Module]] = {}

    def originals(self, key: Hashable) -> list[nn.Module] | None:
        """The unmasked modules of ``key``'s slots while a mask holds them, else None."""
        return self._originals.get(key)

    def mask(self, key: Hashable, slots: Sequence[tuple[nn.Module, str]], combine: Callable[[Any], Any],
             build: Callable[[nn.Module, Any], nn.Module]) -> Undo:
        before = [getattr(parent, name) for parent, name in slots]
        previous = self._state.get(key)
        if previous is None:
            self._originals[key] = before
        state = combine(previous)
        for (parent, name), original in zip(slots, self._originals[key]):
            setattr(parent, name, build(original, state))
        self._state[key] = state

        def undo() -> None:
            for (parent, name), module in zip(slots, before):
                setattr(parent, name, module)
            if previous is None:
                self._state.pop(key, None)
                self._originals.pop(key, None)
            else:
                self._state[key] = previous

        return undo
