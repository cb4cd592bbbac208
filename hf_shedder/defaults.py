"""Default values and choices that the command line shows in ``--help``.

They live here, in a module that imports neither torch nor transformers, so that ``hf-shedder --help`` and
argument errors come back at once; the modules that use them (data, search settings, recovery) import them
from here.
"""

from __future__ import annotations

from typing import Any

# Hub datasets as the Mamba-Shedder reference loads them (utils.get_dataset), with the split it
# calibrates/evaluates on. The reference reads the "test" split for both; c4 has no test split.
HUB_DATASETS: dict[str, dict[str, Any]] = {
    "alpaca": {"path": "tatsu-lab/alpaca", "name": None, "split": "test", "column": "text"},
    "wikitext2": {"path": "Salesforce/wikitext", "name": "wikitext-2-raw-v1", "split": "test", "column": "text"},
    "ptb": {"path": "ptb_text_only", "name": "penn_treebank", "split": "test", "column": "sentence"},
    "c4": {
        "path": "allenai/c4",
        "name": None,
        "data_files": {
            "train": "en/c4-train.00000-of-01024.json.gz",
            "validation": "en/c4-validation.00000-of-00008.json.gz",
        },
        "split": "validation",
        "column": "text",
    },
}
BUNDLED = {"bundled": "calibration.txt", "bundled-validation": "validation.txt"}
LOCAL_SUFFIXES = (".txt", ".json", ".jsonl")


def valid_sources() -> list[str]:
    """Names of the calibration/evaluation sources (besides local files)."""
    return [*HUB_DATASETS, *BUNDLED]


# Search settings with a fixed set of values (checked again by SearchSettings).
NORMALIZE_CHOICES = (None, "params")
CALIBRATION_MODES = ("windows", "reference")  # see data.load_calibration
SPLIT_CHOICES = ("batches", "candidates")

# Recovery: the reference's data and settings (Mamba-Shedder README + recovery scripts).
DEFAULT_DATA = "yahma/alpaca-cleaned"
REFERENCE_SETTINGS: dict[str, Any] = {
    "num_train_epochs": 1,
    "per_device_train_batch_size": 32,
    "gradient_accumulation_steps": 1,
    "full_ft_learning_rate": 5e-5,
    "warmup_steps": 100,
    "max_length": 256,
    "val_size": 2000,
    "seed": 42,
}
LORA_LEARNING_RATE = 3e-4
LORA_DEFAULTS: dict[str, Any] = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "bias": "none"}
