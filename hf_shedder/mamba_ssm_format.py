"""mamba-ssm checkpoints in and out: the paper's own format.

In: a folder or hub repository whose ``config.json`` is mamba-ssm's (``d_model``, ``n_layer``, ``ssm_cfg``...)
and whose weights are ``pytorch_model.bin`` (what ``MambaLMHeadModel.save_pretrained`` writes) or
``model.safetensors`` becomes a Transformers ``MambaForCausalLM`` / ``Mamba2ForCausalLM`` in memory. The
pickle is read with ``torch.load(weights_only=True)``: tensors only, nothing else is unpickled.

Out: a pruned Mamba / Mamba-2 whose plan removes whole blocks is written as a standard mamba-ssm
checkpoint with fewer layers, which stock ``MambaLMHeadModel.from_pretrained`` loads (and serves with
CUDA-graph decode). The key and config mapping lives in :mod:`hf_shedder.arch.mamba_ssm_layout`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from .arch import get_adapter
from .arch.mamba_ssm_layout import (
    hf_config_from_mamba_ssm,
    is_mamba_ssm_config,
    mamba_ssm_config_from_hf,
    state_dict_to_hf,
    state_dict_to_mamba_ssm,
)
from .errors import CheckpointError, PlanError

FORMAT = "mamba_ssm"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "pytorch_model.bin"  # the only weights file mamba-ssm's from_pretrained reads
WEIGHT_FILES = ("model.safetensors", WEIGHTS_NAME)  # read in this order of preference
# What exports can hold plans that a mamba-ssm checkpoint cannot (SSM removal, heads, channels).
OTHER_EXPORTS = "export=None (hf_shedder), 'remote_code' (loads without hf_shedder via trust_remote_code)"

__all__ = ["FORMAT", "is_mamba_ssm_config", "load_mamba_ssm", "mamba_ssm_hf_config", "read_config_json",
           "save_mamba_ssm"]


def offline_message(name: str) -> str:
    return (f"cannot fetch {name!r} (no network, or not a model on the Hub). Download it where a network is "
            f"available (e.g. `hf download {name} --local-dir DIR`) and pass the local directory.")


def _hub_file(repo_id: str, filename: str) -> str | None:
    """Path of ``filename`` in hub repo ``repo_id`` (cached or downloaded); None if the repo has no such file.
    Offline and not cached: CheckpointError."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return hf_hub_download(repo_id, filename)
    except EntryNotFoundError:
        return None
    except LocalEntryNotFoundError as e:  # offline, and not in the cache
        raise CheckpointError(offline_message(repo_id)) from e
    except Exception as e:  # unknown repo, bad name, connection errors
        raise CheckpointError(f"{offline_message(repo_id)} ({type(e).__name__})") from e


def _file(name_or_path: str, filename: str) -> str | None:
    if os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, filename)
        return path if os.path.isfile(path) else None
    return _hub_file(name_or_path, filename)


def read_config_json(name_or_path: str) -> dict[str, Any] | None:
    """The parsed ``config.json`` of a folder or hub repo; None if it cannot be read (the Transformers loader
    then reports why)."""
    try:
        path = _file(name_or_path, CONFIG_NAME)
    except CheckpointError:
        return None
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return raw if isinstance(raw, dict) else None


def mamba_ssm_hf_config(raw: dict[str, Any], where: str = CONFIG_NAME) -> Any:
    """The Transformers config (``MambaConfig`` / ``Mamba2Config``) of a parsed mamba-ssm ``config.json``."""
    from transformers import AutoConfig

    model_type, kwargs = hf_config_from_mamba_ssm(raw, where)
    return AutoConfig.for_model(model_type, **kwargs)


def read_weights(name_or_path: str) -> dict[str, torch.Tensor]:
    """The state dict of a mamba-ssm checkpoint, read safely (safetensors, or a tensors-only pickle)."""
    unreachable: CheckpointError | None = None
    for filename in WEIGHT_FILES:
        try:
            path = _file(name_or_path, filename)
        except CheckpointError as e:  # offline, this file not cached: the other one may be
            unreachable, path = e, None
        if path is None:
            continue
        if filename.endswith(".safetensors"):
            from safetensors.torch import load_file

            try:
                return load_file(path)
            except Exception as e:
                raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
        try:
            try:  # memory-mapped: a multi-GB checkpoint is not read into memory twice
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) container
        except Exception as e:
            # weights_only refuses any object that is not a tensor/container, so a pickle that would run code
            # (or build arbitrary classes) lands here instead of being executed
            raise CheckpointError(
                f"{path} cannot be loaded safely: it is not a plain tensor state dict readable with "
                f"torch.load(weights_only=True) ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
                "hf_shedder unpickles nothing else; convert it to model.safetensors where you trust it"
            ) from e
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{path} does not hold a flat state dict of tensors")
        return state
    if unreachable is not None:
        raise unreachable
    raise CheckpointError(f"{name_or_path} has a mamba-ssm config.json but no {' or '.join(WEIGHT_FILES)}")


