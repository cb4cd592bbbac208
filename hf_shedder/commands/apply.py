"""``hf-shedder apply --model M --plan plan.json --out DIR``."""

from __future__ import annotations

import argparse

from ..arch import get_adapter
from ..data import output_tokenizer
from ..loading import count_parameters, load_model, parse_dtype
from ..modeling import PrunedMambaForCausalLM
from ..outputs import staged_directory
from ..records import PLAN_FILE, PROVENANCE_FILE, library_versions
from ..units import atomic_write_json, load_plan_for


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="base model: hub name or local directory")
    p.add_argument("--plan", required=True, help="plan JSON (hf_shedder format or a Mamba-Shedder reference file)")
    p.add_argument("--out", required=True, help="output directory for the pruned model")
    p.add_argument("--export", choices=["hf_shedder", "remote_code", "plain"], default="remote_code",
                   help="checkpoint flavour (default: remote_code, loadable with and without hf_shedder)")
    p.add_argument("--dtype", default=None, help="load/save dtype (float32, bfloat16, float16); default: as stored")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def run(args: argparse.Namespace) -> int:
    model = load_model(args.model, dtype=parse_dtype(args.dtype))
    adapter = get_adapter(model)
    plan = load_plan_for(adapter, args.plan)
    before = count_parameters(model)
    pruned = PrunedMambaForCausalLM.from_base(model, plan, provenance={"base_model": args.model}, inplace=True)
    after = count_parameters(pruned)
    pruned.config.provenance = {**pruned.config.provenance, "metrics": {"params_before": before, "params_after": after},
                                "versions": library_versions()}
    export = None if args.export == "hf_shedder" else args.export
    with staged_directory(args.out, overwrite=args.overwrite) as tmp:
        pruned.save_pretrained(tmp, export=export)
        plan_full = pruned.config.get_plan()
        plan_full.save(tmp / PLAN_FILE)
        if export == "plain":  # a stock config has no room for the provenance
            atomic_write_json(tmp / PROVENANCE_FILE, pruned.config.provenance)
        tokenizer = output_tokenizer(args.model, getattr(model.config, "vocab_size", None))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    from ..arch.zamba2_uses import untie_message

    if untie_message(pruned):  # per-use Zamba2 units: the saved model holds untied copies
        print(untie_message(pruned))
    print(f"pruned {plan.summary()}: {before:,} -> {after:,} parameters ({after / before:.1%}); saved to {args.out}")
    return 0
