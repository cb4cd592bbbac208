"""The reference's staged Zamba2 search (hybrid/Zamba2-Pruning/prune_hybrid.py:341-556), on hf_shedder's engine.

The reference prunes Zamba2 in three greedy stages, each on top of the previous stage's plan and each with
its own calibration sample: blocks (``mamba_block``, ``mha``, ``mlp``; 8 steps), MLP widths (``mlp_width``;
20 steps), SSMs (``ssm``; 18 steps). Its three samples are drawn one after the other from the one
``random`` stream seeded by ``set_seed(42)`` (prune_hybrid.py:300-320): ``stage_calibrations`` draws them
the same way. Each stage is an ordinary ``search`` whose plans start from the stages before it
(``SearchSettings.extra["base_plan"]``), with its own journal under ``out_dir/stage{k}_{name}``; in exact
mode the reference's per-step files of all stages, numbered on, and one ``log.json`` go to ``out_dir``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..arch import get_adapter
from ..data import CalibrationSet, _tokenize_stream, read_texts
from ..errors import DataError, SearchError
from .engine import SearchResult, search
from .reference_mode import draw_reference_rows, write_reference_files
from .settings import SearchSettings


@dataclass(frozen=True)
class Stage:
    """One greedy stage: its name (the reference's step-file name), unit kinds and number of steps."""

    name: str
    units: tuple[str, ...]
    steps: int


# prune_hybrid.py's defaults: --target_block_pruning_steps 8, --target_width_pruning_steps 20,
# --target_ssm_pruning_steps 18; its files are config.block_pruning.*, config.mlp_width.*, config.ssm.*
ZAMBA2_STAGES = (
    Stage("block_pruning", ("mamba_block", "mha", "mlp"), 8),
    Stage("mlp_width", ("mlp_width",), 20),
    Stage("ssm", ("ssm",), 18),
)


def stage_calibrations(source: str, tokenizer: Any, sizes: Sequence[int], seqlen: int = 2048, seed: int = 42,
                       split: str | None = None) -> list[CalibrationSet]:
    """One calibration set per stage: ``sizes[k]`` rows drawn in a row from one seeded stream, each sample
    joined, tokenized and cut into full windows (``load_calibration(mode="reference")`` for one stage)."""
    texts = [t for t in read_texts(source, split) if t is not None]
    if max(sizes) > len(texts):
        raise DataError(f"{source}: the stages sample {list(sizes)} rows but the data has {len(texts)}")
    out = []
    for rows in draw_reference_rows(len(texts), sizes, seed):
        stream = _tokenize_stream([texts[i] for i in rows], tokenizer, source)
        n = stream.numel() // seqlen
        if n == 0:
            raise DataError(f"{source}: a stage's {len(rows)} rows give {stream.numel()} tokens, fewer than one "
                            f"window of {seqlen}; lower --seqlen or sample more rows")
        ids = stream[: n * seqlen].view(n, seqlen)
        out.append(CalibrationSet(ids, torch.ones_like(ids), source, seed))
    return out


def staged_search(model: nn.Module, calibrations: Sequence[CalibrationSet], settings: SearchSettings,
                  stages: Sequence[Stage] = ZAMBA2_STAGES, out_dir: str | Path | None = None,
                  progress: bool = True) -> list[SearchResult]:
    """Run ``stages`` one after the other, each with its calibration set; the last result's plan is the whole."""
    if len(calibrations) != len(stages):
        raise SearchError(f"{len(stages)} stages need {len(stages)} calibration sets, got {len(calibrations)}")
    base: list[dict[str, Any]] = list(settings.extra.get("base_plan") or [])
    results: list[SearchResult] = []
    first_step = 0
    for k, (stage, calib) in enumerate(zip(stages, calibrations)):
        extra = {**settings.extra, "base_plan": base}
        stage_settings = dataclasses.replace(settings, units=stage.units, steps=stage.steps, extra=extra)
        stage_dir = Path(out_dir) / f"stage{k}_{stage.name}" if out_dir is not None else None
        result = search(model, calib, stage_settings, out_dir=stage_dir, progress=progress)
        if out_dir is not None and settings.reference_numerics:
            adapter = get_adapter(model)
            adapter.configure_search(extra)
            write_reference_files(result, Path(out_dir), adapter, first_step=first_step, target=stage.name,
                                  per_unit_log_target=True)
        first_step += len(result.steps)
        base = [u.to_dict() for u in result.plan]
        results.append(result)
    return results


__all__ = ["ZAMBA2_STAGES", "Stage", "stage_calibrations", "staged_search"]
