"""hf_shedder: Mamba-Shedder structured pruning for Hugging Face Transformers.

``import hf_shedder`` registers ``ShedderConfig`` / ``PrunedMambaForCausalLM`` with ``AutoConfig`` /
``AutoModelForCausalLM`` so pruned checkpoints load with the stock Auto classes.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .arch import get_adapter
from .config import ShedderConfig
from .errors import CheckpointError, DataError, PlanError, SearchError, ShedderError, UnsupportedModelError
from .modeling import PrunedMambaForCausalLM
from .models.hymba import HymbaConfig, HymbaForCausalLM
from .units import Plan, Unit

__version__ = "0.1.0"

AutoConfig.register(ShedderConfig.model_type, ShedderConfig, exist_ok=True)
AutoModelForCausalLM.register(ShedderConfig, PrunedMambaForCausalLM, exist_ok=True)
# Transformers ships no Hymba; ours mirrors the public remote code (same keys, same logits).
AutoConfig.register(HymbaConfig.model_type, HymbaConfig, exist_ok=True)
AutoModelForCausalLM.register(HymbaConfig, HymbaForCausalLM, exist_ok=True)


def prune(model, plan: Plan, provenance: dict | None = None, inplace: bool = False) -> PrunedMambaForCausalLM:
    """Apply ``plan`` physically to an unpruned Transformers model and return the pruned model."""
    return PrunedMambaForCausalLM.from_base(model, plan, provenance=provenance, inplace=inplace)


__all__ = [
    "CheckpointError", "DataError", "HymbaConfig", "HymbaForCausalLM", "Plan", "PlanError", "PrunedMambaForCausalLM", "SearchError",
    "ShedderConfig", "ShedderError", "Unit", "UnsupportedModelError", "__version__", "get_adapter", "prune",
]
