"""LoRA recovery tuning of a pruned model (PEFT + ``transformers.Trainer``), merged back into its weights.

As the Mamba-Shedder reference recovers its pruned models: Alpaca-style instruction data
(``yahma/alpaca-cleaned``), the Alpaca prompt template, prompts cut at 256 tokens with an EOS added,
the loss on the response tokens only, one epoch, AdamW with a linear schedule and 100 warm-up steps
(the reference fine-tunes fully at lr 5e-5; for LoRA we default to 3e-4, r=8, alpha=16, dropout 0.05).
LoRA targets come from the model family's adapter, so they are modules that survive pruning. The
adapter is merged with ``merge_and_unload()`` and the model is saved so that it still loads with
``AutoModelForCausalLM.from_pretrained`` as the same pruned model (same plan; the recovery settings are
added to the provenance). ``Trainer`` checkpoints live in ``<output_dir>/checkpoints`` with a record of
the run's settings (``recovery_run.json``); a rerun resumes from the last one only when its settings
match that record.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import torch
import transformers
from torch import nn

from .arch import get_adapter
from .data import read_json_rows, render_alpaca, require_special_tokens
from .defaults import DEFAULT_DATA, LORA_DEFAULTS, LORA_LEARNING_RATE, REFERENCE_SETTINGS  # noqa: F401
from .errors import DataError, RecoveryError
from .records import PLAN_FILE

BUNDLED_DATA = "bundled"
CHECKPOINT_SUBDIR = "checkpoints"
RUN_FILE = "recovery_run.json"  # beside the Trainer checkpoints: the settings they were trained with
_CHECKPOINT_RE = re.compile(r"^checkpoint-\d+$")
RECOVERY_FILE = "recovery.json"  # read by hf_shedder.hub for the model card
# Results of earlier stages that stay true after recovery; copied so the card of OUT can show them.
CARRIED_FILES = ("shedder_search.json", "trajectory.png", "trajectory.csv", "trajectory.json", "pruning_config.json")

# Module types PEFT's LoRA can wrap; listed when a requested target does not exist.
_LORA_TYPES = (nn.Linear, nn.Embedding, nn.Conv1d)


# ----------------------------------------------------------------------------- data


def bundled_data_file() -> str:
    return str(resources.files("hf_shedder").joinpath("assets", "recovery", "alpaca_tiny.jsonl"))


def load_instruction_rows(source: str = DEFAULT_DATA, split: str = "train") -> list[dict[str, Any]]:
    """Alpaca-style rows (``instruction``, ``input``, ``output``) from a hub dataset, a local file or
    ``"bundled"`` (the tiny hand-written file shipped for tests and the demo)."""
    if source == BUNDLED_DATA:
        return read_json_rows(bundled_data_file())
    if os.path.splitext(source)[1].lower() in (".json", ".jsonl") or os.path.exists(source):
        if not os.path.isfile(source):
            raise DataError(f"no such file: {source}")
        if os.path.splitext(source)[1].lower() not in (".json", ".jsonl"):
            raise DataError(f"{source}: recovery data must be a .json or .jsonl file of instruction rows")
        return read_json_rows(source)
    import datasets

    try:
        ds = datasets.load_dataset(source, split=split)
    except Exception as e:  # offline, unknown name, missing split: all look different
        first = str(e).splitlines()[0] if str(e) else ""
        raise DataError(
            f"cannot load the recovery data {source!r} ({type(e).__name__}: {first}). Offline, pass a local "
            "JSON/JSONL file of Alpaca rows ({\"instruction\", \"input\", \"output\"}) with --data FILE, or "
            "--data bundled for the tiny demo file"
        ) from e
    return [dict(r) for r in ds]


def usable_rows(rows: Sequence[Any]) -> list[dict[str, str]]:
    """Rows with a non-empty instruction and output (``input`` optional); others are dropped."""
    out = []
    for r in rows:
        if not isinstance(r, dict):
            continue
        ins, res = r.get("instruction"), r.get("output")
        if isinstance(ins, str) and ins.strip() and isinstance(res, str) and res.strip():
            inp = r.get("input")
            out.append({"instruction": ins, "input": inp if isinstance(inp, str) else "", "output": res})
    return out


def tokenize_rows(
    rows: Sequence[dict[str, str]], tokenizer: Any, max_length: int = 256, train_on_inputs: bool = False
) -> Any:
    """A ``datasets.Dataset`` of ``input_ids``/``attention_mask``/``labels``, reference style: prompt +
    response cut at ``max_length`` tokens, EOS appended when it fits, prompt tokens masked out of the
    loss (``-100``) unless ``train_on_inputs``."""
    import datasets

    if max_length < 2:
        raise DataError(f"max_length must be >= 2, got {max_length}")
    eos = tokenizer.eos_token_id
    feats: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    for row in rows:
        full = tokenizer(render_alpaca(row), truncation=True, max_length=max_length)["input_ids"]
        if eos is not None and len(full) < max_length and (not full or full[-1] != eos):
            full = [*full, eos]
        labels = list(full)
        if not train_on_inputs:
            prompt_len = len(tokenizer(render_alpaca({**row, "output": ""}), truncation=True,
                                       max_length=max_length)["input_ids"])
            labels = [-100] * prompt_len + labels[prompt_len:]
        if all(x == -100 for x in labels[1:]):
            continue  # the response was cut away entirely: nothing to learn from this row
        feats["input_ids"].append(full)
        feats["attention_mask"].append([1] * len(full))
        feats["labels"].append(labels)
    return datasets.Dataset.from_dict(feats)


def prepare_datasets(
    data: Any, tokenizer: Any, max_length: int = 256, val_size: int | float = 0, train_on_inputs: bool = False,
    seed: int = 42,
) -> tuple[Any, Any | None, dict[str, Any]]:
    """Train (and validation) datasets from a source name / file / list of rows; DataError if none is usable."""
    source = data if isinstance(data, str) else f"<{type(data).__name__} of rows>"
    rows = load_instruction_rows(data) if isinstance(data, str) else list(data)
    usable = usable_rows(rows)
    if not usable:
        raise DataError(
            f"{source}: no usable rows among {len(rows)}: each row needs a non-empty 'instruction' and 'output' "
            "(and optionally 'input'), as in yahma/alpaca-cleaned"
        )
    ds = tokenize_rows(usable, tokenizer, max_length=max_length, train_on_inputs=train_on_inputs)
    if len(ds) == 0:
        raise DataError(f"{source}: every response is cut away at max_length={max_length}; raise --seqlen")
    val = None
    if val_size:
        n_val = val_size if isinstance(val_size, int) else math.ceil(val_size * len(ds))
        if n_val >= len(ds):
            raise DataError(f"{source}: val_size {val_size} leaves no training rows ({len(ds)} usable)")
        split = ds.train_test_split(test_size=n_val, shuffle=True, seed=seed)
        ds, val = split["train"], split["test"]
    info = {"data": source, "rows_read": len(rows), "rows_used": len(ds), "val_rows": len(val) if val else 0}
    return ds, val, info


# ----------------------------------------------------------------------------- LoRA


def _family_model(model: nn.Module) -> nn.Module:
    """The model the family adapter understands: ``.model`` of a PrunedMambaForCausalLM."""
    from .modeling import PrunedMambaForCausalLM

    return model.model if isinstance(model, PrunedMambaForCausalLM) else model


def default_lora_targets(model: nn.Module) -> list[str]:
    return list(get_adapter(_family_model(model)).lora_target_modules())


def lora_capable_module_names(model: nn.Module) -> list[str]:
    """Leaf names (``in_proj``, ``out_proj`` ...) of the modules LoRA can adapt in ``model``."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if name and isinstance(m, _LORA_TYPES)})


