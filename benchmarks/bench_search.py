#!/usr/bin/env python
"""Search cost on a GPU: the plain reference loop vs the accelerated search (issue 7, part 1).

Same model, same calibration tokens, same steps, in one process: wall time of each, their ratio, the
layer evaluations each did (counted with forward hooks on the decoder layers) and whether the plans
are identical. Models: a Mamba-2 (SSM search, the paper's mamba2 setting) and a Mamba-1 (block
search) at realistic depth, random weights, bf16, with the fast kernels (see gpu_setup.sh). Also
times the parts (one full forward, one decoder layer, one chunked head + NLL) to say where the time
goes, and (optional, approximate) the racing variant.

GPU:  python benchmarks/bench_search.py --out $OUT/search
CPU smoke test (tiny sizes): python benchmarks/bench_search.py --quick --out /tmp/bench_search
Trained models (the bundled 16-layer reference checkpoints, bundled calibration text, fp32), where
candidates really differ, so early abandon and racing can be judged on plans that mean something:
      python benchmarks/bench_search.py --reference --samples 32 --seqlen 128 --batch-size 4 --steps 4 \
          --race 0.25 --race 0.5 --out /tmp/bench_search_ref
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_shedder.data import CalibrationSet  # noqa: E402
from hf_shedder.evaluation.perplexity import head_nll, token_nll  # noqa: E402
from hf_shedder.search import SearchSettings, search  # noqa: E402

MODELS: dict[str, dict[str, Any]] = {
    # ~0.86B Mamba-2 (the DESIGN.md timing model): 48 layers, d=1536, head_dim 64, state 128
    "mamba2": {"units": ("ssm",), "config": dict(hidden_size=1536, num_hidden_layers=48, num_heads=48, head_dim=64,
                                                  state_size=128, n_groups=1, expand=2, chunk_size=256,
                                                  vocab_size=50280, tie_word_embeddings=True)},
    # ~0.79B Mamba-1: 48 layers, d=1536, state 16
    "mamba": {"units": ("block",), "config": dict(hidden_size=1536, num_hidden_layers=48, state_size=16, expand=2,
                                                   vocab_size=50280, tie_word_embeddings=True)},
}
QUICK = {
    "mamba2": dict(hidden_size=64, num_hidden_layers=6, num_heads=8, head_dim=16, state_size=16, n_groups=1,
                   expand=2, chunk_size=16, vocab_size=512),
    "mamba": dict(hidden_size=64, num_hidden_layers=6, state_size=8, expand=2, vocab_size=512),
}


def build(family: str, cfg: dict[str, Any], device: str, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

    config = (Mamba2Config if family == "mamba2" else MambaConfig)(**cfg)
    cls = Mamba2ForCausalLM if family == "mamba2" else MambaForCausalLM
    torch.manual_seed(0)
    with torch.device(device):
        model = cls(config)
    return model.to(dtype).eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeat: int = 3) -> float:
    fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync(device)
    return (time.perf_counter() - t) / repeat


@torch.no_grad()
def parts(model, calib: CalibrationSet, batch_size: int, device: str) -> dict[str, float]:
    """Seconds for one batch: full model forward + NLL, one decoder layer, embedding, head + NLL."""
    from hf_shedder import get_adapter

    ad = get_adapter(model)
    ids = calib.input_ids[:batch_size].to(device)
    am = calib.attention_mask[:batch_size].to(device)
    hidden, ctx = ad.embed(ids, am)
    head = ad.lm_head()
    mid = ad.num_layers() // 2
    return {
        "full_forward_nll": timed(lambda: token_nll(model(input_ids=ids, attention_mask=am, use_cache=False).logits,
                                                    ids, am), device),
        "one_layer": timed(lambda: ad.run_layer(mid, hidden, ctx), device),
        "head_nll": timed(lambda: head_nll(hidden, lambda x: head(ad.final_norm(x).to(head.weight.dtype)), ids, am),
                          device),
        "embed": timed(lambda: ad.embed(ids, am), device),
    }


def reference_model(name: str, args: argparse.Namespace) -> tuple[torch.nn.Module, CalibrationSet, dict[str, Any]]:
    """A bundled trained reference model (fp32; Mamba-2 SSD chunk 16, exact and cheaper on CPU) and
    ``samples`` windows of the bundled calibration text."""
    import hf_shedder
    from hf_shedder.data import load_calibration, load_tokenizer
    from hf_shedder.loading import load_model

    path = Path(hf_shedder.__file__).parent / "assets" / "reference" / name
    model = load_model(str(path), dtype=torch.float32, **({} if name == "mamba" else {"chunk_size": 16}))
    model.to(args.device)
    calib = load_calibration("bundled", load_tokenizer(), n_samples=args.samples, seqlen=args.seqlen, seed=42)
    cfg = {k: getattr(model.config, k) for k in ("num_hidden_layers", "hidden_size", "vocab_size")}
    return model, calib, cfg


def run_one(name: str, args: argparse.Namespace) -> dict[str, Any]:
    spec = MODELS[name]
    if args.reference:
        model, calib, cfg = reference_model(name, args)
    else:
        cfg = QUICK[name] if args.quick else dict(spec["config"], num_hidden_layers=args.layers,
                                                    hidden_size=args.hidden)
        if name == "mamba2" and not args.quick:
            cfg["num_heads"] = cfg["expand"] * cfg["hidden_size"] // cfg["head_dim"]
        dtype = torch.float32 if args.quick else torch.bfloat16
        model = build(name, cfg, args.device, dtype)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, cfg["vocab_size"], (args.samples, args.seqlen), generator=g)
        calib = CalibrationSet(ids, torch.ones_like(ids), source="random", seed=0)
    n_params = sum(p.numel() for p in model.parameters())
    units = tuple(args.units.split(",")) if args.units else spec["units"]
    out: dict[str, Any] = {"model": name, "reference": args.reference, "config": cfg, "params": n_params,
                           "units": list(units),
                           "samples": args.samples, "seqlen": args.seqlen, "batch_size": args.batch_size,
                           "steps": args.steps}
    print(f"[{name}] {n_params / 1e6:.0f}M params, {cfg['num_hidden_layers']} layers, units {units}", flush=True)
    out["parts_s"] = parts(model, calib, args.batch_size, args.device)  # also warms up kernels / Triton JIT
    print(f"[{name}] parts (s/batch): {out['parts_s']}", flush=True)
    runs = {"plain": dict(exact_reference=True), "accelerated": {}}
    if args.reference:
        runs["accelerated, no early abandon"] = dict(early_abandon=False)
    for frac in args.race or []:
        runs[f"raced {frac:g} (approx.)"] = dict(race_fraction=frac, race_keep=args.race_keep)
    for label, kw in runs.items():
        settings = SearchSettings(units=units, steps=args.steps, batch_size=args.batch_size,
                                  samples=args.samples, seqlen=args.seqlen, calibration="random", **kw)
        sync(args.device)
        t = time.perf_counter()
        res = search(model, calib, settings, progress=False)
        sync(args.device)
        wall = time.perf_counter() - t
        statuses: dict[str, int] = {}
        for st in res.steps:
            for c in st["candidates"]:
                statuses[c["status"]] = statuses.get(c["status"], 0) + 1
        out[label] = {"wall_s": wall, "plan": [str(u) for u in res.plan], "counters": res.counters,
                      "ppl": [r["ppl"] for r in res.trajectory], "statuses": statuses}
        print(f"[{name}] {label}: {wall:.1f} s, plan {out[label]['plan']}, {res.counters}, {statuses}", flush=True)
    p, a = out["plain"], out["accelerated"]
    out["speedup"] = p["wall_s"] / a["wall_s"]
    out["layer_eval_ratio"] = p["counters"]["layer_evals"] / a["counters"]["layer_evals"]
    out["plans_identical"] = p["plan"] == a["plan"]
    for label in [k for k in runs if k not in ("plain", "accelerated")]:
        r = out[label]
        r["speedup_vs_plain"] = p["wall_s"] / r["wall_s"]
        r["layer_eval_ratio"] = p["counters"]["layer_evals"] / r["counters"]["layer_evals"]
        r["same_plan_as_plain"] = r["plan"] == p["plan"]
    # the time model: plain = forwards x t_forward; accelerated = layer evals x t_layer + heads x t_head
    pt = out["parts_s"]
    out["model_s"] = {
        "plain": p["counters"]["head_evals"] * pt["full_forward_nll"],
        "accelerated": a["counters"]["layer_evals"] * pt["one_layer"] + a["counters"]["head_evals"] * pt["head_nll"],
    }
    print(f"[{name}] speed-up {out['speedup']:.2f}x, layer-eval ratio {out['layer_eval_ratio']:.2f}x, "
          f"plans identical: {out['plans_identical']}", flush=True)
    del model
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def markdown(results: list[dict[str, Any]], env: dict[str, Any], cmd: str) -> str:
    lines = [
        f"## Search cost: plain reference loop vs accelerated search ({env['date']})",
        "",
        f"Device: {env['device']}; torch {env['torch']}, transformers {env['transformers']}, "
        f"mamba-ssm {env['mamba_ssm']}, causal-conv1d {env['causal_conv1d']}, Python {env['python']}.",
        f"Command: `{cmd}`",
        "",
        ("Trained reference checkpoints (hf_shedder/assets/reference), fp32, bundled calibration text"
         if results and results[0].get("reference") else "Random weights, bf16, random calibration tokens")
        + "; every search on the same model, tokens and steps, one process.",
        "",
        "| model | units | calib | steps | plain s | accel. s | speed-up | layer evals plain / accel. | ratio | heads | same plan |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        p, a = r["plain"], r["accelerated"]
        c = r["config"]
        lines.append(
            f"| {r['model']} {r['params'] / 1e6:.0f}M ({c['num_hidden_layers']} x {c['hidden_size']}) | "
            f"{','.join(r['units'])} | {r['samples']} x {r['seqlen']} (batch {r['batch_size']}) | {r['steps']} | "
            f"{p['wall_s']:.1f} | {a['wall_s']:.1f} | {r['speedup']:.2f}x | {p['counters']['layer_evals']:,} / "
            f"{a['counters']['layer_evals']:,} | {r['layer_eval_ratio']:.2f}x | {p['counters']['head_evals']} / "
            f"{a['counters']['head_evals']} | {'yes' if r['plans_identical'] else 'NO'} |")
    lines += ["", "Per batch (s): " + "; ".join(
        f"{r['model']}: forward+NLL {r['parts_s']['full_forward_nll']:.3f}, one layer {r['parts_s']['one_layer']:.4f}, "
        f"head+NLL {r['parts_s']['head_nll']:.3f}" for r in results)]
    lines.append("Time model (layer evals x one layer + heads x head): " + "; ".join(
        f"{r['model']}: plain {r['model_s']['plain']:.1f} s, accelerated {r['model_s']['accelerated']:.1f} s"
        for r in results))
    for r in results:
        for label, x in r.items():
            if isinstance(x, dict) and "speedup_vs_plain" in x:
                lines.append(f"- {r['model']} {label}: {x['wall_s']:.1f} s, {x['speedup_vs_plain']:.2f}x vs plain, "
                             f"layer evals {x['counters']['layer_evals']:,} ({x['layer_eval_ratio']:.2f}x fewer), "
                             f"heads {x['counters']['head_evals']}, candidates {x['statuses']}, "
                             f"same plan as plain: {x['same_plan_as_plain']}")
    return "\n".join(lines) + "\n"


def environment(device: str) -> dict[str, Any]:
    import transformers

    def version(mod: str) -> str:
        try:
            return __import__(mod).__version__
        except Exception:
            return "not installed"

    name = torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu"
    return {"date": time.strftime("%Y-%m-%d"), "device": name, "torch": torch.__version__,
            "transformers": transformers.__version__, "mamba_ssm": version("mamba_ssm"),
            "causal_conv1d": version("causal_conv1d"), "python": platform.python_version()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", default="mamba2,mamba")
    ap.add_argument("--units", default=None, help="override the unit kinds (default: ssm for mamba2, block for mamba)")
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--samples", type=int, default=48)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--race", type=float, action="append", default=None,
                    help="also run racing with this fraction (approximate); repeat for several")
    ap.add_argument("--race-keep", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, fp32 (CPU smoke test)")
    ap.add_argument("--reference", action="store_true",
                    help="the bundled trained 16-layer reference models and calibration text instead of random ones")
    args = ap.parse_args()
    if args.quick:
        args.samples, args.seqlen, args.batch_size = min(args.samples, 4), min(args.seqlen, 32), 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment(args.device)
    print(f"[env] {env}", flush=True)
    results = []
    for name in args.models.split(","):
        results.append(run_one(name, args))
        (out / "search_results.json").write_text(json.dumps({"env": env, "results": results}, indent=2))
    cmd = "python benchmarks/bench_search.py " + " ".join(sys.argv[1:])
    md = markdown(results, env, cmd)
    (out / "search_section.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
