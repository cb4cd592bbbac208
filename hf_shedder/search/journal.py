"""The search journal: everything needed to resume a search exactly where it stopped.

``journal.json`` is rewritten atomically after every calibration round and every step. It holds the
settings and their hash, the model identity, the completed steps (each candidate's perplexity) and
the state of the step in progress (per-sample NLL means of every candidate so far), so a resumed
search makes exactly the decisions the uninterrupted one would have made.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ..errors import SearchError
from ..units import atomic_write_json
from .settings import IDENTITY_DEFAULTS, INFO_ONLY, identity_hash

JOURNAL_FORMAT = "hf_shedder.search_journal/1"
JOURNAL_NAME = "journal.json"


def new_journal(settings: dict[str, Any], ident: dict[str, Any], base_model: str | None) -> dict[str, Any]:
    return {
        "format": JOURNAL_FORMAT,
        "settings": settings,
        "identity": ident,
        "settings_hash": identity_hash(ident),
        "base_model": base_model,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "updated": None,
        "base": None,
        "steps": [],
        "partial": None,
        "counters": {"layer_evals": 0, "head_evals": 0, "candidate_batches": 0, "seconds": 0.0},
        "stop_reason": None,
        "done": False,
    }


def read_journal(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SearchError(f"{path} is not valid JSON ({e}); delete it to start the search afresh") from e
    if not isinstance(data, dict) or data.get("format") != JOURNAL_FORMAT:
        raise SearchError(f"{path} is not an hf_shedder search journal (format {JOURNAL_FORMAT!r})")
    return data


def check_resumable(data: dict[str, Any], ident: dict[str, Any], path: Path) -> None:
    """Refuse a journal written with other settings, naming every difference."""
    stored = data.get("identity", {})
    # older journals: the model name was part of the identity; later fields were missing
    old = {**IDENTITY_DEFAULTS, **{k: v for k, v in stored.items() if k not in INFO_ONLY}}
    if old == ident and data.get("settings_hash") == identity_hash(stored):
        return
    diffs = []
    for key in sorted(set(old) | set(ident)):
        if old.get(key) != ident.get(key):
            diffs.append(f"{key}: journal {old.get(key)!r} vs now {ident.get(key)!r}")
    raise SearchError(
        f"{path} was written by a search with other settings, so it cannot be resumed:\n  "
        + "\n  ".join(diffs or ["settings hash differs"])
        + "\nUse another --out directory, or the journal's settings, to continue it."
    )


def write_journal(path: Path, data: dict[str, Any]) -> None:
    data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    atomic_write_json(path, data)