def check_lora_targets(model: nn.Module, targets: Sequence[str]) -> None:
    """RecoveryError naming the available modules when a target matches no module (e.g. ``x_proj``
    after every SSM of a Mamba-1 model was removed)."""
    names = [name for name, m in model.named_modules() if name and isinstance(m, _LORA_TYPES)]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise RecoveryError(
            f"LoRA target module(s) {', '.join(missing)} not found in this model (pruning may have removed "
            f"them); modules LoRA can adapt here: {', '.join(lora_capable_module_names(model))}"
        )


def default_lora_config(model: nn.Module, targets: Sequence[str] | None = None, **overrides: Any) -> Any:
    from peft import LoraConfig

    settings = {**LORA_DEFAULTS, **overrides}
    return LoraConfig(target_modules=list(targets or default_lora_targets(model)), task_type="CAUSAL_LM", **settings)


def attach_lora(model: nn.Module, lora: Any = None) -> Any:
    """Wrap ``model`` in a PEFT LoRA model (``lora``: a ``LoraConfig``; default from the family adapter)."""
    from peft import get_peft_model

    lora = lora if lora is not None else default_lora_config(model)
    targets = lora.target_modules
    if isinstance(targets, str):  # a regex: PEFT matches it itself
        pass
    else:
        check_lora_targets(model, list(targets or []))
    available = lora_capable_module_names(model)  # before PEFT wraps anything
    for p in model.parameters():
        p.requires_grad_(False)
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False  # no generation cache during training (as the reference)
    try:
        return get_peft_model(model, lora)
    except ValueError as e:  # e.g. PEFT refusing a target the fused Mamba kernels read by weight (out_proj)
        raise RecoveryError(
            f"PEFT cannot put LoRA on {sorted(lora.target_modules) if not isinstance(targets, str) else targets}: "
            f"{e} Choose targets among: {', '.join(available)}"
        ) from e


