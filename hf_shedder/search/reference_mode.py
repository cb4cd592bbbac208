"""``--exact-reference``: the numbers, calibration and side files of the Mamba-Shedder reference scripts.

The accelerated search already picks the reference's plan; this module is about reproducing its
*numbers* (IntelLabs/Hardware-Aware-Automated-Machine-Learning, folder ``Mamba-Shedder/``; line numbers
in docs/reference_parity.md):

* the model runs in fp16 (``prune.py:155``), at batch 2 and 2048 tokens per window (``prune.py:170-175``),
  Hymba at batch 4 and 1024 tokens (``hybrid/Hymba-Pruning/prune.py:306-311``);
* cross-entropy is computed on the fp16 logits and only then cast to fp32 (``utils.py:72``); per sample
  the masked mean is taken in fp32, perplexity is ``exp`` of the fp32 mean of those means (``utils.py:74-79``);
* targets equal to the pad id are ignored only ``if pad_token_id:`` (``utils.py:52-55``), so id 0 ignores
  nothing. The pad id is the tokenizer's eos (Mamba, Mamba-2, Zamba2) or ``config.pad_token_id`` (Hymba);
* calibration rows are drawn with the global ``random.sample`` after ``set_seed(42)`` (``prune.py:145,169``),
  which seeds the module with ``random.seed(42)``; Zamba2's staged search draws three samples in a row
  from that one stream (``hybrid/Zamba2-Pruning/prune_hybrid.py:300-320``);
* every step writes ``pruned_model_configs/config.{target}.{step}.json`` and the run keeps ``log.json``
  (``prune.py:209-223``).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..units import Plan, atomic_write_json

if TYPE_CHECKING:
    from .engine import SearchResult

REFERENCE_CONFIG_DIR = "pruned_model_configs"
REFERENCE_LOG = "log.json"
CE_DTYPE = torch.float16  # the reference model's dtype, hence its logits' (prune.py:155)
_NO_IGNORE = -100  # torch's default ignore_index: no real target equals it (utils.py:55, 74)


@dataclass(frozen=True)
class ReferenceRecipe:
    """How one family's reference script measures a candidate."""

    dtype: str = "float16"
    batch_size: int = 2
    seqlen: int = 2048
    pad_from: str = "eos"  # "eos": tokenizer.eos_token_id; "config": model.config.pad_token_id
    stages: int = 1  # calibration samples drawn in a row (Zamba2's staged script: 3)


RECIPES: dict[str, ReferenceRecipe] = {
    "mamba": ReferenceRecipe(),
    "mamba2": ReferenceRecipe(),
    "zamba2": ReferenceRecipe(stages=3),
    "hymba": ReferenceRecipe(batch_size=4, seqlen=1024, pad_from="config"),
}


def recipe_for(family: str) -> ReferenceRecipe:
    """The reference's settings for ``family`` (families without a reference script get Mamba's)."""
    return RECIPES.get(family, ReferenceRecipe())


def reference_pad_id(recipe: ReferenceRecipe, tokenizer: Any, config: Any) -> int | None:
    """The id the reference passes as ``pad_token_id`` (before its truthiness test)."""
    if recipe.pad_from == "config":
        return getattr(config, "pad_token_id", None)
    return getattr(tokenizer, "eos_token_id", None)


def reference_ignore_id(pad_token_id: int | None) -> int | None:
    """``if pad_token_id:`` (utils.py:52): a falsy id (None or 0) ignores nothing."""
    return pad_token_id if pad_token_id else None


def reference_sample_means(logits: torch.Tensor, input_ids: torch.Tensor, ignore_id: int | None) -> list[float]:
    """Per-sample mean NLL as utils.evaluate_ppl computes it: CE on fp16 logits, cast to fp32, masked fp32 mean.

    A model run in fp32 (CPU) has its logits rounded to fp16 first, which is what the reference's fp16
    model would hand to the loss at these logits.
    """
    index = _NO_IGNORE if ignore_id is None else ignore_id
    labels = input_ids[:, 1:].to(logits.device)
    nll = F.cross_entropy(logits[:, :-1, :].to(CE_DTYPE).permute(0, 2, 1), labels, reduction="none",
                          ignore_index=index).float()
    mask = labels != index
    means = (nll * mask).sum(dim=1) / mask.sum(dim=1)
    return [float(v) for v in means.cpu()]


