"""The Mamba-Shedder greedy search (reference-exact, accelerated, resumable).

``search(model, calibration, SearchSettings(...), out_dir)`` -> ``SearchResult``.
"""

from ..errors import SearchError
from .engine import SearchResult, search
from .evaluator import BASE, unit_key
from .journal import JOURNAL_NAME
from .plot import plot_trajectory
from .settings import SearchSettings

__all__ = ["BASE", "JOURNAL_NAME", "SearchError", "SearchResult", "SearchSettings", "plot_trajectory", "search",
           "unit_key"]
