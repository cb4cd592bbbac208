#!/usr/bin/env python
"""The Mamba-Shedder paper's Mamba-2 2.7B recovery: a full fine-tune of the pruned model, as the reference.

The reference recovers pruned Mamba and Mamba-2 models with a full fine-tune (LoRA only for the hybrids):
yahma/alpaca-cleaned with the Alpaca prompt template, prompt + response cut at 256 tokens, loss on the
response only, 2000 rows held out, 1 epoch, effective batch 32, AdamW, linear schedule, 100 warm-up steps,
lr 5e-5. This recipe runs exactly that through ``hf-shedder recover --full`` (Transformers ``Trainer``) on
a pruned mamba2-2.7b folder (from ``hf-shedder prune --model <mamba2-2.7b in Transformers format> --units
ssm --steps 22 --apply``, the paper's SSM-removal run). Interrupted? Run the same command again: it
resumes from OUT/checkpoints.

    python recipes/mamba2_2.7b_full_recovery.py --model runs/m2-ssm22/model --out runs/m2-ssm22-ft
    # one GPU with less memory: the same effective batch of 32 as 8 x 4
    python recipes/mamba2_2.7b_full_recovery.py --model ... --out ... --batch-size 8 --grad-accum 4
    # offline: --data my_alpaca_rows.jsonl

Not run in this project (no GPU time for a 2.7B full fine-tune); its settings are checked by
tests/test_recovery.py on a tiny model.
"""

from __future__ import annotations

import argparse
import sys

from hf_shedder.cli import main as cli_main
from hf_shedder.defaults import DEFAULT_DATA, REFERENCE_SETTINGS

EFFECTIVE_BATCH = REFERENCE_SETTINGS["per_device_train_batch_size"] * REFERENCE_SETTINGS["gradient_accumulation_steps"]


def reference_argv(model: str, out: str, data: str = DEFAULT_DATA, batch_size: int | None = None,
                   grad_accum: int | None = None, max_steps: int = -1) -> list[str]:
    """The ``hf-shedder recover --full`` command line of the reference's full fine-tune."""
    r = REFERENCE_SETTINGS
    batch_size = batch_size or r["per_device_train_batch_size"]
    grad_accum = grad_accum or max(1, EFFECTIVE_BATCH // batch_size)
    if batch_size * grad_accum != EFFECTIVE_BATCH:
        raise SystemExit(f"batch size x gradient accumulation must be {EFFECTIVE_BATCH} (the reference's), "
                         f"got {batch_size} x {grad_accum}")
    return [
        "recover", model, "--full", "--data", data, "--out", out,
        "--epochs", str(r["num_train_epochs"]), "--lr", str(r["full_ft_learning_rate"]),
        "--batch-size", str(batch_size), "--grad-accum", str(grad_accum),
        "--warmup-steps", str(r["warmup_steps"]), "--seqlen", str(r["max_length"]), "--val-size", str(r["val_size"]),
        "--seed", str(r["seed"]), "--max-steps", str(max_steps), "--dtype", "float32",
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="pruned mamba2-2.7b folder (hf-shedder prune --apply output)")
    p.add_argument("--out", required=True)
    p.add_argument("--data", default=DEFAULT_DATA, help="hub dataset or local .json/.jsonl Alpaca rows")
    p.add_argument("--batch-size", type=int, default=None, help="per-device batch (default 32)")
    p.add_argument("--grad-accum", type=int, default=None, help="default: 32 / batch size")
    p.add_argument("--max-steps", type=int, default=-1, help="cap the run (default: one epoch, as the reference)")
    args, extra = p.parse_known_args(argv)
    return cli_main([*reference_argv(args.model, args.out, args.data, args.batch_size, args.grad_accum,
                                     args.max_steps), *extra])


if __name__ == "__main__":
    sys.exit(main())