# ----------------------------------------------------------------------------- training


def default_training_args(output_dir: str, full: bool = False, **overrides: Any) -> Any:
    """``TrainingArguments`` with the reference's recovery settings and the LoRA learning rate (``full``:
    the reference's full fine-tune learning rate, 5e-5)."""
    from transformers import TrainingArguments

    cuda = torch.cuda.is_available()
    settings: dict[str, Any] = {
        "output_dir": output_dir,
        "num_train_epochs": REFERENCE_SETTINGS["num_train_epochs"],
        "per_device_train_batch_size": REFERENCE_SETTINGS["per_device_train_batch_size"],
        "per_device_eval_batch_size": REFERENCE_SETTINGS["per_device_train_batch_size"],
        "gradient_accumulation_steps": REFERENCE_SETTINGS["gradient_accumulation_steps"],
        "learning_rate": REFERENCE_SETTINGS["full_ft_learning_rate"] if full else LORA_LEARNING_RATE,
        "warmup_steps": REFERENCE_SETTINGS["warmup_steps"],
        "lr_scheduler_type": "linear",
        "optim": "adamw_torch",
        "bf16": bool(cuda and torch.cuda.is_bf16_supported()),
        "dataloader_pin_memory": cuda,
        "logging_steps": 10,
        "save_strategy": "steps",
        "save_steps": 200,
        "save_total_limit": 2,
        "seed": REFERENCE_SETTINGS["seed"],
        "report_to": "none",
        # PrunedMambaForCausalLM.forward takes **kwargs, which hides the columns; ours are all model inputs
        "remove_unused_columns": False,
        "label_names": ["labels"],
    }
    settings.update(overrides)
    return TrainingArguments(**settings)


def build_trainer(peft_model: Any, tokenizer: Any, train_dataset: Any, eval_dataset: Any, args: Any) -> Any:
    from transformers import DataCollatorForSeq2Seq, Trainer

    args.remove_unused_columns = False  # see default_training_args
    args.label_names = ["labels"]  # not found from a **kwargs forward either; without it no eval loss
    # pads labels with -100 so padding never counts in the loss
    collator = DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, return_tensors="pt", padding=True)
    return Trainer(model=peft_model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                   data_collator=collator, processing_class=tokenizer)


