"""Calibration and evaluation text: the reference's hub datasets, the bundled text and local files.

Everything returns token windows ready for perplexity: ``CalibrationSet`` holds ``N`` windows of
``L`` tokens cut from one tokenized stream of text (rows joined with ``"\\n\\n"``, as the
Mamba-Shedder reference does). Hub datasets keep their real names for users with a network;
offline they fail with a ``DataError`` that says how to pass a local file instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from typing import Any

import torch

from hf_shedder.defaults import BUNDLED, HUB_DATASETS, LOCAL_SUFFIXES, valid_sources  # noqa: F401
from hf_shedder.errors import DataError

EOS = "<|endoftext|>"
NEOX_VOCAB_SLACK = 128  # vocab sizes this close to the bundled tokenizer's are GPT-NeoX padded
HUB_TOKENIZER_HINT = "the bundled GPT-NeoX tokenizer (leave --tokenizer unset) or a local tokenizer folder"

# The source names (and the hub datasets behind them) live in defaults.py, which --help reads without torch.


def _asset(*parts: str) -> str:
    return str(resources.files("hf_shedder").joinpath("assets", *parts))


def bundled_tokenizer_file() -> str:
    return _asset("tokenizer", "gpt-neox-20b", "tokenizer.json")


def _looks_like_path(name: str) -> bool:
    """A string meant as a folder, not a hub id (hub ids are ``name`` or ``owner/name``)."""
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def load_tokenizer(name_or_path: str | None = None) -> Any:
    """The bundled GPT-NeoX tokenizer (Mamba/Mamba-2's own) by default, else AutoTokenizer.

    Special tokens are completed with :func:`complete_special_tokens` (a bare GPT-NeoX tokenizer.json
    names none), so batches can be padded.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if name_or_path is None:
        tok = PreTrainedTokenizerFast(
            tokenizer_file=bundled_tokenizer_file(), eos_token=EOS, bos_token=EOS, unk_token=EOS, pad_token=EOS
        )
        return tok
    if _looks_like_path(name_or_path) and not os.path.exists(os.path.expanduser(name_or_path)):
        raise DataError(f"cannot load tokenizer: no such folder {name_or_path!r}. Offline, use {HUB_TOKENIZER_HINT}.")
    try:
        tok = AutoTokenizer.from_pretrained(os.path.expanduser(name_or_path))
    except (OSError, ValueError) as e:
        where = "folder" if os.path.isdir(os.path.expanduser(name_or_path)) else "hub name"
        raise DataError(
            f"cannot load tokenizer from {where} {name_or_path!r} ({type(e).__name__}: {str(e).splitlines()[0]}). "
            f"Offline, use {HUB_TOKENIZER_HINT}."
        ) from e
    return complete_special_tokens(tok)


def complete_special_tokens(tok: Any) -> Any:
    """Fill in the special tokens a tokenizer lacks, in place, and return it.

    GPT-NeoX keeps its special-token roles in tokenizer_config.json, so a folder with only tokenizer.json
    loads with no eos/bos/pad: padding, recovery and lm-eval then fail. When the vocabulary has
    ``<|endoftext|>`` it becomes eos/bos/unk (as GPT-NeoX's own config says); pad falls back to eos.
    """
    if tok.eos_token is None and EOS in tok.get_vocab():
        tok.eos_token = EOS
        if tok.bos_token is None:
            tok.bos_token = EOS
        if tok.unk_token is None:
            tok.unk_token = EOS
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def require_special_tokens(tok: Any, purpose: str, eos: bool = True, pad: bool = True) -> None:
    """DataError (not a traceback from deep inside Trainer / lm-eval) when ``tok`` lacks a needed token."""
    complete_special_tokens(tok)
    missing = [name for name, needed in (("eos", eos), ("pad", pad)) if needed and getattr(tok, f"{name}_token") is None]
    if missing:
        name = getattr(tok, "name_or_path", None) or type(tok).__name__
        raise DataError(
            f"the tokenizer {name!r} defines no {' or '.join(missing)} token, which {purpose} needs. Use a tokenizer "
            f"folder whose tokenizer_config.json sets eos_token (and pad_token), or {HUB_TOKENIZER_HINT} via --tokenizer."
        )


def tokenizer_for_model(model_path: str, name: str | None = None) -> Any:
    """The tokenizer every command uses for ``model_path`` (see :mod:`hf_shedder.tokenizer_choice`); special
    tokens completed. DataError when no tokenizer fits the model."""
    from hf_shedder.tokenizer_choice import choose_tokenizer

    return choose_tokenizer(model_path, name).tokenizer


def output_tokenizer(model_path: str, vocab_size: int | None = None) -> Any | None:
    """The tokenizer to save next to a model made from ``model_path`` (the one
    :func:`~hf_shedder.tokenizer_choice.choose_tokenizer` picks), or None when there is none for it or it
    has no eos token."""
    from hf_shedder.tokenizer_choice import output_tokenizer_choice

    chosen = output_tokenizer_choice(model_path, vocab_size)
    return chosen.tokenizer if chosen is not None else None


@dataclass
class CalibrationSet:
    """``N`` token windows of length ``L`` (every position is real text unless a mask says otherwise)."""

    input_ids: torch.Tensor  # LongTensor[N, L]
    attention_mask: torch.Tensor  # LongTensor[N, L]
    source: str
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.input_ids.dim() != 2 or self.input_ids.shape != self.attention_mask.shape:
            raise DataError(
                f"input_ids and attention_mask must both be [N, L]; got {tuple(self.input_ids.shape)} "
                f"and {tuple(self.attention_mask.shape)}"
            )

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def n_samples(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seqlen(self) -> int:
        return self.input_ids.shape[1]

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def fingerprint(self) -> str:
        """Hash of the exact tokens: lets a search journal refuse other calibration data."""
        h = hashlib.sha256()
        h.update(str(tuple(self.input_ids.shape)).encode())
        h.update(self.input_ids.to(torch.int64).contiguous().numpy().tobytes())
        h.update(self.attention_mask.to(torch.int64).contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def batches(self, batch_size: int, device: torch.device | str | None = None) -> Iterator[dict[str, torch.Tensor]]:
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        for start in range(0, self.n_samples, batch_size):
            batch = {
                "input_ids": self.input_ids[start : start + batch_size],
                "attention_mask": self.attention_mask[start : start + batch_size],
            }
            if device is not None:
                batch = {k: v.to(device) for k, v in batch.items()}
            yield batch


# ----------------------------------------------------------------------------- reading text


def render_alpaca(row: dict[str, Any]) -> str:
    """An Alpaca-style row as one training/calibration text (the Stanford Alpaca prompt format)."""
    instruction = str(row.get("instruction") or "").strip()
    inp = str(row.get("input") or "").strip()
    output = str(row.get("output") or "").strip()
    if inp:
        head = (
            "Below is an instruction that describes a task, paired with an input that provides further "
            "context. Write a response that appropriately completes the request.\n\n"
            f"### Instruction:\n{instruction}\n\n### Input:\n{inp}\n\n### Response:\n"
        )
    else:
        head = (
            "Below is an instruction that describes a task. Write a response that appropriately "
            f"completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
        )
    return head + output


def _row_text(row: Any, path: str, lineno: int) -> str:
    if isinstance(row, str):
        return row
    if isinstance(row, dict):
        if isinstance(row.get("text"), str):
            return row["text"]
        if "instruction" in row:
            return render_alpaca(row)
    raise DataError(
        f"{path}: row {lineno} has neither a 'text' field nor Alpaca 'instruction'/'input'/'output' fields"
    )


def read_json_rows(path: str) -> list[Any]:
    """The rows of a .jsonl file (one JSON value a line) or a .json file (a list, or an object holding
    exactly one list, as in ``{"train": [...]}``); DataError names the bad line or shape."""
    suffix = os.path.splitext(path)[1].lower()
    with open(path, encoding="utf-8") as f:
        if suffix == ".jsonl":
            rows = []
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}: line {i} is not JSON ({e.msg})") from e
            return rows
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from e
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a JSON list of rows (or an object holding one list)")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of rows")
    return data


def read_local_texts(path: str) -> list[str]:
    """Rows of text from a .txt (one text), .json (list of rows) or .jsonl (a row a line) file."""
    if not os.path.isfile(path):
        raise DataError(f"no such file: {path}")
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in LOCAL_SUFFIXES:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(LOCAL_SUFFIXES)}")
    if suffix == ".txt":
        with open(path, encoding="utf-8") as f:
            return [f.read()]
    rows = read_json_rows(path)
    return [_row_text(r, path, i) for i, r in enumerate(rows, 1)]


