"""``hf-shedder info DIR``: what was removed and parameter counts before/after."""

from __future__ import annotations

import argparse
import json
import os

from ..config import ShedderConfig
from ..errors import CheckpointError
from ..loading import skeleton_parameters


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", help="a directory saved by hf-shedder apply/prune")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def describe(model_dir: str) -> dict:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{model_dir} has no config.json: not a saved model directory")
    with open(path) as f:
        raw = json.load(f)
    if raw.get("model_type") != ShedderConfig.model_type:
        raise CheckpointError(
            f"{model_dir} is a plain {raw.get('model_type')!r} checkpoint, not an hf_shedder pruned model"
        )
    config = ShedderConfig.from_pretrained(model_dir)
    base, plan = config.get_base_config(), config.get_plan()
    before, after = skeleton_parameters(base), skeleton_parameters(base, plan)
    return {
        "base_model": config.provenance.get("base_model"),
        "base_model_type": base.model_type,
        "family": plan.family,
        "num_layers": plan.num_layers,
        "removed": [u.to_dict() for u in plan],
        "summary": plan.summary(),
        "params_before": before,
        "params_after": after,
        "params_ratio": after / before,
        "provenance": config.provenance,
    }


def run(args: argparse.Namespace) -> int:
    info = describe(args.model_dir)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"base model : {info['base_model'] or 'unknown'} ({info['base_model_type']}, {info['num_layers']} layers)")
    print(f"removed    : {info['summary']}")
    for i, u in enumerate(info["removed"]):
        extra = f" indices={u['indices']}" if u.get("indices") else ""
        print(f"  {i:3d}. {u['kind']:<12} layer {u['layer']}{extra}")
    print(f"parameters : {info['params_before']:,} -> {info['params_after']:,} ({info['params_ratio']:.1%})")
    return 0