def _last_checkpoint(folder: str) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(folder) if os.path.isdir(folder) else None


def _dataset_fingerprint(*parts: Any) -> str:
    """Hash of the exact token ids and labels (train, then validation), as trained on."""
    h = hashlib.sha256()
    for ds in parts:
        h.update(b"<none>" if ds is None else f"<{len(ds)}>".encode())
        if ds is None:
            continue
        for row in ds:
            h.update(json.dumps([row["input_ids"], row["labels"]]).encode())
    return h.hexdigest()[:16]


def run_identity(
    model: nn.Module, lora: Any, args: Any, data_fingerprint: str, max_length: int, train_on_inputs: bool,
    val_size: int | float,
) -> dict[str, Any]:
    """Everything a checkpoint's training depends on (flat, so that differences can be named): checkpoints
    are resumed only by a run whose identity is the same."""
    from .search.settings import model_identity

    model_id = model_identity(model)
    if lora is None:  # full fine-tune: every weight trains
        lora_fields: dict[str, Any] = {"method": "full"}
    else:
        targets = lora.target_modules
        lora_fields = {
            "lora_r": lora.r,
            "lora_alpha": lora.lora_alpha,
            "lora_dropout": lora.lora_dropout,
            "lora_bias": lora.bias,
            "target_modules": targets if isinstance(targets, str) else sorted(targets or []),
        }
    return {
        "model.architecture_sha": model_id["architecture_sha"],
        "model.weights_checksum": model_id["weights_checksum"],
        "model.dtype": model_id["dtype"],
        "data_fingerprint": data_fingerprint,
        "max_length": max_length,
        "train_on_inputs": train_on_inputs,
        "val_size": val_size,
        **lora_fields,
        "learning_rate": args.learning_rate,
        "lr_scheduler": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
        "warmup_steps": args.warmup_steps,
        "weight_decay": args.weight_decay,
        "optimizer": str(getattr(args.optim, "value", args.optim)),
        "epochs": args.num_train_epochs,
        "max_steps": args.max_steps,
        "batch_size": args.per_device_train_batch_size,
        "gradient_accumulation": args.gradient_accumulation_steps,
        "world_size": args.world_size,
        "precision": "bf16" if args.bf16 else ("fp16" if args.fp16 else "fp32"),
        "seed": args.seed,
    }


def _read_run(folder: str) -> dict[str, Any] | None:
    path = os.path.join(folder, RUN_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f).get("identity")
    except (json.JSONDecodeError, AttributeError):
        return None


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)]


def _choose_checkpoint(folder: str, resume: bool | str | None, overwrite: bool, identity: dict[str, Any]) -> str | None:
    """The checkpoint to resume from, or None to start afresh; RecoveryError (nothing written) when the
    checkpoints in ``folder`` belong to a run with other settings."""
    again = "pass --overwrite (overwrite=True) to delete them and start again"
    if isinstance(resume, str):
        if not os.path.isdir(resume):
            raise RecoveryError(f"checkpoint folder not found: {resume}")
        old = _read_run(os.path.dirname(os.path.abspath(resume)))
        if old is not None and _differences(old, identity):
            raise RecoveryError(f"{resume} was trained with other settings ({'; '.join(_differences(old, identity))})")
        return resume
    if overwrite:
        return None  # the old checkpoints are deleted once every check has passed
    last = _last_checkpoint(folder)
    if last is None:
        if resume:
            raise RecoveryError(f"resume requested but {folder} holds no Trainer checkpoint")
        return None
    if resume is False:
        raise RecoveryError(f"{folder} holds checkpoints of an earlier run ({os.path.basename(last)}); {again}")
    old = _read_run(folder)
    if old is None:
        raise RecoveryError(
            f"{folder} holds checkpoints ({os.path.basename(last)}) but no {RUN_FILE} recording the settings they "
            f"were trained with, so they cannot be resumed safely; {again}"
        )
    diffs = _differences(old, identity)
    if diffs:
        raise RecoveryError(
            f"{folder} holds checkpoints of a run with other settings ({'; '.join(diffs)}): rerun with the same "
            f"settings to resume it, or {again}"
        )
    return last


