"""``hf-shedder prune --model M --units ssm --steps K --calibration alpaca --out DIR [--apply]``."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..defaults import CALIBRATION_MODES, NORMALIZE_CHOICES, valid_sources
from ..errors import SearchError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="base model: hub name or local directory")
    p.add_argument("--units", default="block", help="comma-separated unit kinds, e.g. block, ssm or ssm,block")
    p.add_argument("--steps", type=int, required=True, help="units to remove (one per greedy step)")
    p.add_argument("--calibration", default="alpaca",
                   help=f"calibration data: {' | '.join(valid_sources())} | a local .txt/.json/.jsonl file")
    p.add_argument("--samples", type=int, default=256, help="calibration samples (default 256)")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per calibration sample (default 2048)")
    p.add_argument("--seed", type=int, default=42, help="calibration sampling seed (default 42)")
    p.add_argument("--calibration-mode", choices=CALIBRATION_MODES, default="windows",
                   help="windows: --samples windows of --seqlen tokens drawn from the whole text (default); "
                        "reference: --samples rows drawn at random, joined and cut into --seqlen windows, "
                        "as Mamba-Shedder's prune.py")
    p.add_argument("--out", required=True, help="output directory (journal, plan, trajectory); re-run to resume")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: as stored; float32 on CPU)")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda if available)")
    p.add_argument("--device-map", default=None, help="e.g. auto: spread a large model over the GPUs (accelerate)")
    p.add_argument("--exact-reference", action="store_true",
                   help="reproduce the reference's prune.py: plain loop, fp16, its batch size / seqlen / row sampling / "
                        "ignore rule per family, CE on fp16 logits; also writes pruned_model_configs/ and log.json")
    p.add_argument("--wide-block-candidates", action="store_true",
                   help="Hymba: offer every block the KV-sharing rules allow, not only the reference's candidates "
                        "(last layer of each KV-reuse group + global-attention layers)")
    p.add_argument("--exact", action="store_true",
                   help="no racing: every candidate is measured on all batches (except exact early abandon)")
    p.add_argument("--race-delta", type=float, default=None, metavar="DELTA",
                   help="racing on paired per-sample NLL differences (the default): probability per step that "
                        "the step's true best is raced out (default 1e-3)")
    p.add_argument("--race-min-samples", type=int, default=None,
                   help="no candidate is raced out before this many calibration samples (default 8)")
    p.add_argument("--no-early-abandon", action="store_true",
                   help="with --exact: measure every candidate on every batch")
    p.add_argument("--race", type=float, default=None, metavar="FRACTION",
                   help="APPROXIMATE: after this fraction of the batches keep only --race-keep candidates")
    p.add_argument("--race-keep", type=int, default=3)
    p.add_argument("--target-params", type=float, default=None,
                   help="stop once the parameter count is at most this fraction of the base model's")
    p.add_argument("--max-ppl", type=float, default=None, help="stop before a step whose perplexity exceeds this")
    p.add_argument("--normalize", choices=[c for c in NORMALIZE_CHOICES if c], default=None,
                   help="params: rank candidates by NLL increase per removed parameter")
    p.add_argument("--split", choices=["batches", "candidates"], default="batches",
                   help="several processes (torchrun): split calibration batches (default) or candidates")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer name/folder (default: the model's own; GPT-NeoX-20B for mamba-ssm checkpoints)")
    p.add_argument("--apply", action="store_true", help="extract the pruned model to OUT/model at the end")
    p.add_argument("--export", choices=["hf_shedder", "remote_code", "plain", "mamba_ssm"], default="remote_code",
                   help="with --apply: checkpoint flavour of OUT/model (default: remote_code); plain and mamba_ssm "
                        "hold block-only plans")
    p.add_argument("--no-progress", action="store_true")


def _drop_stale_model(folder: Path, plan: object) -> None:
    """An extracted model from an earlier run must not sit beside a plan it no longer matches."""
    import shutil

    from ..records import PLAN_FILE
    from ..units import Plan

    if not folder.is_dir():
        return
    try:
        same = list(Plan.load(folder / PLAN_FILE)) == list(plan)
    except Exception:  # no or unreadable plan file: nothing says which plan the folder holds
        same = False
    if not same:
        shutil.rmtree(folder)
        print(f"removed {folder}: it was extracted from an earlier plan, not from this one (add --apply to extract "
              "this plan)")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..data import load_calibration
    from ..distributed import init_from_env, rank_device
    from ..loading import compute_dtype, count_parameters, load_model, parse_dtype, stored_dtype
    from ..records import STOCK_EXPORTS
    from ..search import SearchSettings, search
    from ..tokenizer_choice import choose_tokenizer

    if args.steps < 1:
        raise SearchError(f"--steps must be >= 1, got {args.steps}")
    kinds = {k.strip() for k in args.units.split(",") if k.strip()}
    if args.apply and args.export in STOCK_EXPORTS and kinds - {"block"}:
        raise SearchError(f"--export {args.export} holds whole-block removal only, and --units {args.units} can remove "
                          "other units; use --export remote_code or hf_shedder, or --units block")
    if args.exact and (args.race_delta is not None or args.race is not None):
        raise SearchError("--exact turns racing off; drop --race-delta / --race (or --exact)")
    race = {} if args.race_delta is None else {"race_delta": args.race_delta}
    if args.exact:
        race["race_delta"] = None
    if args.race_min_samples is not None:
        race["race_min_samples"] = args.race_min_samples
    device = rank_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    settings = SearchSettings(
        units=args.units, steps=args.steps, target_params=args.target_params, max_ppl=args.max_ppl,
        calibration=args.calibration, samples=args.samples, seqlen=args.seqlen, seed=args.seed,
        calibration_mode=args.calibration_mode, batch_size=args.batch_size, dtype=None, device=None,
        exact_reference=args.exact_reference, normalize=args.normalize, early_abandon=not args.no_early_abandon, race_fraction=args.race,
        race_keep=args.race_keep, split=args.split, **race,
    )
    if args.wide_block_candidates:
        settings.extra["wide_block_candidates"] = True
    comm = init_from_env(device)
    chosen = choose_tokenizer(args.model, args.tokenizer)  # refuses a tokenizer that does not fit, before any work
    if comm.is_main:
        print(chosen.describe(), flush=True)
    tokenizer = chosen.tokenizer
    kwargs = {"device_map": args.device_map} if args.device_map else {}
    # with --device-map the model lands on the GPUs when there are any, else on the CPU
    dtype = compute_dtype(parse_dtype(args.dtype), device if not args.device_map
                          else ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_model(args.model, dtype=dtype, device=None if args.device_map else device, **kwargs)
    if args.exact_reference:
        import dataclasses

        from ..arch import family_of
        from ..search.reference_mode import reference_overrides

        fixed = reference_overrides(family_of(model.config.model_type), tokenizer, model.config, str(device))
        settings = dataclasses.replace(settings, **fixed)
        print(f"--exact-reference: {fixed}")
    calib = load_calibration(args.calibration, tokenizer, n_samples=settings.samples, seqlen=settings.seqlen,
                             seed=settings.seed, mode=settings.calibration_mode)
    result = search(model, calib, settings, out_dir=args.out, progress=not args.no_progress, comm=comm)
    if comm.is_main:
        c = result.counters
        print(f"plan: {[str(u) for u in result.plan]} ({result.stop_reason})")
        if result.stop_reason == "no_candidates":
            print(f"note: stopped after {len(result.plan)} of {args.steps} steps: no removable {args.units} unit "
                  "is left (removing a unit can take others with it, e.g. a block the units inside it)")
        print(f"perplexity {result.base_ppl:.4g} -> {result.trajectory[-1]['ppl']:.4g}; parameters "
              f"{result.base_params:,} -> {result.trajectory[-1]['params']:,}")
        print(f"work: {c['layer_evals']:,} layer evaluations, {c['head_evals']:,} head evaluations, {c['seconds']:.1f} s")
        print(f"wrote {args.out}/plan.json, trajectory.csv/json/png, journal.json")
    if not args.apply and comm.is_main:
        _drop_stale_model(Path(args.out) / "model", result.plan)
    if args.apply and comm.is_main:
        from ..modeling import PrunedMambaForCausalLM
        from ..outputs import staged_directory
        from ..records import PLAN_FILE, PROVENANCE_FILE, search_provenance, write_search_record
        from ..units import atomic_write_json

        before = count_parameters(model)
        if args.dtype is None and (saved := stored_dtype(args.model)) not in (None, dtype):
            model.to(saved)  # computed in float32 on CPU; saved as the base model was
            model.config.dtype = saved
        pruned = PrunedMambaForCausalLM.from_base(model, result.plan, inplace=True)
        after = count_parameters(pruned)
        # provenance for info / card: base model, search settings, calibration ppl, parameter counts, versions
        pruned.config.provenance = search_provenance(
            args.model, settings.to_dict(), result.base_ppl, result.trajectory[-1]["ppl"],
            before, after, result.stop_reason)
        pruned.config.provenance["tokenizer"] = chosen.record()
        export = None if args.export == "hf_shedder" else args.export
        target = Path(args.out) / "model"
        with staged_directory(target, overwrite=True) as tmp:
            pruned.save_pretrained(tmp, export=export)
            pruned.config.get_plan().save(tmp / PLAN_FILE)
            if export in STOCK_EXPORTS:  # a stock config has no room for the provenance
                atomic_write_json(tmp / PROVENANCE_FILE, pruned.config.provenance)
            if tokenizer.eos_token is not None:  # never save one that cannot pad (special tokens completed)
                tokenizer.save_pretrained(tmp)
            write_search_record(tmp, pruned.config.provenance, result.plan, result.trajectory, search_dir=args.out)
        from ..arch import get_adapter

        note = get_adapter(pruned.model).extraction_note()  # e.g. Zamba2's untied copies
        if note:
            print(note)
        print(f"pruned model: {before:,} -> {after:,} parameters ({after / before:.1%}); saved to {target}")
    comm.barrier()
    return 0
