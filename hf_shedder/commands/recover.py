"""``hf-shedder recover DIR --data yahma/alpaca-cleaned|FILE --out OUT [--full]``: recovery tuning.

LoRA (merged back) by default; ``--full`` is a full fine-tune, the reference's recovery for Mamba and Mamba-2.
"""

from __future__ import annotations

import argparse
import os

from ..defaults import DEFAULT_DATA, LORA_DEFAULTS, LORA_LEARNING_RATE, REFERENCE_SETTINGS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", help="pruned model directory (or any supported model: folder or hub name)")
    p.add_argument("--data", default=DEFAULT_DATA,
                   help=f"Alpaca-style data: a hub dataset (default {DEFAULT_DATA}), a local .json/.jsonl file of "
                        "instruction/input/output rows, or 'bundled' (tiny demo file)")
    p.add_argument("--out", required=True, help="where the merged model goes (Trainer checkpoints in OUT/checkpoints)")
    p.add_argument("--epochs", type=float, default=REFERENCE_SETTINGS["num_train_epochs"])
    p.add_argument("--full", action="store_true",
                   help="full fine-tune (every weight, no LoRA), the reference's recovery for Mamba / Mamba-2")
    p.add_argument("--lr", type=float, default=None,
                   help=f"learning rate (default {LORA_LEARNING_RATE} for LoRA, "
                        f"{REFERENCE_SETTINGS['full_ft_learning_rate']} with --full, as the reference)")
    p.add_argument("--batch-size", type=int, default=REFERENCE_SETTINGS["per_device_train_batch_size"])
    p.add_argument("--grad-accum", type=int, default=REFERENCE_SETTINGS["gradient_accumulation_steps"])
    p.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps (default: epochs)")
    p.add_argument("--warmup-steps", type=int, default=REFERENCE_SETTINGS["warmup_steps"])
    p.add_argument("--lora-r", type=int, default=LORA_DEFAULTS["r"])
    p.add_argument("--lora-alpha", type=int, default=LORA_DEFAULTS["lora_alpha"])
    p.add_argument("--lora-dropout", type=float, default=LORA_DEFAULTS["lora_dropout"])
    p.add_argument("--target-modules", default=None,
                   help="comma-separated LoRA targets (default: the model family's, e.g. in_proj)")
    p.add_argument("--seqlen", type=int, default=REFERENCE_SETTINGS["max_length"],
                   help="cut prompt+response at this many tokens (reference: 256)")
    p.add_argument("--val-size", type=int, default=0,
                   help="rows held out to report the eval loss before/after (reference: 2000)")
    p.add_argument("--save-steps", type=int, default=200, help="checkpoint every N steps (resumable)")
    p.add_argument("--no-resume", action="store_true",
                   help="never resume (refuses if OUT/checkpoints holds checkpoints: --overwrite deletes them)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer name/folder (default: the model's own; GPT-NeoX-20B for mamba-ssm checkpoints)")
    p.add_argument("--dtype", default="float32", help="weights dtype for training (default float32)")
    p.add_argument("--seed", type=int, default=REFERENCE_SETTINGS["seed"])
    p.add_argument("--overwrite", action="store_true",
                   help="replace a model already saved in OUT and delete the checkpoints in OUT/checkpoints")


def run(args: argparse.Namespace) -> int:
    from ..errors import RecoveryError
    from ..loading import load_model, parse_dtype
    from ..recovery import default_lora_config, default_training_args, recover
    from ..tokenizer_choice import tokenizer_for_command

    chosen = tokenizer_for_command(args.model_dir, args.tokenizer)
    tokenizer = chosen.tokenizer
    model = load_model(args.model_dir, dtype=parse_dtype(args.dtype))
    targets = [t.strip() for t in args.target_modules.split(",") if t.strip()] if args.target_modules else None
    if args.full and targets:
        raise RecoveryError("--target-modules chooses LoRA targets; a full fine-tune (--full) trains every weight")
    lora = None if args.full else default_lora_config(model, targets, r=args.lora_r, lora_alpha=args.lora_alpha,
                                                      lora_dropout=args.lora_dropout)
    lr = args.lr if args.lr is not None else (REFERENCE_SETTINGS["full_ft_learning_rate"] if args.full
                                              else LORA_LEARNING_RATE)
    training_args = default_training_args(
        os.path.join(args.out, "checkpoints"),
        num_train_epochs=args.epochs, learning_rate=lr, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        max_steps=args.max_steps, warmup_steps=args.warmup_steps, save_steps=args.save_steps, seed=args.seed,
        logging_steps=_logging_steps(args.max_steps),
    )
    result = recover(
        model, tokenizer, args.data, args.out, training_args=training_args, lora=lora, max_length=args.seqlen,
        val_size=args.val_size, resume=False if args.no_resume else None, overwrite=args.overwrite,
        source_dir=args.model_dir if os.path.isdir(args.model_dir) else None, tokenizer_name=chosen.name,
        full=args.full,
    )
    s = result.settings
    if result.resumed_from:
        print(f"resumed from {result.resumed_from}")
    loss = (f", train loss {s['train_loss_first']:.4f} -> {s['train_loss_last']:.4f} (logged)" if result.losses
            else f", mean train loss {s['train_loss_mean']:.4f}" if s.get("train_loss_mean") is not None else "")
    what = (f"full fine-tune ({s['trainable_params']:,} weights)" if args.full
            else f"LoRA r={s['lora_r']} on {', '.join(s['target_modules'])}")
    print(f"{what}: {s['steps']} steps on {s['rows_used']} rows{loss}")
    if result.eval_loss_after is not None:
        before = f"{result.eval_loss_before:.4f} -> " if result.eval_loss_before is not None else ""
        print(f"eval loss {before}{result.eval_loss_after:.4f} on {s['val_rows']} held-out rows")
    print(f"{'fine-tuned' if args.full else 'merged'} model saved to {args.out}")
    return 0


def _logging_steps(max_steps: int) -> int:
    """The reference logs every 10 steps; short runs log more often so the loss curve has points."""
    return 10 if max_steps < 0 or max_steps >= 100 else max(1, max_steps // 10)
