"""Hymba (hybrid-head attention + SSM) model written for hf_shedder."""

from .configuration_hymba import HymbaConfig
from .modeling_hymba import (
    HymbaCache,
    HymbaForCausalLM,
    HymbaModel,
    HymbaPreTrainedModel,
    kernels_available,
)

__all__ = [
    "HymbaCache",
    "HymbaConfig",
    "HymbaForCausalLM",
    "HymbaModel",
    "HymbaPreTrainedModel",
    "kernels_available",
]
