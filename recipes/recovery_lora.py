#!/usr/bin/env python
"""Recovery tuning of a pruned model with the Mamba-Shedder reference's settings, as LoRA.

Reference (Mamba-Shedder README, recovery fine-tuning of the pruned Mamba-2): yahma/alpaca-cleaned with
the Alpaca prompt template, prompt + response cut at 256 tokens, loss on the response only, 2000 rows held
out, 1 epoch, batch 32, no gradient accumulation, AdamW, linear schedule, 100 warm-up steps, lr 5e-5
for full fine-tuning. Here the update is a LoRA (r=8, alpha=16, dropout 0.05, lr 3e-4) on the family's
targets, merged into the pruned weights afterwards, so the result is the same pruned architecture.

    python recipes/recovery_lora.py --model pruned_dir --out recovered_dir
    python recipes/recovery_lora.py --model pruned_dir --out recovered_dir --data my_rows.jsonl   # offline

Interrupted? Run the same command again: it resumes from OUT/checkpoints.
"""

from __future__ import annotations

import argparse
import sys

from hf_shedder.cli import main as cli_main
from hf_shedder.recovery import DEFAULT_DATA, LORA_LEARNING_RATE, REFERENCE_SETTINGS


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="pruned model folder (hf-shedder apply / prune output)")
    p.add_argument("--out", required=True)
    p.add_argument("--data", default=DEFAULT_DATA, help="hub dataset or local .json/.jsonl Alpaca rows")
    p.add_argument("--max-steps", type=int, default=-1, help="cap the run (default: one epoch, as the reference)")
    args, extra = p.parse_known_args(argv)
    r = REFERENCE_SETTINGS
    return cli_main([
        "recover", args.model, "--data", args.data, "--out", args.out,
        "--epochs", str(r["num_train_epochs"]), "--lr", str(LORA_LEARNING_RATE),
        "--batch-size", str(r["per_device_train_batch_size"]), "--grad-accum", str(r["gradient_accumulation_steps"]),
        "--warmup-steps", str(r["warmup_steps"]), "--seqlen", str(r["max_length"]), "--val-size", str(r["val_size"]),
        "--seed", str(r["seed"]), "--max-steps", str(args.max_steps), *extra,
    ])


if __name__ == "__main__":
    sys.exit(main())
