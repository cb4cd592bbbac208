"""``hf-shedder``: the command line. Each sub-command lives in ``hf_shedder/commands/<name>.py``.

Building the parser imports no torch or Transformers (command modules import them inside ``run``), so
``--help`` and argument errors come back at once.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from collections.abc import Iterator

from .errors import ShedderError

COMMANDS = {
    "prune": "search for a pruning plan (Mamba-Shedder greedy search) and optionally apply it",
    "apply": "apply a pruning plan to a model and save the pruned model",
    "info": "show what a pruned model removed and its parameter counts",
    "eval": "perplexity and zero-shot accuracy (lm-eval) of a model",
    "bench": "prefill/decode speed and memory of a pruned model beside its base",
    "recover": "LoRA recovery tuning of a pruned model (PEFT + Trainer), merged back",
    "card": "render the model card (README.md) of a pruned model directory",
    "push": "upload a pruned model directory to the Hugging Face Hub",
}


def _load(name: str):  # noqa: ANN202
    return importlib.import_module(f"hf_shedder.commands.{name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-shedder", description="Mamba-Shedder pruning for Transformers models")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in COMMANDS.items():
        try:
            module = _load(name)
        except ModuleNotFoundError as e:
            if e.name != f"hf_shedder.commands.{name}":
                raise
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


@contextlib.contextmanager
def _progress_bars(show: bool) -> Iterator[None]:
    """``--no-progress`` also silences the bars of Transformers ("Loading weights") and huggingface_hub;
    their previous state comes back afterwards (``main`` may run inside a longer process, e.g. tests)."""
    if show:
        yield
        return
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    was = (hf_logging.is_progress_bar_enabled(), hub_utils.are_progress_bars_disabled())
    hf_logging.disable_progress_bar()
    hub_utils.disable_progress_bars()
    try:
        yield
    finally:
        if was[0]:
            hf_logging.enable_progress_bar()
        if not was[1]:
            hub_utils.enable_progress_bars()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import hf_shedder

    hf_shedder.register()  # the package started empty (see hf_shedder/__init__.py): pruned models load from here on
    from .log_filters import install as drop_unactionable_warnings

    drop_unactionable_warnings()
    try:
        with _progress_bars(not getattr(args, "no_progress", False)):
            return int(args._run(args) or 0)
    except ShedderError as e:
        print(f"hf-shedder {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
