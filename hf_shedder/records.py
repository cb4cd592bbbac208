"""What a model folder records about how it was made: its plan, provenance and search summary.

``hf-shedder info`` / ``card`` / ``bench`` read these; ``prune --apply`` and ``apply`` write them. A
plain export (stock architecture, no ``ShedderConfig``) keeps its plan in ``shedder_plan.json`` and its
provenance in ``shedder_provenance.json``.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from .errors import CheckpointError
from .units import Plan, atomic_write_json

PLAN_FILE = "shedder_plan.json"
PROVENANCE_FILE = "shedder_provenance.json"  # plain exports only: their config cannot hold it
STOCK_EXPORTS = ("plain", "mamba_ssm")  # exports whose config.json is the stock one: plan and provenance beside it
SEARCH_FILE = "shedder_search.json"  # search summary for the card: base model, units, params, settings
TRAJECTORY_FILES = ("trajectory.png", "trajectory.csv", "trajectory.json")


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e.msg}); re-run the command that writes it") from e


def folder_plan(folder: str | os.PathLike[str]) -> Plan | None:
    """The pruning plan of a model folder: from an hf_shedder config, else from ``shedder_plan.json``
    (plain exports), else None."""
    folder = str(folder)
    config_path = os.path.join(folder, "config.json")
    if os.path.isfile(config_path):
        raw = _read_json(config_path)
        if raw.get("model_type") == "hf_shedder" and raw.get("plan"):
            return Plan.from_dict(raw["plan"])
    if os.path.isfile(os.path.join(folder, PLAN_FILE)):
        return Plan.load(os.path.join(folder, PLAN_FILE))
    return None


def folder_provenance(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """``config.provenance`` of an hf_shedder folder, else ``shedder_provenance.json`` (plain exports), else {}."""
    folder = str(folder)
    config_path = os.path.join(folder, "config.json")
    if os.path.isfile(config_path):
        raw = _read_json(config_path)
        if raw.get("model_type") == "hf_shedder":
            return dict(raw.get("provenance") or {})
    path = os.path.join(folder, PROVENANCE_FILE)
    return dict(_read_json(path)) if os.path.isfile(path) else {}


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape a pruned model's weights and files."""
    from importlib import metadata

    import hf_shedder

    out = {"hf_shedder": hf_shedder.__version__}
    for name in ("transformers", "torch", "peft", "huggingface_hub"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def search_settings_for_card(settings: dict[str, Any]) -> dict[str, Any]:
    """``SearchSettings.to_dict()`` as the card's settings table names them (unset options left out)."""
    s = dict(settings)
    mode = "plain reference loop" if s.get("exact_reference") else "accelerated (same plan as the reference loop)"
    if s.get("race_fraction") is not None:
        mode = f"APPROXIMATE racing (after {s['race_fraction']} of the batches keep {s.get('race_keep')} candidates)"
    out = {
        "unit_kinds": list(s.get("units") or []),
        "steps": s.get("steps"),
        "calibration": s.get("calibration"),
        "n_samples": s.get("samples"),
        "seqlen": s.get("seqlen"),
        "seed": s.get("seed"),
        "batch_size": s.get("batch_size"),
        "mode": mode,
        "target_params": s.get("target_params"),
        "max_ppl": s.get("max_ppl"),
        "normalize": s.get("normalize"),
    }
    return {k: v for k, v in out.items() if v is not None}


def search_provenance(
    base_model: str, settings: dict[str, Any], base_ppl: float, final_ppl: float, params_before: int,
    params_after: int, stop_reason: str | None = None,
) -> dict[str, Any]:
    """``config.provenance`` of a model made by a search: base model, search settings, metrics, versions."""
    metrics = {"calibration_ppl_base": base_ppl, "calibration_ppl_pruned": final_ppl,
               "params_before": params_before, "params_after": params_after}
    if stop_reason:
        metrics["stop_reason"] = stop_reason
    return json.loads(json.dumps({"base_model": base_model, "search": settings, "metrics": metrics,
                                  "versions": library_versions()}, default=str))


def write_search_record(
    folder: str | os.PathLike[str], provenance: dict[str, Any], plan: Plan, trajectory: list[dict[str, Any]],
    search_dir: str | os.PathLike[str] | None = None,
) -> None:
    """``shedder_search.json`` (what the card reads) and the search's trajectory files into ``folder``."""
    metrics = provenance.get("metrics") or {}
    atomic_write_json(os.path.join(folder, SEARCH_FILE), {
        "base_model": provenance.get("base_model"),
        "family": plan.family,
        "units": [u.to_dict() for u in plan],
        "params_before": metrics.get("params_before"),
        "params_after": metrics.get("params_after"),
        "settings": search_settings_for_card(provenance.get("search") or {}),
        "metrics": metrics,
        "versions": provenance.get("versions"),
        "trajectory": trajectory,
    })
    if search_dir is not None:
        for name in TRAJECTORY_FILES:
            if os.path.isfile(os.path.join(search_dir, name)):
                shutil.copy2(os.path.join(search_dir, name), os.path.join(folder, name))
