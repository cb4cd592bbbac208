"""Result files of a search: plan, reference plan file, trajectory CSV/JSON and plot."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..arch import reference_keys
from ..errors import PlanError
from ..units import atomic_write_json
from .plot import plot_trajectory

if TYPE_CHECKING:
    from .engine import SearchResult

TRAJECTORY_FIELDS = ("step", "unit", "ppl", "params", "seconds")


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_results(result: SearchResult, out_dir: Path) -> None:
    """plan.json (hf_shedder), pruning_config.json (reference, plans of blocks and/or SSMs),
    trajectory.csv/.json and trajectory.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    result.plan.save(out_dir / "plan.json")
    ref = out_dir / "pruning_config.json"
    try:  # whole blocks and/or SSMs (the family's reference keys); other plans have no reference file
        reference = result.plan.to_reference(reference_keys(result.plan.family)) if len(result.plan) else None
    except PlanError:
        reference = None
    if reference is not None:
        atomic_write_json(ref, reference)
    elif ref.exists():  # left by an earlier run with another plan kind: it would contradict plan.json
        ref.unlink()
    atomic_write_json(out_dir / "trajectory.json", {
        "stop_reason": result.stop_reason,
        "base_ppl": result.base_ppl,
        "base_params": result.base_params,
        "counters": result.counters,
        "rows": result.trajectory,
        "candidates": result.candidate_ppls,
    })
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=TRAJECTORY_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in result.trajectory:
        writer.writerow({k: ("" if row[k] is None else row[k]) for k in TRAJECTORY_FIELDS})
    _atomic_text(out_dir / "trajectory.csv", buf.getvalue())
    plot_trajectory(result.trajectory, out_dir / "trajectory.png",
                    title=f"Mamba-Shedder search ({', '.join(result.settings.units)})")