def _clear_checkpoints(folder: str) -> None:
    """Delete the Trainer checkpoints and the run record in ``folder`` (nothing else)."""
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if _CHECKPOINT_RE.match(name) and os.path.isdir(path):
            shutil.rmtree(path)
    if os.path.isfile(os.path.join(folder, RUN_FILE)):
        os.remove(os.path.join(folder, RUN_FILE))


def _remove_if_untrained(folder: str, output_dir: str, existed: dict[str, bool]) -> None:
    """After a failure before the first checkpoint: leave no checkpoint folder (or empty OUT) behind."""
    if _last_checkpoint(folder) is not None:
        return
    if not existed[folder]:
        shutil.rmtree(folder, ignore_errors=True)
    elif os.path.isfile(os.path.join(folder, RUN_FILE)):
        os.remove(os.path.join(folder, RUN_FILE))
    if not existed[output_dir] and os.path.isdir(output_dir) and not os.listdir(output_dir):
        os.rmdir(output_dir)


def mean_logged_loss(log_history: Sequence[dict[str, Any]], resumed_step: int = 0) -> tuple[float | None, int]:
    """Mean training loss over the logged steps and how many steps that is.

    Each logged ``loss`` is the mean over the steps since the previous log (after a resume: since the
    resumed step), so it is weighted by that many steps. Trainer's own ``training_loss`` divides the
    loss of this process's steps by all steps, resumed ones included, so it is wrong after a resume.
    """
    total, steps, prev = 0.0, 0, 0
    for h in log_history:
        if "loss" not in h:
            continue
        step = int(h["step"])
        start = resumed_step if prev < resumed_step < step else prev
        total += float(h["loss"]) * (step - start)
        steps += step - start
        prev = step
    return (total / steps if steps else None), steps


