"""Offline data loading for hf_shedder's bundled lm-eval task configs.

The YAML files next to this module mirror lm-eval's own task definitions (same prompts,
targets, choices and metrics) but read ``<task>.jsonl`` from a local folder instead of the
Hub: the bundled ``data/`` folder by default, or the folder named by the ``shedder_task_dir``
metadata key (``hf_shedder.evaluation.harness.evaluate_tasks(task_dir=...)``).
Document processing is delegated to lm-eval's own functions, so it cannot drift.
"""

from __future__ import annotations

import json
import os
from typing import Any

import datasets

BUNDLED_DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def load_local(**kwargs: Any) -> datasets.DatasetDict:
    """``custom_dataset`` hook: the eval split of one task read from ``<task>.jsonl``."""
    task = kwargs["shedder_task"]
    split = kwargs["shedder_split"]
    data_dir = kwargs.get("shedder_task_dir") or BUNDLED_DATA_DIR
    path = os.path.join(data_dir, f"{task}.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no local data for task {task!r}: expected {path} (one JSON object per line, "
            "in the task's original schema)"
        )
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        raise ValueError(f"{path} holds no rows")
    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})


def hellaswag_process_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    from lm_eval.tasks.hellaswag.utils import process_docs

    return process_docs(dataset)


def winogrande_doc_to_text(doc: dict) -> int:
    from lm_eval.tasks.winogrande.preprocess_winogrande import doc_to_text

    return doc_to_text(doc)


def winogrande_doc_to_target(doc: dict) -> str:
    from lm_eval.tasks.winogrande.preprocess_winogrande import doc_to_target

    return doc_to_target(doc)


def winogrande_doc_to_choice(doc: dict) -> list[str]:
    from lm_eval.tasks.winogrande.preprocess_winogrande import doc_to_choice

    return doc_to_choice(doc)
