"""``hf-shedder apply --model M --plan plan.json --out DIR``."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="base model: hub name or local directory")
    p.add_argument("--plan", required=True, help="plan JSON (hf_shedder format or a Mamba-Shedder reference file)")
    p.add_argument("--out", required=True, help="output directory for the pruned model")
    p.add_argument("--export", choices=["hf_shedder", "remote_code", "plain", "mamba_ssm"], default="remote_code",
                   help="checkpoint flavour (default: remote_code, loadable with and without hf_shedder); plain and "
                        "mamba_ssm (Mamba/Mamba-2, served by mamba-ssm's MambaLMHeadModel) hold block-only plans")
    p.add_argument("--dtype", default=None, help="load/save dtype (float32, bfloat16, float16); default: as stored")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def run(args: argparse.Namespace) -> int:
    from ..arch import get_adapter
    from ..loading import count_parameters, load_model, parse_dtype
    from ..modeling import PrunedMambaForCausalLM
    from ..outputs import staged_directory
    from ..records import PLAN_FILE, PROVENANCE_FILE, STOCK_EXPORTS, library_versions
    from ..tokenizer_choice import output_tokenizer_choice
    from ..units import atomic_write_json, load_plan_for

    model = load_model(args.model, dtype=parse_dtype(args.dtype))
    adapter = get_adapter(model)
    plan = load_plan_for(adapter, args.plan)
    before = count_parameters(model)
    pruned = PrunedMambaForCausalLM.from_base(model, plan, provenance={"base_model": args.model}, inplace=True)
    after = count_parameters(pruned)
    chosen = output_tokenizer_choice(args.model, getattr(model.config, "vocab_size", None))
    pruned.config.provenance = {**pruned.config.provenance, "metrics": {"params_before": before, "params_after": after},
                                "versions": library_versions(),
                                **({"tokenizer": chosen.record()} if chosen is not None else {})}
    export = None if args.export == "hf_shedder" else args.export
    with staged_directory(args.out, overwrite=args.overwrite) as tmp:
        pruned.save_pretrained(tmp, export=export)
        plan_full = pruned.config.get_plan()
        plan_full.save(tmp / PLAN_FILE)
        if export in STOCK_EXPORTS:  # a stock config has no room for the provenance
            atomic_write_json(tmp / PROVENANCE_FILE, pruned.config.provenance)
        if chosen is not None:
            chosen.tokenizer.save_pretrained(tmp)
    note = get_adapter(pruned.model).extraction_note()  # e.g. Zamba2's untied copies
    if note:
        print(note)
    print(f"pruned {plan.summary()}: {before:,} -> {after:,} parameters ({after / before:.1%}); saved to {args.out}")
    return 0
