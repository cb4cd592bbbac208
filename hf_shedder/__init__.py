"""hf_shedder: Mamba-Shedder structured pruning for Hugging Face Transformers.

``import hf_shedder`` registers ``ShedderConfig`` / ``PrunedMambaForCausalLM`` with ``AutoConfig`` /
``AutoModelForCausalLM`` so pruned checkpoints load with the stock Auto classes.

The one exception is the ``hf-shedder`` command (and ``python -m hf_shedder``): importing torch and
Transformers takes seconds, so there the package starts empty, the command line parses its arguments first
and calls ``register()`` before it runs a command; the public names below still resolve on first use.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

from .errors import CheckpointError, DataError, PlanError, SearchError, ShedderError, UnsupportedModelError
from .units import Plan, Unit

if TYPE_CHECKING:
    from .modeling import PrunedMambaForCausalLM

__version__ = "0.1.0"

# Public names that need torch/Transformers, and the module each comes from.
_LAZY = {
    "get_adapter": ".arch", "ShedderConfig": ".config", "PrunedMambaForCausalLM": ".modeling",
    "HymbaConfig": ".models.hymba", "HymbaForCausalLM": ".models.hymba",
}
_registered = False


def register() -> None:
    """Register the pruned-model and Hymba classes with the Auto classes (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    from .compat import warn_if_untested_transformers
    from .config import ShedderConfig
    from .modeling import PrunedMambaForCausalLM
    from .models.hymba import HymbaConfig, HymbaForCausalLM

    AutoConfig.register(ShedderConfig.model_type, ShedderConfig, exist_ok=True)
    AutoModelForCausalLM.register(ShedderConfig, PrunedMambaForCausalLM, exist_ok=True)
    # Transformers ships no Hymba; ours mirrors the public remote code (same keys, same logits).
    AutoConfig.register(HymbaConfig.model_type, HymbaConfig, exist_ok=True)
    AutoModelForCausalLM.register(HymbaConfig, HymbaForCausalLM, exist_ok=True)
    _registered = True
    warn_if_untested_transformers()  # once: a release outside the tested range


def _started_as_command() -> bool:
    """True while the ``hf-shedder`` script or ``python -m hf_shedder`` is importing the package."""
    script = os.path.basename(sys.argv[0]) if sys.argv else ""
    if script.startswith("hf-shedder"):  # console script (hf-shedder, hf-shedder.exe, hf-shedder-script.py)
        return True
    argv = getattr(sys, "orig_argv", [])
    return script == "-m" and any(a == "hf_shedder" and p == "-m" for p, a in zip(argv, argv[1:]))


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        register()
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def prune(model, plan: Plan, provenance: dict | None = None, inplace: bool = False) -> PrunedMambaForCausalLM:
    """Apply ``plan`` physically to an unpruned Transformers model and return the pruned model."""
    from .modeling import PrunedMambaForCausalLM

    register()
    return PrunedMambaForCausalLM.from_base(model, plan, provenance=provenance, inplace=inplace)


if not _started_as_command():
    register()
    from .arch import get_adapter  # noqa: E402
    from .config import ShedderConfig  # noqa: E402
    from .modeling import PrunedMambaForCausalLM  # noqa: E402,F811
    from .models.hymba import HymbaConfig, HymbaForCausalLM  # noqa: E402

__all__ = [
    "CheckpointError", "DataError", "HymbaConfig", "HymbaForCausalLM", "Plan", "PlanError", "PrunedMambaForCausalLM", "SearchError",
    "ShedderConfig", "ShedderError", "Unit", "UnsupportedModelError", "__version__", "get_adapter", "prune",
    "register",
]
