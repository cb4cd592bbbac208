"""Switch a model's Mamba modules to their fused forwards, and back.

The fused subclasses (``hf_shedder.arch.fused_mixers``) take the fused mamba-ssm kernels for every
no-cache forward on a GPU and run the stock forward otherwise (CPU, no kernels, a cache, padding), so
switching is always safe. On CPU the one difference is memory: a Mamba-2 forward whose reference scan
would need more than ``LEAN_SCAN_MIN_BYTES`` takes the linear-memory scan (same outputs within 1e-5). Parameters, buffers and
state-dict keys stay the same. Modules added later (a search's masks, extraction) are switched when
:func:`enable_fused_forward` runs again; the SSM-free mixers that masks and extraction build decide
for themselves.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator

from torch import nn

from .kernels import get_kernels

logger = logging.getLogger(__name__)
_said: set[str] = set()


def _fused_classes() -> dict[type[nn.Module], type[nn.Module]]:
    # Imported on use: the fused classes themselves import this package's kernel lookup.
    from ..arch.fused_mixers import FUSED_CLASSES

    return FUSED_CLASSES


def _stock_classes() -> dict[type[nn.Module], type[nn.Module]]:
    return {fused: stock for stock, fused in _fused_classes().items()}


def _say_once(key: str, message: str, level: int = logging.INFO) -> None:
    if key not in _said:
        _said.add(key)
        logger.log(level, message)


def _swap_classes(modules: Iterable[nn.Module], mapping: dict[type[nn.Module], type[nn.Module]]) -> list[nn.Module]:
    """Give each module whose exact class is a key of ``mapping`` the mapped class; returns those modules."""
    swapped = []
    for module in modules:
        target = mapping.get(type(module))
        if target is not None:
            module.__class__ = target
            swapped.append(module)
    return swapped


def enable_fused_forward(model: nn.Module) -> int:
    """Give every covered Mamba module of ``model`` its fused forward; returns how many were switched."""
    switched = _swap_classes(model.modules(), _fused_classes())
    _tell_if_no_kernels(switched)
    return len(switched)


def _tell_if_no_kernels(switched: list[nn.Module]) -> None:
    if switched and get_kernels() is None:
        _say_once("no-kernels", "hf_shedder: mamba-ssm / causal-conv1d kernels not available (or no GPU): "
                  "Mamba layers run Transformers' own forward")


def disable_fused_forward(model: nn.Module) -> int:
    """Undo :func:`enable_fused_forward`; returns how many modules went back to their stock class."""
    return len(_swap_classes(model.modules(), _stock_classes()))


def fused_forward_enabled(model: nn.Module) -> bool:
    stock_of = _stock_classes()
    return any(type(m) in stock_of for m in model.modules())


@contextlib.contextmanager
def fused_forward(model: nn.Module) -> Iterator[nn.Module]:
    """Fused forwards inside the block; modules that were stock before go back to stock after it."""
    switched = _swap_classes(model.modules(), _fused_classes())
    _tell_if_no_kernels(switched)
    try:
        yield model
    finally:
        _swap_classes(switched, _stock_classes())