def _load_hub_dataset(name: str, split: str | None = None):
    """The reference's dataset split, or DataError when it cannot be fetched (e.g. offline)."""
    import datasets

    props = HUB_DATASETS[name]
    split = split or props["split"]
    try:
        ds = datasets.load_dataset(props["path"], name=props["name"], data_files=props.get("data_files"))
    except Exception as e:  # offline / connection / missing-dataset errors all look different
        raise DataError(
            f"cannot fetch {props['path']} offline or from the Hub ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); pass a local file with "
            "--calibration path/to/text.txt (or .json/.jsonl with a 'text' field)"
        ) from e
    if name == "alpaca":
        # reference split: 80% train, then the 20% halved into test / validation, seed 42
        parts = ds["train"].train_test_split(test_size=0.2, seed=42)
        rest = parts["test"].train_test_split(test_size=0.5, seed=42)
        ds = {"train": parts["train"], "test": rest["train"], "validation": rest["test"]}
    if split not in ds:
        raise DataError(f"{props['path']} has no split {split!r}; it has {sorted(ds)}")
    part = ds[split]
    column = props["column"] if props["column"] in part.column_names else part.column_names[0]
    return part, column


def read_texts(source: str, split: str | None = None) -> list[str]:
    """Rows of text for ``source``: a reference dataset name, ``bundled`` or a local file."""
    if source in BUNDLED:
        with open(_asset("text", BUNDLED[source]), encoding="utf-8") as f:
            return [f.read()]
    if source in HUB_DATASETS:
        part, column = _load_hub_dataset(source, split)
        return list(part[column])
    if os.path.splitext(source)[1].lower() in LOCAL_SUFFIXES or os.path.exists(source):
        return read_local_texts(source)
    raise DataError(
        f"unknown calibration/evaluation source {source!r}; use one of {', '.join(valid_sources())} "
        f"or a local {'/'.join(LOCAL_SUFFIXES)} file"
    )


