"""What differs between the Transformers releases hf_shedder supports (see :mod:`hf_shedder.versions`).

Transformers releases after 5.17 renamed the generation cache argument: ``past_key_values`` (decoder layers, masks, model
outputs) and ``cache_params`` (Mamba mixers) became ``cache``; the old names give a FutureWarning and go
in 5.40. Code that *receives* a cache (our stand-in modules, our Hymba model) accepts every name; code
that *passes* one uses :data:`CACHE_KWARG`, the name the installed release expects. The import guard
warns once when the installed release is outside the tested range.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import transformers
from transformers.masking_utils import create_causal_mask

from .versions import is_tested, tested_range, tested_requirement

# Every name a cache has had as a keyword argument; "cache" is the current one.
CACHE_NAMES = ("cache", "past_key_values", "cache_params")
# The keyword (and model-output field) the installed release uses for the generation cache.
CACHE_KWARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


class UntestedTransformersWarning(UserWarning):
    """The installed Transformers release is outside the range hf_shedder's test suite runs on."""


def pop_cache(kwargs: dict[str, Any]) -> Any:
    """Remove and return the cache from a forward's ``kwargs``, under whichever name the caller used."""
    found = [kwargs.pop(name) for name in CACHE_NAMES if name in kwargs]
    return next((c for c in found if c is not None), None)


def untested_transformers_message(version: str | None = None) -> str | None:
    """The warning for Transformers ``version`` (default: the installed one), or None inside the tested range."""
    version = transformers.__version__ if version is None else version
    if is_tested(version):
        return None
    return (
        f"hf_shedder is tested with transformers {tested_range()}; transformers {version} is installed. "
        f"Pruning, loading or generation may fail or differ; for a tested release: pip install '{tested_requirement()}'"
    )


def warn_if_untested_transformers() -> None:
    """Warn (once per process) when the installed Transformers release is outside the tested range."""
    message = untested_transformers_message()
    if message is not None:
        warnings.warn(message, UntestedTransformersWarning, stacklevel=3)
