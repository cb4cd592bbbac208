"""Model-family adapters. ``get_adapter(model)`` picks the one for a model's ``config.model_type``."""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from .base import ArchAdapter, SkippedLayer
from .mamba import Mamba2Adapter, MambaAdapter

ADAPTERS: list[type[ArchAdapter]] = [MambaAdapter, Mamba2Adapter]


def adapter_class_for(model_type: str) -> type[ArchAdapter]:
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls
    supported = sorted(t for cls in ADAPTERS for t in cls.model_types)
    raise UnsupportedModelError(
        f"hf_shedder has no adapter for model_type {model_type!r}; supported model types: {supported}"
    )


def get_adapter(model: nn.Module) -> ArchAdapter:
    """The adapter for an (unwrapped) Transformers causal LM."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no Transformers config; cannot prune it")
    return adapter_class_for(model_type)(model)


def family_of(model_type: str) -> str:
    return adapter_class_for(model_type).family


# Families that Transformers does not ship register their config/model classes here (e.g. Hymba).
CUSTOM_CONFIGS: dict[str, type] = {}
CUSTOM_MODELS: dict[str, type] = {}


def custom_config_class(model_type: str) -> type | None:
    return CUSTOM_CONFIGS.get(model_type)


def custom_model_class(model_type: str) -> type | None:
    return CUSTOM_MODELS.get(model_type)


__all__ = [
    "ADAPTERS", "CUSTOM_CONFIGS", "CUSTOM_MODELS", "ArchAdapter", "SkippedLayer", "adapter_class_for",
    "custom_config_class", "custom_model_class", "family_of", "get_adapter",
]