def merge_and_save(
    peft_model: Any,
    output_dir: str,
    tokenizer: Any = None,
    settings: dict[str, Any] | None = None,
    export: str | None = "remote_code",
    source_dir: str | None = None,
) -> nn.Module:
    """``merge_and_unload()`` and save into ``output_dir`` (staged, so a failure writes no model files).

    A pruned model keeps its plan; ``settings`` go to ``config.provenance["recovery"]`` and to
    ``recovery.json``. ``source_dir`` (the pruned model's folder) lends the results files that stay true.
    """
    from .modeling import PrunedMambaForCausalLM

    # a LoRA run merges its adapters; a full fine-tune trained the weights themselves
    model = peft_model.merge_and_unload() if hasattr(peft_model, "merge_and_unload") else peft_model
    if settings is not None:
        settings = _jsonable({k: v for k, v in settings.items() if v is not None})
    if getattr(model.config, "use_cache", None) is False:
        model.config.use_cache = True
    os.makedirs(output_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".recover-", dir=output_dir)
    try:
        if isinstance(model, PrunedMambaForCausalLM):
            if settings is not None:
                model.config.provenance = {**model.config.provenance, "recovery": settings}
            model.save_pretrained(staging, export=export)
            model.plan.save(os.path.join(staging, PLAN_FILE))
        else:
            model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if settings is not None:
            with open(os.path.join(staging, RECOVERY_FILE), "w") as f:
                json.dump(settings, f, indent=2)
                f.write("\n")
        if source_dir and os.path.isdir(source_dir):
            for name in CARRIED_FILES:
                if os.path.isfile(os.path.join(source_dir, name)):
                    shutil.copy2(os.path.join(source_dir, name), os.path.join(staging, name))
        for name in os.listdir(staging):
            os.replace(os.path.join(staging, name), os.path.join(output_dir, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return model


LORA_METHOD = "LoRA (PEFT), merged"
FULL_METHOD = "full fine-tune"


def _lora_settings(cfg: Any) -> dict[str, Any]:
    targets = cfg.target_modules
    return {"lora_r": cfg.r, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
            "target_modules": sorted(targets) if not isinstance(targets, str) else targets}


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


@dataclass
class RecoveryResult:
    """What a recovery run did: the merged model, the loss curve and the settings written to disk."""

    output_dir: str
    model: nn.Module = field(repr=False)
    losses: list[tuple[int, float]]
    settings: dict[str, Any]
    eval_loss_before: float | None = None
    eval_loss_after: float | None = None
    resumed_from: str | None = None

    @property
    def first_loss(self) -> float | None:
        return self.losses[0][1] if self.losses else None

    @property
    def last_loss(self) -> float | None:
        return self.losses[-1][1] if self.losses else None


def recover(
    model: nn.Module,
    tokenizer: Any,
    data: Any,
    output_dir: str,
    training_args: Any = None,
    lora: Any = None,
    *,
    max_length: int = REFERENCE_SETTINGS["max_length"],
    val_size: int | float = 0,
    train_on_inputs: bool = False,
    resume: bool | str | None = None,
    overwrite: bool = False,
    export: str | None = "remote_code",
    source_dir: str | None = None,
    eval_before: bool = True,
    tokenizer_name: str | None = None,
    full: bool = False,
) -> RecoveryResult:
    """LoRA recovery tuning of ``model`` (pruned or any supported family), merged and saved to ``output_dir``.

    ``data``: a hub dataset name (default ``yahma/alpaca-cleaned``), a local .json/.jsonl file of
    Alpaca rows, ``"bundled"``, or a list of row dicts. ``training_args``: ``TrainingArguments`` (default:
    :func:`default_training_args` writing checkpoints to ``<output_dir>/checkpoints``). ``lora``: a
    ``LoraConfig`` (default: r=8, alpha=16, dropout 0.05 on the family's targets). ``resume``: None
    resumes from the last checkpoint in ``training_args.output_dir`` if there is one; False never; a path
    resumes from that checkpoint. ``val_size`` rows (or fraction) are held out to report the eval loss
    before and after. The model is trained and merged in place.

    Checkpoints are resumed only when ``<checkpoints>/recovery_run.json`` shows they were trained with the
    same model, data, LoRA and optimisation settings; otherwise RecoveryError asks for ``overwrite``, which
    deletes them. Every check runs before anything is written.

    ``full=True``: a full fine-tune instead (every weight trains, no LoRA; the reference's recovery for
    Mamba and Mamba-2, with lr 5e-5: see :func:`default_training_args`), resumable the same way.
    """
    if full and lora is not None:
        raise RecoveryError("a full fine-tune takes no LoRA config: pass either full=True or lora, not both")
    if os.path.isfile(os.path.join(output_dir, "config.json")) and not overwrite:
        raise RecoveryError(f"{output_dir} already holds a saved model; pass overwrite=True (--overwrite) to replace it")
    if overwrite and resume:
        raise RecoveryError("overwrite deletes the old checkpoints: it cannot be combined with resume")
    require_special_tokens(tokenizer, "recovery tuning (padding batches, ending each example with eos)")
    tokenizer.padding_side = "right"
    args = training_args if training_args is not None else default_training_args(
        os.path.join(output_dir, CHECKPOINT_SUBDIR), full=full)
    ckpt_dir = args.output_dir
    train_ds, val_ds, data_info = prepare_datasets(
        data, tokenizer, max_length=max_length, val_size=val_size, train_on_inputs=train_on_inputs, seed=args.seed
    )
    lora = None if full else (lora if lora is not None else default_lora_config(model))
    identity = run_identity(model, lora, args, _dataset_fingerprint(train_ds, val_ds), max_length, train_on_inputs,
                            val_size)  # before LoRA adds parameters to the model
    checkpoint = _choose_checkpoint(ckpt_dir, resume, overwrite, identity)
    # Seed before LoRA's random init (Trainer seeds only later), so identical runs give identical models.
    transformers.set_seed(args.seed)
    if full:
        model.requires_grad_(True)
        peft_model = model
    else:
        peft_model = attach_lora(model, lora)

    # every check has passed: from here on files are written
    existed = {ckpt_dir: os.path.isdir(ckpt_dir), output_dir: os.path.isdir(output_dir)}
    if overwrite:
        _clear_checkpoints(ckpt_dir)
    os.makedirs(ckpt_dir, exist_ok=True)
    with open(os.path.join(ckpt_dir, RUN_FILE), "w") as f:
        json.dump({"format": "hf_shedder.recovery_run/1", "identity": identity}, f, indent=2)
    resumed_step = 0
    if checkpoint is not None and os.path.isfile(os.path.join(checkpoint, "trainer_state.json")):
        with open(os.path.join(checkpoint, "trainer_state.json")) as f:
            resumed_step = int(json.load(f).get("global_step") or 0)
    try:
        trainer = build_trainer(peft_model, tokenizer, train_ds, val_ds, args)
        start = time.perf_counter()
        before = trainer.evaluate()["eval_loss"] if (val_ds is not None and eval_before and checkpoint is None) else None
        train_out = trainer.train(resume_from_checkpoint=checkpoint)
    except BaseException:
        if checkpoint is None:
            _remove_if_untrained(ckpt_dir, output_dir, existed)
        raise
    after = trainer.evaluate()["eval_loss"] if val_ds is not None else None
    seconds = time.perf_counter() - start
    losses = [(int(h["step"]), float(h["loss"])) for h in trainer.state.log_history if "loss" in h]
    mean_loss, mean_steps = mean_logged_loss(trainer.state.log_history, resumed_step)
    if mean_loss is None and checkpoint is None:  # nothing logged: Trainer's mean is right for a fresh run
        mean_loss, mean_steps = float(train_out.training_loss), trainer.state.global_step

    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    eff_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)
    settings: dict[str, Any] = {
        "method": FULL_METHOD if full else LORA_METHOD,
        **data_info,
        "prompt_template": "Alpaca",
        "tokenizer": tokenizer_name,
        "max_length": max_length,
        "loss_on": "prompt + response" if train_on_inputs else "response tokens only",
        **({} if full else _lora_settings(peft_model.peft_config["default"])),
        "trainable_params": trainable,
        "epochs": args.num_train_epochs,
        "max_steps": args.max_steps,
        "steps": trainer.state.global_step,
        "learning_rate": args.learning_rate,
        "lr_scheduler": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
        "warmup_steps": args.warmup_steps,
        "optimizer": str(getattr(args.optim, "value", args.optim)),
        "batch_size": args.per_device_train_batch_size,
        "gradient_accumulation": args.gradient_accumulation_steps,
        "effective_batch_size": eff_batch,
        "precision": "bf16" if args.bf16 else ("fp16" if args.fp16 else "fp32"),
        "seed": args.seed,
        "device": str(args.device),
        "train_loss_first": losses[0][1] if losses else None,
        "train_loss_last": losses[-1][1] if losses else None,
        "train_loss_mean": mean_loss,
        "train_loss_mean_steps": mean_steps,
        "eval_loss_before": before,
        "eval_loss_after": after,
        "resumed_from": checkpoint,
        "seconds": round(seconds, 2),
        "loss_curve": {"step": [s for s, _ in losses], "loss": [v for _, v in losses]},
    }
    merged = merge_and_save(peft_model, output_dir, tokenizer, settings, export=export, source_dir=source_dir)
    merged.eval()
    return RecoveryResult(output_dir=output_dir, model=merged, losses=losses, settings=settings,
                          eval_loss_before=before, eval_loss_after=after, resumed_from=checkpoint)