def load_mamba_ssm(name_or_path: str, raw_config: dict[str, Any] | None = None, dtype: Any = None,
                   **kwargs: Any) -> Any:
    """A mamba-ssm checkpoint as a Transformers ``MambaForCausalLM`` / ``Mamba2ForCausalLM``.

    ``dtype=None`` keeps the stored dtype; ``kwargs`` go to ``from_pretrained`` (e.g. ``device_map``).
    """
    from .modeling import base_model_class

    raw = raw_config if raw_config is not None else read_config_json(name_or_path)
    if raw is None or not is_mamba_ssm_config(raw):
        raise CheckpointError(f"{name_or_path} has no mamba-ssm config.json")
    where = f"{name_or_path}/{CONFIG_NAME}"
    config = mamba_ssm_hf_config(raw, where)
    state = state_dict_to_hf(read_weights(name_or_path), config.tie_word_embeddings, where)
    _check_keys(config, state, name_or_path)
    if dtype is None or dtype == "auto":
        floats = [v.dtype for v in state.values() if v.is_floating_point()]
        dtype = floats[0] if floats else torch.float32
    config._name_or_path = name_or_path  # noqa: SLF001  (recorded as the base model in the provenance)
    model = base_model_class(config).from_pretrained(None, config=config, state_dict=state, dtype=dtype, **kwargs)
    model.config._name_or_path = name_or_path  # noqa: SLF001
    return model


def _check_keys(config: Any, state: dict[str, torch.Tensor], where: str) -> None:
    """Every tensor the Transformers class expects is there with its shape, and nothing else."""
    from .modeling import base_model_class

    with torch.device("meta"):
        skeleton = base_model_class(config)(config)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k])
    if missing or unexpected or wrong:
        parts = [f"missing {missing[:5]}" if missing else "", f"unexpected {unexpected[:5]}" if unexpected else "",
                 "shape of " + ", ".join(f"{k} {tuple(state[k].shape)} vs config {expected[k]}" for k in wrong[:5])
                 if wrong else ""]
        raise CheckpointError(f"the weights in {where} do not match its mamba-ssm config.json: "
                              + "; ".join(p for p in parts if p))


def save_mamba_ssm(model: Any, directory: str | os.PathLike[str]) -> None:
    """Write a block-pruned (or unpruned) Mamba / Mamba-2 as a mamba-ssm checkpoint.

    ``model`` is a :class:`~hf_shedder.PrunedMambaForCausalLM` or a Transformers Mamba/Mamba-2 causal LM.
    Plans other than whole-block removal are refused: mamba-ssm's blocks all have the same shape.
    """
    from .modeling import PrunedMambaForCausalLM
    from .records import PLAN_FILE, PROVENANCE_FILE
    from .units import atomic_write_json

    base = model.model if isinstance(model, PrunedMambaForCausalLM) else model
    plan = model.config.get_plan() if isinstance(model, PrunedMambaForCausalLM) else None
    if plan is not None and not get_adapter(base).block_only_export_supported(plan):
        raise PlanError(
            f"a mamba-ssm checkpoint cannot express this plan ({plan.summary()}): mamba-ssm's blocks all have the "
            f"same shape, so only whole-block removal maps onto it. Save it with {OTHER_EXPORTS}; 'plain' holds "
            "block-only plans as a Transformers checkpoint"
        )
    try:
        config = mamba_ssm_config_from_hf(base.config)
    except PlanError as e:
        raise PlanError(f"cannot export {type(base).__name__} to mamba-ssm: {e}. Save it with {OTHER_EXPORTS} "
                        "or 'plain'") from None
    state = {k: v.detach().to("cpu").contiguous() for k, v in base.state_dict().items()}
    state = state_dict_to_mamba_ssm(state, config["tie_embeddings"])
    os.makedirs(directory, exist_ok=True)
    torch.save(state, os.path.join(directory, WEIGHTS_NAME))
    with open(os.path.join(directory, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=4)
    if plan is not None:  # mamba-ssm's config has no room for them; the loader ignores other files
        plan.save(os.path.join(directory, PLAN_FILE))
        atomic_write_json(os.path.join(directory, PROVENANCE_FILE), model.config.provenance or {})