def _tokenize_stream(texts: list[str], tokenizer, source: str) -> torch.Tensor:
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise DataError(f"{source}: the text is empty")
    ids = tokenizer("\n\n".join(texts), return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


# ----------------------------------------------------------------------------- public loaders


def load_calibration(
    source: str,
    tokenizer,
    n_samples: int = 256,
    seqlen: int = 2048,
    seed: int = 42,
    mode: str = "windows",
    split: str | None = None,
) -> CalibrationSet:
    """Calibration windows for the search.

    ``mode="windows"`` (default): the whole text is tokenized once and ``n_samples`` non-overlapping
    windows of ``seqlen`` tokens are drawn from it with ``seed``.
    ``mode="reference"``: as Mamba-Shedder's prune.py: draw ``n_samples`` *rows* with
    ``random.sample`` (seeded), join them and cut the stream into as many full windows as it holds.
    """
    if n_samples < 1 or seqlen < 2:
        raise DataError(f"need n_samples >= 1 and seqlen >= 2, got {n_samples} and {seqlen}")
    texts = read_texts(source, split)
    if mode == "reference":
        texts = [t for t in texts if t is not None]
        if len(texts) < n_samples:
            raise DataError(
                f"{source}: reference mode samples {n_samples} rows but the data has {len(texts)}; "
                "lower --samples or use the default window mode"
            )
        texts = [texts[i] for i in random.Random(seed).sample(range(len(texts)), n_samples)]
        stream = _tokenize_stream(texts, tokenizer, source)
        n = stream.numel() // seqlen
        if n == 0:
            raise DataError(
                f"{source}: needs at least {seqlen} tokens for one window, the text gives {stream.numel()} tokens; "
                "lower --seqlen or give more text"
            )
        ids = stream[: n * seqlen].view(n, seqlen)
    elif mode == "windows":
        stream = _tokenize_stream(texts, tokenizer, source)
        need = n_samples * seqlen
        if stream.numel() < need:
            raise DataError(
                f"{source}: needs {n_samples} x {seqlen} = {need} tokens, the text gives {stream.numel()} tokens; "
                "lower --samples/--seqlen or give more text"
            )
        # a seeded offset + a seeded choice of slots on the grid of whole windows: deterministic,
        # non-overlapping, and any part of the text can be drawn
        gen = torch.Generator().manual_seed(seed)
        slots = stream.numel() // seqlen
        offset = int(torch.randint(0, stream.numel() - slots * seqlen + 1, (1,), generator=gen))
        chosen = torch.randperm(slots, generator=gen)[:n_samples].sort().values
        starts = offset + chosen * seqlen
        ids = torch.stack([stream[s : s + seqlen] for s in starts.tolist()])
    else:
        raise DataError(f"unknown calibration mode {mode!r}; use 'windows' or 'reference'")
    return CalibrationSet(ids.contiguous(), torch.ones_like(ids), source=source, seed=seed)


def load_eval_text(
    source: str, tokenizer, seqlen: int = 2048, split: str | None = None, max_samples: int | None = None
) -> CalibrationSet:
    """A whole evaluation split for perplexity, reference style: join, tokenize, cut into full windows.

    ``bundled`` evaluates on the bundled validation slice (disjoint from the calibration slice).
    ``max_samples`` keeps only the first windows (quick checks; the reference uses them all).
    """
    if seqlen < 2:
        raise DataError(f"need seqlen >= 2, got {seqlen}")
    if source == "bundled":
        source = "bundled-validation"
    stream = _tokenize_stream(read_texts(source, split), tokenizer, source)
    n = stream.numel() // seqlen
    if n == 0:
        raise DataError(
            f"{source}: needs 1 x {seqlen} = {seqlen} tokens, the text gives {stream.numel()} tokens; "
            "lower --seqlen or give more text"
        )
    if max_samples is not None:
        n = min(n, max(int(max_samples), 1))
    ids = stream[: n * seqlen].view(n, seqlen).contiguous()
    return CalibrationSet(ids, torch.ones_like(ids), source=source, seed=None)
