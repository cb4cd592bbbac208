"""Model-family adapters. ``get_adapter(model)`` picks the one for a model's ``config.model_type``."""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from ..errors import UnsupportedModelError
from ..models.hymba import HymbaConfig, HymbaForCausalLM
from ..units import REFERENCE_KEYS
from .bamba import BambaAdapter
from .base import ArchAdapter, SkippedLayer
from .falcon_h1 import FalconH1Adapter
from .granitemoehybrid import GraniteMoeHybridAdapter
from .hymba import HymbaAdapter
from .jamba import JambaAdapter
from .mamba import Mamba2Adapter, MambaAdapter
from .nemotron_h import NemotronHAdapter
from .zamba2 import Zamba2Adapter

# One entry per family; adapter_class_for() picks the first whose model_types has config.model_type.
ADAPTERS: list[type[ArchAdapter]] = [
    MambaAdapter,
    Mamba2Adapter,
    Zamba2Adapter,
    BambaAdapter,
    NemotronHAdapter,
    JambaAdapter,
    GraniteMoeHybridAdapter,
    FalconH1Adapter,
    HymbaAdapter,
]


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


def reference_keys(family: str | None) -> Mapping[str, str]:
    """The reference tool's plan-file keys of ``family`` (the generic Mamba-Shedder ones when unknown)."""
    for cls in ADAPTERS:
        if cls.family == family:
            return cls.reference_keys
    return REFERENCE_KEYS


# Families that Transformers does not ship register their config/model classes here (e.g. Hymba).
CUSTOM_CONFIGS: dict[str, type] = {"hymba": HymbaConfig}
CUSTOM_MODELS: dict[str, type] = {"hymba": HymbaForCausalLM}


def custom_config_class(model_type: str) -> type | None:
    return CUSTOM_CONFIGS.get(model_type)


def custom_model_class(model_type: str) -> type | None:
    return CUSTOM_MODELS.get(model_type)


__all__ = [
    "ADAPTERS", "CUSTOM_CONFIGS", "CUSTOM_MODELS", "ArchAdapter", "SkippedLayer", "adapter_class_for",
    "custom_config_class", "custom_model_class", "family_of", "get_adapter", "reference_keys",
]
