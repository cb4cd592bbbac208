"""hf_shedder: Mamba-Shedder structured pruning for Hugging Face Transformers.

``import hf_shedder`` registers ``ShedderConfig`` / ``PrunedMambaForCausalLM`` with ``AutoConfig`` /
``AutoModelForCausalLM`` so pruned checkpoints load with the stock Auto classes.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .compat import warn_if_untested_transformers

warn_if_untested_transformers()

from .arch import get_adapter  # noqa: E402
from .config import ShedderConfig  # noqa: E402
from .errors import CheckpointError, DataError, PlanError, SearchError, ShedderError, UnsupportedModelError  # noqa: E402
from .modeling import PrunedMambaForCausalLM  # noqa: E402
from .models.hymba import HymbaConfig, HymbaForCausalLM  # noqa: E402
from .units import Plan, Unit  # noqa: E402

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
