"""``hf-shedder info DIR``: what was removed and parameter counts before/after."""

from __future__ import annotations

import argparse
import json
import os

from ..errors import CheckpointError
from ..records import PLAN_FILE, folder_plan, folder_provenance
from ..units import Plan


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", help="a directory saved by hf-shedder apply/prune")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def describe(model_dir: str) -> dict:
    """What a pruned folder removed and its parameter counts: an hf_shedder checkpoint, or a plain export
    (stock config + ``shedder_plan.json``; the base count comes from ``shedder_provenance.json`` if present)."""
    from ..config import ShedderConfig
    from ..loading import skeleton_parameters

    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{model_dir} has no config.json: not a saved model directory")
    with open(path) as f:
        raw = json.load(f)
    if raw.get("model_type") != ShedderConfig.model_type:
        return _describe_plain(model_dir, raw)
    config = ShedderConfig.from_pretrained(model_dir)
    base, plan = config.get_base_config(), config.get_plan()
    before, after = skeleton_parameters(base), skeleton_parameters(base, plan)
    return _description("hf_shedder", base.model_type, plan, before, after, config.provenance)


def _describe_plain(model_dir: str, raw: dict) -> dict:
    """A stock checkpoint with hf_shedder's plan beside it: Transformers' (plain) or mamba-ssm's."""
    from ..loading import load_config, skeleton_parameters
    from ..mamba_ssm_format import FORMAT as MAMBA_SSM
    from ..mamba_ssm_format import is_mamba_ssm_config

    export = MAMBA_SSM if is_mamba_ssm_config(raw) else "plain"
    config = load_config(model_dir)
    if not os.path.isfile(os.path.join(model_dir, PLAN_FILE)):
        raise CheckpointError(
            f"{model_dir} is a {'mamba-ssm' if export == MAMBA_SSM else 'plain'} {config.model_type!r} checkpoint "
            f"without {PLAN_FILE}: not an hf_shedder pruned model (or an export whose plan file was removed)"
        )
    plan = folder_plan(model_dir)
    provenance = folder_provenance(model_dir)
    after = skeleton_parameters(config)
    before = (provenance.get("metrics") or {}).get("params_before")
    return _description(export, config.model_type, plan, before, after, provenance)


def _description(export: str, base_type: str | None, plan: Plan, before: int | None, after: int,
                 provenance: dict) -> dict:
    return {
        "export": export,
        "base_model": provenance.get("base_model"),
        "base_model_type": base_type,
        "family": plan.family,
        "num_layers": plan.num_layers,
        "removed": [u.to_dict() for u in plan],
        "summary": plan.summary(),
        "params_before": before,
        "params_after": after,
        "params_ratio": after / before if before else None,
        "provenance": provenance,
    }


def run(args: argparse.Namespace) -> int:
    info = describe(args.model_dir)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    plain = {"plain": " (plain export: a stock checkpoint, plan from shedder_plan.json)",
             "mamba_ssm": " (mamba-ssm export: MambaLMHeadModel checkpoint, plan from shedder_plan.json)",
             }.get(info["export"], "")
    print(f"base model : {info['base_model'] or 'not recorded'} ({info['base_model_type']}, {info['num_layers']} "
          f"layers){plain}")
    print(f"removed    : {info['summary']}")
    for i, u in enumerate(info["removed"]):
        extra = f" indices={u['indices']}" if u.get("indices") else ""
        print(f"  {i:3d}. {u['kind']:<12} layer {u['layer']}{extra}")
    if info["params_before"]:
        print(f"parameters : {info['params_before']:,} -> {info['params_after']:,} ({info['params_ratio']:.1%})")
    else:
        print(f"parameters : {info['params_after']:,} (base count not recorded)")
    return 0