def reference_mean_ppl(values: Sequence[float | None]) -> tuple[float, float]:
    """fp32 mean of the per-sample means and ``exp`` of it in fp32 (utils.py:78-79, 90)."""
    kept = torch.tensor([v for v in values if v is not None], dtype=torch.float32)
    mean = kept.mean()
    return float(mean), float(torch.exp(mean))


def draw_reference_rows(n_rows: int, sizes: Sequence[int], seed: int = 42) -> list[list[int]]:
    """Row indices of each calibration stage, as ``random.sample`` after ``set_seed(seed)`` draws them.

    ``set_seed`` calls ``random.seed(seed)``; a private ``random.Random(seed)`` walks the same stream
    without touching the caller's global state.
    """
    rng = random.Random(seed)
    return [rng.sample(range(n_rows), k) for k in sizes]


def reference_overrides(family: str, tokenizer: Any, config: Any, device: str) -> dict[str, Any]:
    """``SearchSettings`` fields ``--exact-reference`` fixes for ``family``: the plain loop, the reference's
    numerics, batch size, window length, row sampling and ignore rule; fp16 where the reference runs
    (CUDA; on CPU the model keeps its dtype and only the logits are rounded to fp16 for the loss)."""
    recipe = recipe_for(family)
    return {
        "exact_reference": True, "reference_numerics": True, "early_abandon": False,
        "batch_size": recipe.batch_size, "seqlen": recipe.seqlen, "calibration_mode": "reference",
        "ignore_token_id": reference_ignore_id(reference_pad_id(recipe, tokenizer, config)),
        "dtype": recipe.dtype if str(device).startswith("cuda") else None,
    }


# ----------------------------------------------------------------------------- side files


def _target_name(kinds: Sequence[str], names: dict[str, str]) -> str:
    return ",".join(names.get(k, k) for k in kinds)


def write_reference_files(result: SearchResult, out_dir: Path, adapter: Any, extra_log: dict[str, Any] | None = None,
                          first_step: int = 0, target: str | None = None,
                          per_unit_log_target: bool = False) -> list[Path]:
    """``pruned_model_configs/config.{target}.{step}.json`` per step and ``log.json`` as the reference writes them.

    ``adapter.reference_step_file(plan)`` gives the file content (the family's format); ``target`` is the
    reference's ``--prune_target`` (default: from the searched unit kinds); ``first_step`` numbers the
    steps of a later stage of a staged search, whose plans start from ``adapter.empty_plan()`` (the stages
    before). ``per_unit_log_target``: log.json names each step's unit kind, as Zamba2's staged script
    (``pruning_target``: mamba_block / mha / mlp in its block stage), not the file's target.
    """
    cfg_dir = out_dir / REFERENCE_CONFIG_DIR
    cfg_dir.mkdir(parents=True, exist_ok=True)
    target = target or _target_name(result.settings.units, adapter.reference_target_names)
    log_path = out_dir / REFERENCE_LOG
    log: dict[str, Any] = json.loads(log_path.read_text()) if log_path.is_file() and first_step else {}
    log.setdefault("args", {"settings": result.settings.to_dict(), **(extra_log or {})})
    log["total_params"] = result.base_params
    results = [r for r in log.get("pruning_results", []) if r["step"] < first_step]
    written = []
    plan = adapter.empty_plan()
    for st in result.steps:
        plan = plan.extended(Plan.from_dict({"units": [st["unit"]]}).units[0])
        step = first_step + st["step"]
        path = cfg_dir / f"config.{target}.{step}.json"
        atomic_write_json(path, adapter.reference_step_file(plan))
        written.append(path)
        unit = plan.units[-1]
        logged = adapter.reference_target_names.get(unit.kind, unit.kind) if per_unit_log_target else target
        results.append({"step": step, adapter.reference_log_target_key: logged, "importance": st["ppl"],
                        "config_save_to": str(path)})
    log["pruning_results"] = results
    log["num_evals"] = log.get("num_evals", 0) * bool(first_step) + sum(len(s["candidates"]) for s in result.steps)
    atomic_write_json(log_path, log)
    return written


__all__ = [
    "RECIPES", "REFERENCE_CONFIG_DIR", "REFERENCE_LOG", "ReferenceRecipe", "draw_reference_rows", "recipe_for",
    "reference_ignore_id", "reference_mean_ppl", "reference_overrides", "reference_pad_id", "reference_sample_means",
    "write_reference_files",
]
