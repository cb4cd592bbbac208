"""Zero-shot accuracy through lm-eval, with the Mamba-Shedder reference's metric choice.

Task data comes from one of three places:
- ``"hub"``: lm-eval's stock task configs and the Hub datasets (needs a network);
- ``"bundled"``: the task configs shipped in ``hf_shedder/assets/tasks`` (they mirror lm-eval's,
  reading local jsonl) with the bundled hand-written slices (offline tests/demo; not benchmark data);
- a folder given as ``task_dir``: the same bundled configs reading ``<task>.jsonl`` from that folder
  (full local copies of the real datasets).
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any

import torch

from hf_shedder.data import require_special_tokens
from hf_shedder.errors import EvalDependencyError, TaskError

DEFAULT_TASKS = ("lambada_openai", "hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande", "openbookqa")
RESULTS_JSON = "eval_results.json"
RESULTS_CSV = "eval_results.csv"


def bundled_task_dir() -> str:
    return str(resources.files("hf_shedder").joinpath("assets", "tasks"))


def _require_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise EvalDependencyError(
            "zero-shot evaluation needs lm-eval, an optional extra: pip install 'hf_shedder[eval]'"
        ) from e
    return lm_eval, HFLM, TaskManager


def _offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_DATASETS_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    return bool(constants.HF_HUB_OFFLINE) or env


# Families whose reference script scores every task with plain ``acc`` (hybrid/Hymba-Pruning/prune.py:492-495).
ACC_ONLY_FAMILIES = frozenset({"hymba"})


def choose_metric(task: str, result: dict[str, Any], family: str | None = None) -> str:
    """The reference's choice: acc for arc_easy, else acc_norm where present, else acc (Mamba, Zamba2
    scripts, prune.py:268); Hymba's script uses acc for every task."""
    if task == "arc_easy" or family in ACC_ONLY_FAMILIES:
        return "acc"
    return "acc_norm" if "acc_norm,none" in result else "acc"


@dataclass
class TaskResults:
    """Per-task chosen metric (fraction in [0, 1]), lambada perplexity and the average over tasks."""

    scores: dict[str, float]
    metrics: dict[str, str]
    n_samples: dict[str, int]
    average: float
    lambada_ppl: float | None = None
    data_source: str = "hub"
    limit: int | float | None = None
    raw: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def tasks(self) -> list[str]:
        return list(self.scores)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TaskResults:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def csv_row(self) -> dict[str, Any]:
        # the reference's CSV columns: lambada ppl, each task in percent, average in percent
        row: dict[str, Any] = {"lambada_openai_ppl": self.lambada_ppl}
        row.update({t: round(100 * v, 2) for t, v in self.scores.items()})
        row["acc_avg"] = round(100 * self.average, 2)
        return row


def _atomic_write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _write_csv(path: str, rows: list[dict[str, Any]]) -> None:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    tmp = path + ".tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def save_eval_results(out_dir: str, entries: dict[str, dict[str, Any]]) -> tuple[str, str]:
    """Write ``eval_results.json`` and ``eval_results.csv`` (one row per entry, e.g. "base"/"pruned").

    Each entry: {"model": ..., "perplexity": PerplexityResult dict or None, "tasks": TaskResults dict or None}.
    """
    os.makedirs(out_dir, exist_ok=True)
    json_path, csv_path = os.path.join(out_dir, RESULTS_JSON), os.path.join(out_dir, RESULTS_CSV)
    rows = []
    for label, entry in entries.items():
        row: dict[str, Any] = {"label": label, "model": entry.get("model")}
        ppl = entry.get("perplexity")
        if ppl:
            row["ppl_source"], row["ppl"] = ppl.get("source"), ppl.get("ppl")
        tasks = entry.get("tasks")
        if tasks:
            row.update(TaskResults.from_dict(tasks).csv_row())
        rows.append(row)
    _atomic_write(json_path, json.dumps(entries, indent=2, default=str))
    _write_csv(csv_path, rows)
    return json_path, csv_path


def _family(model: torch.nn.Module) -> str | None:
    """The adapter family of ``model`` (None when no adapter knows it)."""
    from ..arch import get_adapter

    try:
        return get_adapter(model).family
    except Exception:  # an unknown architecture scores with the Mamba scripts' rule
        return None


