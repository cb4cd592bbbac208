"""Loading base and pruned models from a directory or a hub name, with clear offline errors.

:func:`checkpoint_format` is the one place that tells a Transformers checkpoint (hf_shedder's own
included) from a mamba-ssm one; :func:`load_model` and :func:`load_config` follow its answer.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .errors import CheckpointError
from .modeling import PrunedMambaForCausalLM, base_model_class, check_checkpoint_dir
from .runtime import enable_fast_path

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "auto": "auto"}


def parse_dtype(name: str | None) -> Any:
    if name is None:
        return None
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose from {sorted(DTYPES)}") from None


TRANSFORMERS = "transformers"


def compute_dtype(requested: Any, device: Any) -> Any:
    """The dtype to load a model in for computing on ``device`` when ``--dtype`` is ``requested``.

    Unset means "as stored", except on CPU: there bfloat16/float16 run slower than float32 and round, so
    the calibration perplexity of ``prune``, ``eval`` and the Python API (float32) would disagree.
    """
    if requested is not None or device is None:
        return requested
    return torch.float32 if torch.device(device).type == "cpu" else None


def stored_dtype(name_or_path: str) -> Any:
    """The dtype a checkpoint's config says its weights are stored in (None if it does not say)."""
    dtype = getattr(load_config(name_or_path), "dtype", None)
    return DTYPES.get(dtype) if isinstance(dtype, str) else dtype


def _check_location(name_or_path: str) -> None:
    if os.path.isdir(name_or_path):
        check_checkpoint_dir(name_or_path)
    elif os.path.sep in name_or_path and name_or_path.startswith((".", "/")):
        raise CheckpointError(f"model directory not found: {name_or_path}")


def checkpoint_format(name_or_path: str) -> str:
    """``"mamba_ssm"`` for a mamba-ssm checkpoint (folder or hub repo), else ``"transformers"``.

    A config that cannot be read counts as Transformers: its loader then says why (offline, missing, corrupt).
    """
    from . import mamba_ssm_format

    raw = mamba_ssm_format.read_config_json(name_or_path)
    return mamba_ssm_format.FORMAT if raw is not None and mamba_ssm_format.is_mamba_ssm_config(raw) else TRANSFORMERS


def load_config(name_or_path: str) -> Any:
    """The Transformers config of any checkpoint hf_shedder loads (a mamba-ssm one converted), without weights."""
    from transformers import AutoConfig

    import hf_shedder  # noqa: F401  (registers the Auto classes)

    from . import mamba_ssm_format

    _check_location(name_or_path)
    if checkpoint_format(name_or_path) == mamba_ssm_format.FORMAT:
        return mamba_ssm_format.mamba_ssm_hf_config(mamba_ssm_format.read_config_json(name_or_path), name_or_path)
    try:
        return AutoConfig.from_pretrained(name_or_path)
    except OSError as e:
        if os.path.isdir(name_or_path):
            raise CheckpointError(f"cannot read the config in {name_or_path}: {e}") from e
        raise CheckpointError(mamba_ssm_format.offline_message(name_or_path)) from e


def vocab_size_of(config: Any) -> int | None:
    """Rows of the input embedding a config describes (a pruned model's: its base's)."""
    base = config.get_base_config() if hasattr(config, "get_base_config") else config
    size = getattr(base, "vocab_size", None)
    return int(size) if size else None


def load_model(name_or_path: str, dtype: Any = None, device: str | None = None, **kwargs: Any) -> Any:
    """``AutoModelForCausalLM.from_pretrained`` with hf_shedder registered and readable errors; a mamba-ssm
    checkpoint is converted to its Transformers class in memory."""
    from . import mamba_ssm_format

    _check_location(name_or_path)
    if checkpoint_format(name_or_path) == mamba_ssm_format.FORMAT:
        model = mamba_ssm_format.load_mamba_ssm(name_or_path, dtype=dtype, **kwargs)
    else:
        model = _from_pretrained(name_or_path, dtype, **kwargs)
    if device:
        model.to(device)
    if not isinstance(model, PrunedMambaForCausalLM):  # a pruned model enables it on its inner model
        enable_fast_path(model)
    return model.eval()


def _from_pretrained(name_or_path: str, dtype: Any, **kwargs: Any) -> Any:
    from transformers import AutoModelForCausalLM

    import hf_shedder  # noqa: F401  (registers the Auto classes)

    from . import mamba_ssm_format

    try:
        return AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **kwargs)
    except OSError as e:
        if os.path.isdir(name_or_path):
            raise CheckpointError(f"cannot load the model in {name_or_path}: {e}") from e
        raise CheckpointError(mamba_ssm_format.offline_message(name_or_path)) from e
    except Exception as e:  # safetensors/JSON decode errors on a corrupt checkpoint
        if os.path.isdir(name_or_path) and type(e).__name__ in ("SafetensorError", "JSONDecodeError", "HeaderTooLarge"):
            raise CheckpointError(f"the checkpoint in {name_or_path} is corrupt: {e}") from e
        raise


# Files that carry a vocabulary. Without one, recent transformers builds an empty tokenizer from the
# model's config instead of failing, which would silently tokenize every text to nothing.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")


def has_tokenizer_files(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` holds a saved tokenizer (not just a model)."""
    return any(os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_FILES)


def plausible_tokenizer(tok: Any) -> bool:
    """A tokenizer that turns ordinary text into at least one ordinary (non-special) token."""
    try:
        ids = tok("The quick brown fox.", add_special_tokens=False)["input_ids"]
    except Exception:
        return False
    special = set(getattr(tok, "all_special_ids", []) or [])
    return any(i not in special for i in ids)


def load_tokenizer_for(name_or_path: str) -> Any | None:
    """The model's own tokenizer if it has a usable one, else None (callers fall back to the bundled one)."""
    from transformers import AutoTokenizer

    if os.path.isdir(name_or_path) and not has_tokenizer_files(name_or_path):
        return None
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    except Exception:
        return None
    return tok if plausible_tokenizer(tok) else None


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def skeleton_parameters(base_config: Any, plan: Any = None) -> int:
    """Parameter count of the base architecture with ``plan`` applied, built on the meta device."""
    import copy

    from .arch import get_adapter

    base_config = copy.deepcopy(base_config)  # apply_plan rewrites layer counts on the config it is given
    with torch.device("meta"):
        model = base_model_class(base_config)(base_config)
    if plan is not None and len(plan):
        get_adapter(model).apply_plan(plan)
    return count_parameters(model)
