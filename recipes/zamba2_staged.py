#!/usr/bin/env python
"""The Mamba-Shedder reference's staged Zamba2 search (hybrid/Zamba2-Pruning/prune_hybrid.py), on hf_shedder.

Three greedy stages, each on top of the one before and each with its own calibration sample (drawn one
after the other from one seeded stream, as the reference): blocks (``mamba_block``, ``mha``, ``mlp``),
MLP widths (``mlp_width``, a prefix kept per use of the shared block), SSMs (``ssm``). With --exact-reference
(default) the reference's numerics and its files (pruned_model_configs/config.{stage}.{step}.json, log.json)
are produced beside ours; --apply extracts the result (touched uses get their own untied copies).

  python recipes/zamba2_staged.py --model Zyphra/Zamba2-2.7B --out runs/zamba2_staged --device cuda
Offline smoke run on a tiny random Zamba2 and bundled data (CPU):  --demo
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

import hf_shedder  # noqa: F401  (registers the pruned model class)
from hf_shedder.arch import family_of
from hf_shedder.data import load_tokenizer, tokenizer_for_model
from hf_shedder.loading import load_model
from hf_shedder.search import SearchSettings
from hf_shedder.search.reference_mode import reference_overrides
from hf_shedder.search.staged import ZAMBA2_STAGES, Stage, stage_calibrations, staged_search


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="Zyphra/Zamba2-2.7B")
    p.add_argument("--out", default="runs/zamba2_staged")
    p.add_argument("--calibration", default="alpaca")
    p.add_argument("--samples", type=int, nargs=3, default=[256, 256, 256], help="rows per stage (block, width, ssm)")
    p.add_argument("--steps", type=int, nargs=3, default=[s.steps for s in ZAMBA2_STAGES])
    p.add_argument("--mlp-width-group", type=int, default=None, help="channels per width step (reference: 1024)")
    p.add_argument("--seqlen", type=int, default=None, help="default: the reference's 2048")
    p.add_argument("--no-exact-reference", action="store_true", help="accelerated search (same plan, fp32 numbers)")
    p.add_argument("--apply", action="store_true", help="extract the pruned model to OUT/model")
    p.add_argument("--device", default=None)
    p.add_argument("--demo", action="store_true", help="tiny random Zamba2 + bundled data, offline, CPU")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.demo:
        from transformers import Zamba2Config, Zamba2ForCausalLM

        tokenizer = load_tokenizer(None)
        torch.manual_seed(0)
        model = Zamba2ForCausalLM(Zamba2Config(
            vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=6, mamba_d_state=8, n_mamba_heads=4,
            layers_block_type=["mamba", "hybrid", "mamba", "hybrid", "mamba", "hybrid"], num_attention_heads=4,
            num_key_value_heads=4, intermediate_size=48, num_mem_blocks=2, use_shared_attention_adapter=True,
            adapter_rank=4, chunk_size=8, use_mamba_kernels=False)).eval()
        args.calibration, args.samples, args.steps, args.seqlen = "bundled", [1, 1, 1], [2, 2, 2], 64
    else:
        tokenizer = tokenizer_for_model(args.model)
        model = load_model(args.model, device=device)
    settings = SearchSettings(units=("block",), steps=1, seqlen=args.seqlen or 2048, batch_size=2)
    if not args.no_exact_reference:
        fixed = reference_overrides(family_of(model.config.model_type), tokenizer, model.config, device)
        settings = dataclasses.replace(settings, **{**fixed, "seqlen": args.seqlen or fixed["seqlen"]})
    if args.mlp_width_group:
        settings.extra["mlp_width_group"] = args.mlp_width_group
    stages = [Stage(s.name, s.units, n) for s, n in zip(ZAMBA2_STAGES, args.steps)]
    calibs = stage_calibrations(args.calibration, tokenizer, args.samples, settings.seqlen, settings.seed)
    if args.demo:  # the bundled text is one long row: a few windows of it are enough for a smoke run
        calibs = [dataclasses.replace(c, input_ids=c.input_ids[:4], attention_mask=c.attention_mask[:4]) for c in calibs]
    results = staged_search(model, calibs, settings, stages, out_dir=args.out)
    plan = results[-1].plan
    print(f"plan: {[str(u) for u in plan]}")
    plan.save(Path(args.out) / "plan.json")
    if args.apply:
        from hf_shedder.arch.zamba2_uses import untie_message
        from hf_shedder.modeling import PrunedMambaForCausalLM

        pruned = PrunedMambaForCausalLM.from_base(model, plan, inplace=True)
        pruned.save_pretrained(Path(args.out) / "model")
        print(untie_message(pruned) or "no use of the shared blocks was untied")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
