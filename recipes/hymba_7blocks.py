#!/usr/bin/env python
"""The Mamba-Shedder paper's Hymba run: remove 7 Hymba blocks from Hymba-1.5B-Base, with and without recovery.

Mamba-Shedder prunes Hymba at the granularity of the *hybrid-head module* ("Hymba block": the
attention+SSM mixer with its norm and residual; the layer's MLP stays). Because layers in a
``kv_reuse_group`` read the keys/values of the group's first layer, a group's first layer can only go
once its readers have lost their attention. The reference run (Alpaca calibration, 256 samples of
1024 tokens, perplexity criterion) removed layers 2, 22, 15, 28, 10, 24, 26 and reports ~97% relative
accuracy without recovery and ~99% after LoRA recovery tuning.

Steps (each writes into --out; rerunning skips what is already there):
  1. search  greedy block search (hf_shedder.search), 7 steps -> plan.json, trajectory
  2. prune   apply the plan physically -> pruned/         (loads with AutoModelForCausalLM after `import hf_shedder`)
  3. eval    perplexity (wikitext2) + zero-shot lm-eval tasks of base and pruned
  4. recover LoRA recovery tuning on Alpaca, merged -> recovered/, and its evaluation

With a network (GPU recommended; mamba-ssm/causal-conv1d are used when installed):
  python recipes/hymba_7blocks.py --model nvidia/Hymba-1.5B-Base --out runs/hymba_7blocks --device cuda
Without one: download the model (e.g. `hf download nvidia/Hymba-1.5B-Base --local-dir DIR`) and pass
--model DIR; datasets likewise as local files (--calibration / --recovery-data / --eval-text).
Only the reference plan, no search:  --plan reference
Offline smoke run on a tiny random Hymba and bundled data (CPU, a minute):  --demo
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

import hf_shedder
from hf_shedder import Plan, Unit, get_adapter
from hf_shedder.data import load_calibration, load_eval_text, load_tokenizer
from hf_shedder.loading import load_model, load_tokenizer_for
from hf_shedder.search import SearchSettings, search

# Layers the reference run removed, in the order its search chose them (pruning_config.json).
REFERENCE_PLAN_LAYERS = [2, 22, 15, 28, 10, 24, 26]
REFERENCE_TASKS = ["arc_easy", "arc_challenge", "piqa", "winogrande", "hellaswag"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="nvidia/Hymba-1.5B-Base", help="hub name or local directory")
    p.add_argument("--out", default="runs/hymba_7blocks")
    p.add_argument("--blocks", type=int, default=7, help="Hymba blocks to remove")
    p.add_argument("--plan", choices=["search", "reference"], default="search",
                   help="search for the plan, or use the reference run's published plan")
    p.add_argument("--calibration", default="alpaca", help="calibration source (hub name, local file, 'bundled')")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--seqlen", type=int, default=1024, help="the reference Hymba run uses 1024")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--recovery-data", default="yahma/alpaca-cleaned")
    p.add_argument("--recovery-steps", type=int, default=None, help="cap on optimizer steps (default: the recipe's)")
    p.add_argument("--skip-recovery", action="store_true")
    p.add_argument("--eval-text", default="wikitext2", help="perplexity source")
    p.add_argument("--tasks", default=",".join(REFERENCE_TASKS), help="lm-eval tasks ('' to skip)")
    p.add_argument("--eval-limit", type=float, default=None, help="lm-eval limit per task (quick runs)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--demo", action="store_true", help="tiny random Hymba + bundled data, offline, CPU")
    return p.parse_args(argv)


def tiny_demo_model(vocab_size: int) -> torch.nn.Module:
    """A random 10-layer Hymba shaped like the real one (meta tokens, SWA + 3 global layers, KV groups)."""
    from hf_shedder.models.hymba import HymbaConfig, HymbaForCausalLM

    config = HymbaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=10,
        num_attention_heads=4, num_key_value_heads=2, mamba_d_state=8, mamba_dt_rank=8, num_memory_tokens=8,
        sliding_window=32, global_attn_idx=[0, 5, 9], kv_reuse_group=[[1, 2], [3, 4], [6, 7, 8]],
        rope=True, rope_type="ntk", orig_max_position_embeddings=64, max_position_embeddings=256,
        tie_word_embeddings=True, kq_norm="none",
    )
    torch.manual_seed(0)
    return HymbaForCausalLM(config).eval()


def write_json(path: str, data: object) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.demo:
        tokenizer = load_tokenizer(None)
        model = tiny_demo_model(len(tokenizer))
        args.calibration, args.eval_text, args.recovery_data = "bundled", "bundled-validation", "bundled"
        args.samples, args.seqlen, args.batch_size, args.blocks = 4, 128, 2, 2
        args.tasks, args.dtype = "", None
        args.recovery_steps = args.recovery_steps or 4
    else:
        dtype = getattr(torch, args.dtype) if args.dtype else None
        model = load_model(args.model, dtype=dtype, device=args.device)
        tokenizer = load_tokenizer_for(args.model) or load_tokenizer(None)
    adapter = get_adapter(model)
    if adapter.family != "hymba":
        print(f"{args.model} is a {adapter.family!r} model, not Hymba", file=sys.stderr)
        return 2

    # 1. the plan
    plan_file = os.path.join(args.out, "plan.json")
    if os.path.isfile(plan_file):
        plan = Plan.load(plan_file, family="hymba", num_layers=adapter.num_layers())
    elif args.plan == "reference":
        plan = Plan([Unit("block", i) for i in REFERENCE_PLAN_LAYERS[: args.blocks]], "hymba", adapter.num_layers())
        adapter.validate(plan)
        plan.save(plan_file)
    else:
        calib = load_calibration(args.calibration, tokenizer, n_samples=args.samples, seqlen=args.seqlen)
        settings = SearchSettings(units=("block",), steps=args.blocks, calibration=args.calibration,
                                  samples=args.samples, seqlen=args.seqlen, batch_size=args.batch_size)
        result = search(model, calib, settings, out_dir=os.path.join(args.out, "search"))
        plan = result.plan
        plan.save(plan_file)
    print("plan:", ", ".join(str(u) for u in plan))

    # 2. physical removal
    pruned_dir = os.path.join(args.out, "pruned")
    pruned = hf_shedder.prune(model, plan, provenance={"recipe": "recipes/hymba_7blocks.py"})
    if not os.path.isfile(os.path.join(pruned_dir, "config.json")):
        pruned.save_pretrained(pruned_dir)
        tokenizer.save_pretrained(pruned_dir)

    # 3. evaluation before recovery (recovery trains the pruned model in place)
    from hf_shedder.evaluation.perplexity import evaluate_perplexity

    text = load_eval_text(args.eval_text, tokenizer, seqlen=args.seqlen, max_samples=8 if args.demo else None)
    tasks = [t for t in args.tasks.split(",") if t]
    report: dict[str, dict] = {}

    def evaluate(name: str, m: torch.nn.Module) -> None:
        entry = {"params": sum(p.numel() for p in m.parameters()),
                 "ppl": evaluate_perplexity(m, text, batch_size=args.batch_size).ppl}
        if tasks:
            from hf_shedder.evaluation.harness import evaluate_tasks

            entry["tasks"] = evaluate_tasks(m, tokenizer, tasks, batch_size=args.batch_size,
                                            limit=args.eval_limit).to_dict()
        report[name] = entry
        print(name, json.dumps({k: v for k, v in entry.items() if k != "tasks"}))

    evaluate("base", model)
    evaluate("pruned", pruned)

    # 4. recovery tuning (LoRA on in_proj/out_proj/MLP, merged back), then its evaluation
    if not args.skip_recovery:
        from hf_shedder.recovery import default_training_args, recover

        rec_dir = os.path.join(args.out, "recovered")
        overrides = {"max_steps": args.recovery_steps} if args.recovery_steps else {}
        if args.demo:
            overrides.update(per_device_train_batch_size=2, gradient_accumulation_steps=1, logging_steps=1)
        train_args = default_training_args(os.path.join(rec_dir, "checkpoints"), **overrides)
        recovered = recover(pruned, tokenizer, args.recovery_data, rec_dir, training_args=train_args,
                            overwrite=True, export=None).model
        evaluate("recovered", recovered)
    write_json(os.path.join(args.out, "report.json"), report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