def summarize(results: dict[str, dict[str, Any]], n_samples: dict[str, Any] | None = None,
              family: str | None = None) -> dict[str, Any]:
    """Chosen metric per task, lambada perplexity and average, from lm-eval's ``results`` dict."""
    scores, metrics, counts = {}, {}, {}
    lambada_ppl = None
    for task, res in results.items():
        if "acc,none" not in res:
            continue  # groups or tasks without accuracy
        metric = choose_metric(task, res, family)
        scores[task], metrics[task] = float(res[f"{metric},none"]), metric
        n = (n_samples or {}).get(task, {})
        counts[task] = int(n.get("effective", n.get("original", 0))) if isinstance(n, dict) else int(n or 0)
        if task == "lambada_openai" and "perplexity,none" in res:
            lambada_ppl = float(res["perplexity,none"])
    average = sum(scores.values()) / len(scores) if scores else float("nan")
    return {"scores": scores, "metrics": metrics, "n_samples": counts, "average": average, "lambada_ppl": lambada_ppl}


def evaluate_tasks(
    model: torch.nn.Module,
    tokenizer,
    tasks: list[str] | tuple[str, ...] = DEFAULT_TASKS,
    batch_size: int | str = 8,
    limit: int | float | None = None,
    task_dir: str | None = None,
    source: str | None = None,
    max_length: int | None = None,
    bootstrap_iters: int = 0,
) -> TaskResults:
    """Zero-shot lm-eval on ``tasks`` with ``HFLM(pretrained=model, tokenizer=tokenizer)``.

    ``source``: "hub", "bundled" or None (``task_dir`` if given, else bundled when offline, else hub).
    ``bootstrap_iters=0`` skips lm-eval's bootstrap standard errors (slow; not used by the reference's table).
    """
    lm_eval, HFLM, TaskManager = _require_lm_eval()
    tasks = [t.strip() for t in tasks if t.strip()]
    if not tasks:
        raise TaskError("no tasks given; e.g. --tasks " + ",".join(DEFAULT_TASKS))
    if source is None:
        source = "local" if task_dir else ("bundled" if _offline() else "hub")
    if source == "hub":
        task_manager = TaskManager()
        data_source = "hub"
    elif source in ("bundled", "local"):
        metadata = None
        data_source = "bundled"
        if task_dir:
            if not os.path.isdir(task_dir):
                raise TaskError(f"--task-dir {task_dir} is not a folder")
            missing = [t for t in tasks if not os.path.isfile(os.path.join(task_dir, f"{t}.jsonl"))]
            if missing:
                raise TaskError(
                    f"{task_dir} has no data for {', '.join(missing)}: expected <task>.jsonl files in the "
                    "tasks' original schema (see hf_shedder/assets/tasks/README.md)"
                )
            metadata = {"shedder_task_dir": os.path.abspath(task_dir)}
            data_source = os.path.abspath(task_dir)
        task_manager = TaskManager(include_path=bundled_task_dir(), include_defaults=False, metadata=metadata)
    else:
        raise TaskError(f"unknown task source {source!r}; use 'hub' or 'bundled' (or give task_dir)")

    unknown = [t for t in tasks if t not in task_manager.all_tasks]
    if unknown:
        where = "lm-eval" if source == "hub" else "the bundled offline configs"
        raise TaskError(
            f"unknown task(s) {', '.join(unknown)} for {where}; bundled offline tasks: {', '.join(DEFAULT_TASKS)}"
        )
    require_special_tokens(tokenizer, "zero-shot evaluation (lm-eval)")
    # every supported family is a causal LM: saying so spares lm-eval guessing from the (pruned) model type
    lm_kwargs: dict[str, Any] = {"batch_size": batch_size, "backend": "causal"}
    if max_length is not None:
        lm_kwargs["max_length"] = max_length
    from hf_shedder.log_filters import install as drop_unactionable_warnings

    drop_unactionable_warnings()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, **lm_kwargs)
    try:
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks,
            task_manager=task_manager,
            limit=limit,
            log_samples=False,
            bootstrap_iters=bootstrap_iters,
        )
    except (ConnectionError, OSError) as e:
        raise TaskError(
            f"lm-eval could not load the task data ({type(e).__name__}: {e}); offline, use the bundled "
            "configs (source='bundled') or point --task-dir at local <task>.jsonl files"
        ) from e
    results = out["results"]
    summary = summarize(results, out.get("n-samples"), _family(model))
    missing = [t for t in tasks if t not in summary["scores"]]
    if missing:
        raise TaskError(f"lm-eval returned no accuracy for {', '.join(missing)}")
    raw = {t: {k: v for k, v in results[t].items() if isinstance(v, (int, float))} for t in tasks}
    return TaskResults(data_source=data_source, limit=limit, raw=raw, **summary)
