"""Which tokenizer a command uses for a model: one rule, printed and recorded.

* ``--tokenizer NAME`` wins (a hub name or a folder).
* A folder with a saved tokenizer, or a hub id, uses the model's own (``AutoTokenizer`` on the same name).
* A mamba-ssm checkpoint ships none: it gets GPT-NeoX-20B (the bundled copy), as the reference does.
* A model without a usable tokenizer falls back to the bundled GPT-NeoX-20B only when its vocabulary is
  GPT-NeoX-sized (Mamba, Mamba-2, Pythia); any other model is refused with a message, never silently
  given a tokenizer from another family.

Before any work, the tokenizer's ids must fit the model's embedding: a larger vocabulary would otherwise
die deep inside the search with ``IndexError: index out of range in self``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from .data import (
    HUB_TOKENIZER_HINT,
    NEOX_VOCAB_SLACK,
    complete_special_tokens,
    load_tokenizer,
)
from .errors import DataError

BUNDLED_NAME = "EleutherAI/gpt-neox-20b (bundled copy)"
BUNDLED_ALIASES = ("bundled", "gpt-neox-20b", "EleutherAI/gpt-neox-20b")


@dataclass
class ChosenTokenizer:
    tokenizer: Any
    name: str  # what was loaded: a hub name, a folder, or BUNDLED_NAME
    reason: str  # why this one

    def describe(self) -> str:
        return f"tokenizer: {self.name} ({self.reason}; {len(self.tokenizer):,} ids)"

    def record(self) -> dict[str, Any]:
        """What the provenance keeps."""
        return {"name": self.name, "reason": self.reason, "size": len(self.tokenizer)}


def _bundled(reason: str) -> ChosenTokenizer:
    return ChosenTokenizer(load_tokenizer(), BUNDLED_NAME, reason)


def _neox_sized(vocab_size: int | None) -> bool:
    """Whether a model's vocabulary is GPT-NeoX's, padded as the Mamba checkpoints pad it (50280, 50288...)."""
    return vocab_size is not None and 0 <= vocab_size - len(load_tokenizer()) <= NEOX_VOCAB_SLACK


def _own_tokenizer(name_or_path: str) -> Any | None:
    from .loading import load_tokenizer_for

    tok = load_tokenizer_for(name_or_path)
    return complete_special_tokens(tok) if tok is not None else None


def choose_tokenizer(model: str, name: str | None = None, vocab_size: int | None = None,
                     check_fit: bool = True) -> ChosenTokenizer:
    """The tokenizer for ``model`` (folder or hub id) following the rules above; DataError when none fits.

    ``vocab_size`` (the model's embedding rows) is read from the model's config when not given; an
    unreachable hub id then raises the loader's CheckpointError.
    """
    from .loading import checkpoint_format, load_config, vocab_size_of
    from .mamba_ssm_format import FORMAT as MAMBA_SSM

    vocab = vocab_size if vocab_size is not None else vocab_size_of(load_config(model))
    if name:
        chosen = (_bundled("chosen with --tokenizer") if name in BUNDLED_ALIASES
                  else ChosenTokenizer(load_tokenizer(name), name, "chosen with --tokenizer"))
    else:
        chosen = _default(model, vocab, checkpoint_format(model) == MAMBA_SSM)
    if check_fit:
        check_tokenizer_fits(chosen, vocab, model)
    return chosen


def _default(model: str, vocab: int | None, is_mamba_ssm: bool) -> ChosenTokenizer:
    is_dir = os.path.isdir(model)
    own = _own_tokenizer(model) if is_dir or not is_mamba_ssm else None
    if own is not None:
        return ChosenTokenizer(own, model, "the model's own")
    if is_mamba_ssm:
        return _bundled("mamba-ssm checkpoints ship no tokenizer; the Mamba-Shedder reference uses GPT-NeoX-20B")
    where = f"the folder {model}" if is_dir else f"the hub repo {model!r} (offline, or it has none)"
    if _neox_sized(vocab):
        return _bundled(f"no usable tokenizer in {where}; the model's vocabulary ({vocab:,}) is GPT-NeoX-sized")
    how = ("save the model's tokenizer into the folder or pass --tokenizer NAME_OR_FOLDER" if is_dir else
           f"download it where a network is available (`hf download {model} --include 'tokenizer*' "
           "--local-dir DIR`) and pass --tokenizer DIR")
    raise DataError(
        f"no tokenizer for {model}: none could be loaded from {where}, and its vocabulary "
        f"({vocab if vocab is not None else 'unknown'}) is not GPT-NeoX's, so the bundled GPT-NeoX tokenizer "
        f"would be wrong for it; {how}"
    )


def check_tokenizer_fits(chosen: ChosenTokenizer, vocab_size: int | None, model: str) -> None:
    """DataError when the tokenizer can produce ids the model's embedding does not have."""
    if vocab_size is not None and len(chosen.tokenizer) > vocab_size:
        raise DataError(
            f"the tokenizer {chosen.name} has {len(chosen.tokenizer):,} ids but {model} embeds only {vocab_size:,} "
            f"tokens: ids >= {vocab_size:,} would index past its embedding. Use the model's own tokenizer "
            f"(--tokenizer NAME_OR_FOLDER), or {HUB_TOKENIZER_HINT} for a GPT-NeoX-sized model"
        )


def output_tokenizer_choice(model: str, vocab_size: int | None = None) -> ChosenTokenizer | None:
    """The tokenizer to save next to a model made from ``model``, printed; None (also printed) when there is
    none for it or it has no eos token (it would break padding and lm-eval on the output)."""
    from .errors import CheckpointError

    try:
        chosen = choose_tokenizer(model, vocab_size=vocab_size)
    except (DataError, CheckpointError) as e:
        print(f"tokenizer: none saved with the output ({e})", flush=True)
        return None
    if chosen.tokenizer.eos_token is None:
        print(f"tokenizer: none saved with the output ({chosen.name} defines no eos token)", flush=True)
        return None
    print(chosen.describe(), flush=True)
    return chosen


def tokenizer_for_command(model: str, name: str | None = None) -> ChosenTokenizer:
    """:func:`choose_tokenizer`, printed: what every command that reads text calls."""
    chosen = choose_tokenizer(model, name)
    print(chosen.describe(), flush=True)
    return chosen


__all__ = ["BUNDLED_NAME", "ChosenTokenizer", "check_tokenizer_fits", "choose_tokenizer", "output_tokenizer_choice",
           "tokenizer_for_command"]
