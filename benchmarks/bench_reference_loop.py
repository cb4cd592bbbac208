#!/usr/bin/env python
"""The reference's own loop vs hf_shedder's default search, same GPU, same weights, tokens and steps (issue 15).

What a user would otherwise run is Mamba-Shedder's ``prune.py``: mamba-ssm's ``MambaLMHeadModel`` in
fp16, batch 2, one full forward with full logits and CE per candidate and batch
(``benchmarks/reference_loop.py``). This script, in one process:

1. builds a mamba-ssm ``MambaLMHeadModel`` (random weights at the paper's shapes, 64 x 2560, or a
   trained Transformers checkpoint given with ``--checkpoint``, whose weights it copies in);
2. copies the same weights into the Transformers model (``backbone.embedding`` -> ``backbone.embeddings``,
   everything else by the same name) and checks both stacks give the same logits (to fp16 noise);
3. runs k steps of the reference loop (SSM removal for Mamba-2, block removal for Mamba-1) and k steps
   of hf_shedder's default search (racing on paired differences, prefix cache) and, optionally, the
   exact search, on the same calibration tokens; times each, counts layer evaluations, compares plans;
4. writes ``reference_loop.json`` and ``reference_loop.md`` to ``--out`` and prints the markdown.

The reference loop costs ~0.15 s per batch of 2 x 2048 on a 2.7B Mamba-2 (64 candidates x 16 batches
= ~160 s per step): with ``--ref-candidates N`` (or when the time guard says the full loop does not
fit) it is timed on N evenly spaced candidates of the first step and extrapolated to all of them,
which the output says; the plans are then compared with the exact search instead.

GPU (after ``bash benchmarks/gpu_setup.sh``; PYTHONUNBUFFERED=1 keeps the log live):
    python benchmarks/bench_reference_loop.py --out $OUT/refloop --families mamba2 --samples 32 --steps 1
    python benchmarks/bench_reference_loop.py --out $OUT/refloop --checkpoint runs/deep/mamba2 \
        --calibration bundled --samples 64 --seqlen 1024 --steps 3
On a machine without CUDA or mamba-ssm it parses its arguments, says what is missing and exits 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from reference_loop import (  # noqa: E402
    ScanFreeMamba2,
    SkipMambaSsmBlock,
    Swapper,
    reference_search,
)

VOCAB = 50280  # GPT-NeoX padded to a multiple of 8, as the state-spaces checkpoints
UNITS = {"mamba2": "ssm", "mamba": "block"}  # the paper's settings: SSMs of Mamba-2, blocks of Mamba-1


def log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------ configs and weight mapping
def ssm_spec(family: str, layers: int, hidden: int, vocab: int = VOCAB) -> dict[str, Any]:
    """A mamba-ssm ``MambaConfig`` as a dict (mamba-ssm's defaults for the mixers)."""
    if family == "mamba2":
        ssm_cfg = {"layer": "Mamba2", "d_state": 128, "headdim": 64, "ngroups": 1, "expand": 2, "d_conv": 4,
                   "chunk_size": 256}
    else:
        ssm_cfg = {"layer": "Mamba1", "d_state": 16, "expand": 2, "d_conv": 4}
    return {"d_model": hidden, "n_layer": layers, "d_intermediate": 0, "vocab_size": vocab, "ssm_cfg": ssm_cfg,
            "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8,
            "tie_embeddings": True}


def hf_config_from_spec(spec: dict[str, Any]):
    """The Transformers config computing what mamba-ssm computes for ``spec``."""
    from transformers import Mamba2Config, MambaConfig

    s, d = spec["ssm_cfg"], spec["d_model"]
    vocab = math.ceil(spec["vocab_size"] / spec["pad_vocab_size_multiple"]) * spec["pad_vocab_size_multiple"]
    common = dict(hidden_size=d, num_hidden_layers=spec["n_layer"], vocab_size=vocab, tie_word_embeddings=True,
                  residual_in_fp32=spec["residual_in_fp32"], layer_norm_epsilon=1e-5, expand=s["expand"],
                  conv_kernel=s["d_conv"], use_bias=False, use_conv_bias=True, pad_token_id=0, bos_token_id=0,
                  eos_token_id=0)
    if s["layer"] == "Mamba2":
        return Mamba2Config(num_heads=s["expand"] * d // s["headdim"], head_dim=s["headdim"], state_size=s["d_state"],
                            n_groups=s["ngroups"], chunk_size=s["chunk_size"], norm_before_gate=False, **common)
    return MambaConfig(state_size=s["d_state"], time_step_rank=math.ceil(d / 16), **common)


def spec_from_hf_config(config) -> dict[str, Any]:
    """The mamba-ssm config of a Transformers Mamba / Mamba-2 checkpoint (for ``--checkpoint``)."""
    if config.model_type == "mamba2":
        ssm_cfg = {"layer": "Mamba2", "d_state": config.state_size, "headdim": config.head_dim,
                   "ngroups": config.n_groups, "expand": config.expand, "d_conv": config.conv_kernel,
                   "chunk_size": config.chunk_size}
    elif config.model_type == "mamba":
        ssm_cfg = {"layer": "Mamba1", "d_state": config.state_size, "expand": config.expand,
                   "d_conv": config.conv_kernel}
    else:
        raise SystemExit(f"--checkpoint must be a Mamba or Mamba-2 model, got model_type {config.model_type!r}")
    return {"d_model": config.hidden_size, "n_layer": config.num_hidden_layers, "d_intermediate": 0,
            "vocab_size": config.vocab_size, "ssm_cfg": ssm_cfg, "rms_norm": True,
            "residual_in_fp32": config.residual_in_fp32, "fused_add_norm": True, "pad_vocab_size_multiple": 8,
            "tie_embeddings": bool(config.tie_word_embeddings)}


def ssm_to_hf_key(key: str) -> str:
    return "backbone.embeddings." + key[len("backbone.embedding."):] if key.startswith("backbone.embedding.") else key


def hf_to_ssm_key(key: str) -> str:
    return "backbone.embedding." + key[len("backbone.embeddings."):] if key.startswith("backbone.embeddings.") else key


def copy_weights(src: torch.nn.Module, dst: torch.nn.Module, rename) -> None:  # noqa: ANN001
    """Copy every tensor of ``src`` into ``dst`` under ``rename(key)``; any missing or extra key or shape
    mismatch is an error (the two stacks must compute with the same numbers)."""
    sd = {rename(k): v for k, v in src.state_dict().items()}
    target = dst.state_dict()
    tied = {"lm_head.weight"}  # tied to the embedding: a state dict may list it or not
    missing, extra = sorted(set(target) - set(sd) - tied), sorted(set(sd) - set(target) - tied)
    if missing or extra:
        raise RuntimeError(f"weight mapping mismatch: missing {missing[:5]}, unexpected {extra[:5]}")
    for k, v in sd.items():
        if k not in target:
            continue
        if target[k].shape != v.shape:
            raise RuntimeError(f"{k}: shape {tuple(v.shape)} vs {tuple(target[k].shape)}")
        target[k].copy_(v)


# ------------------------------------------------------------------ the run
def environment() -> dict[str, Any]:
    import transformers

    def version(mod: str) -> str:
        try:
            return __import__(mod).__version__
        except Exception:
            return "not installed"

    cuda = torch.cuda.is_available()
    return {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name() if cuda else "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__, "mamba_ssm": version("mamba_ssm"),
            "causal_conv1d": version("causal_conv1d"), "python": platform.python_version()}


def missing_requirements() -> str | None:
    if not torch.cuda.is_available():
        return "CUDA is not available: the reference stack (mamba-ssm) runs on a GPU only"
    try:
        import mamba_ssm  # noqa: F401
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel  # noqa: F401
    except Exception as e:  # ImportError, or a kernel library that fails to load
        return f"mamba_ssm cannot be imported ({e!r}); build it with benchmarks/gpu_setup.sh"
    return None


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def sync() -> None:
    torch.cuda.synchronize()


def build_pair(family: str, args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any], str]:
    """(mamba-ssm model, Transformers model, spec, family) with the same weights, both in ``args.dtype``."""
    from mamba_ssm.models.config_mamba import MambaConfig as SsmConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    from transformers import AutoModelForCausalLM, Mamba2ForCausalLM, MambaForCausalLM

    dtype = getattr(torch, args.dtype)
    if args.checkpoint:
        hf = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=dtype).to("cuda").eval()
        spec = spec_from_hf_config(hf.config)
        family = "mamba2" if hf.config.model_type == "mamba2" else "mamba"
        ref = MambaLMHeadModel(SsmConfig(**spec), device="cuda", dtype=dtype).eval()
        with torch.no_grad():
            copy_weights(hf, ref, hf_to_ssm_key)
        return ref, hf, spec, family
    spec = ssm_spec(family, args.layers, args.hidden)
    torch.manual_seed(args.seed)
    ref = MambaLMHeadModel(SsmConfig(**spec), device="cuda", dtype=dtype).eval()
    config = hf_config_from_spec(spec)
    cls = Mamba2ForCausalLM if family == "mamba2" else MambaForCausalLM
    with torch.device("cuda"):
        hf = cls(config).to(dtype).eval()
    with torch.no_grad():
        copy_weights(ref, hf, ssm_to_hf_key)
    return ref, hf, spec, family


def calibration(args: argparse.Namespace, vocab: int):
    from hf_shedder.data import CalibrationSet, load_calibration, load_tokenizer

    if args.calibration == "bundled":
        return load_calibration("bundled", load_tokenizer(), n_samples=args.samples, seqlen=args.seqlen, seed=args.seed)
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, vocab, (args.samples, args.seqlen), generator=g)
    return CalibrationSet(ids, torch.ones_like(ids), source="random", seed=args.seed)


def run_family(family: str, args: argparse.Namespace, deadline: Deadline) -> dict[str, Any]:
    from hf_shedder.search import SearchSettings, search

    out: dict[str, Any] = {"family": family, "dtype": args.dtype, "errors": []}
    t = time.perf_counter()
    ref, hf, spec, family = build_pair(family, args)
    kind = args.units or UNITS[family]
    if kind == "ssm" and family != "mamba2":
        raise ValueError("SSM removal is wired for Mamba-2 only here (the paper removes Mamba-1 blocks)")
    out.update(family=family, units=kind, spec=spec, params=sum(p.numel() for p in hf.parameters()),
               build_s=time.perf_counter() - t, checkpoint=args.checkpoint)
    log(f"[{family}] {out['params'] / 1e6:.0f}M params, {spec['n_layer']} x {spec['d_model']}, {args.dtype}, units {kind}")
    calib = calibration(args, hf.config.vocab_size)
    ids_all = calib.input_ids.to("cuda")
    out.update(samples=int(ids_all.shape[0]), seqlen=int(ids_all.shape[1]), calibration=calib.source)

    # the two stacks compute the same model: logits on one reference batch
    with torch.no_grad():
        probe = ids_all[: args.ref_batch_size]
        a, b = ref(probe).logits.float(), hf(probe, use_cache=False).logits.float()
        out["logits_max_abs_diff"] = float((a - b).abs().max())
        out["logits_scale"] = float(a.abs().max())
        del a, b
    log(f"[{family}] logits max |ref - hf| = {out['logits_max_abs_diff']:.3g} (max |logit| {out['logits_scale']:.3g})")

    # ---- reference loop
    batches = list(ids_all.split(args.ref_batch_size))
    n = spec["n_layer"]
    swapper = Swapper(ref.backbone.layers, kind, SkipMambaSsmBlock, ScanFreeMamba2)
    forward = lambda ids: ref(ids).logits  # noqa: E731
    ref_out: dict[str, Any] = {"batch_size": args.ref_batch_size}
    try:
        with torch.no_grad():
            sync()
            t = time.perf_counter()
            swapper.apply([0])
            forward(batches[0])  # warm-up (Triton autotune), not timed below
            swapper.restore()
            sync()
            ref_out["warmup_s"] = time.perf_counter() - t
            per_cand_est = None
            t = time.perf_counter()
            reference_search(forward, swapper, batches[:1], 1, candidates=lambda s, p: [1], sync=sync)
            per_cand_est = (time.perf_counter() - t) * len(batches)
        full_est = per_cand_est * sum(n - s for s in range(args.steps))
        ref_out["estimated_full_s"] = full_est
        subset = args.ref_candidates
        if subset is None and full_est > args.ref_share * deadline.left():
            subset = max(2, int(n * args.ref_share * deadline.left() / max(full_est, 1e-9)))
            log(f"[{family}] reference loop estimated {full_est:.0f} s for {args.steps} steps: timing {subset} "
                f"candidates of step 1 and extrapolating")
        if subset is None:
            steps = reference_search(forward, swapper, batches, args.steps, sync=sync, log=log)
            ref_out.update(mode="full", steps=steps, plan=[s["chosen"] for s in steps],
                           wall_s=sum(s["seconds"] for s in steps),
                           layer_evals=sum(s["layer_evals"] for s in steps))
        else:
            picks = sorted({round(i * (n - 1) / max(1, subset - 1)) for i in range(subset)})
            steps = reference_search(forward, swapper, batches, 1, candidates=lambda s, p: picks, sync=sync, log=log)
            per_cand = steps[0]["seconds"] / len(picks)
            ref_out.update(mode=f"extrapolated from {len(picks)} of {n} candidates of step 1", timed_candidates=picks,
                           per_candidate_s=per_cand, wall_s=per_cand * sum(n - s for s in range(args.steps)),
                           layer_evals=len(batches) * sum(
                               (n - s) * (n - (s + 1 if kind == "block" else 0)) for s in range(args.steps)),
                           plan=None)
    except Exception as e:
        traceback.print_exc()
        out["errors"].append(f"reference loop: {e!r}")
    out["reference"] = ref_out
    log(f"[{family}] reference loop: {ref_out.get('wall_s', float('nan')):.1f} s ({ref_out.get('mode')}), "
        f"plan {ref_out.get('plan')}")
    ref = swapper = forward = None  # free the reference stack's memory before ours runs
    torch.cuda.empty_cache()

    # ---- hf_shedder: default (raced) and, optionally, exact
    runs = {"default": {}}
    if args.with_exact:
        runs["exact"] = dict(race_delta=None, early_abandon=False)
    for label, kw in runs.items():
        if deadline.left() < 10:
            out["errors"].append(f"{label}: skipped, total time guard reached")
            continue
        try:
            if args.race_delta is not None and label == "default":
                kw = dict(race_delta=args.race_delta)
            settings = SearchSettings(units=(kind,), steps=args.steps, batch_size=args.batch_size,
                                      samples=out["samples"], seqlen=out["seqlen"], calibration=calib.source, **kw)
            sync()
            t = time.perf_counter()
            res = search(hf, calib, settings, progress=False)
            sync()
            wall = time.perf_counter() - t
            statuses: dict[str, int] = {}
            for st in res.steps:
                for c in st["candidates"]:
                    statuses[c["status"]] = statuses.get(c["status"], 0) + 1
            out[label] = {"wall_s": wall, "plan": [u.layer for u in res.plan.units], "counters": res.counters,
                          "ppl": [r["ppl"] for r in res.trajectory], "statuses": statuses,
                          "batch_size": args.batch_size, "race": res.steps[0].get("race") if res.steps else None,
                          "eliminations": [len(st.get("eliminations", [])) for st in res.steps]}
            log(f"[{family}] hf_shedder {label}: {wall:.1f} s, plan {out[label]['plan']}, {res.counters}, {statuses}")
        except Exception as e:
            traceback.print_exc()
            out["errors"].append(f"{label}: {e!r}")
    r, d = out.get("reference", {}), out.get("default")
    if d and r.get("wall_s"):
        out["speedup_vs_reference"] = r["wall_s"] / d["wall_s"]
        out["layer_eval_ratio_vs_reference"] = r["layer_evals"] / d["counters"]["layer_evals"]
    if d and r.get("plan") is not None:
        out["same_plan_as_reference"] = r["plan"] == d["plan"]
    if d and out.get("exact"):
        out["same_plan_as_exact"] = out["exact"]["plan"] == d["plan"]
        out["exact_speedup_vs_reference"] = r["wall_s"] / out["exact"]["wall_s"] if r.get("wall_s") else None
    del hf
    torch.cuda.empty_cache()
    return out


def markdown(results: list[dict[str, Any]], env: dict[str, Any], cmd: str) -> str:
    lines = [f"## Reference loop (mamba-ssm) vs hf_shedder default search ({env['date']})", "",
             f"Device: {env['device']}; torch {env['torch']}, transformers {env['transformers']}, mamba-ssm "
             f"{env['mamba_ssm']}, causal-conv1d {env['causal_conv1d']}. Command: `{cmd}`", "",
             "| model | units | dtype | calib | steps | reference s (batch) | default s (batch) | speed-up | layer evals ref / default | same plan (ref / exact) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        ref, d = r.get("reference", {}), r.get("default", {})
        s = r.get("spec", {})
        same = f"{r.get('same_plan_as_reference', 'n/a')} / {r.get('same_plan_as_exact', 'n/a')}"
        lines.append(
            f"| {r['family']} {r.get('params', 0) / 1e6:.0f}M ({s.get('n_layer')} x {s.get('d_model')}) | "
            f"{r.get('units')} | {r.get('dtype')} | {r.get('samples')} x {r.get('seqlen')} ({r.get('calibration')}) | "
            f"{len(d.get('plan', []))} | {ref.get('wall_s', float('nan')):.1f} ({ref.get('batch_size')}; "
            f"{ref.get('mode')}) | {d.get('wall_s', float('nan')):.1f} ({d.get('batch_size')}) | "
            f"{r.get('speedup_vs_reference', float('nan')):.1f}x | {ref.get('layer_evals', 0):,} / "
            f"{d.get('counters', {}).get('layer_evals', 0):,} | {same} |")
    for r in results:
        if r.get("exact"):
            lines.append(f"- {r['family']} exact search: {r['exact']['wall_s']:.1f} s, plan {r['exact']['plan']}")
        if r.get("default"):
            lines.append(f"- {r['family']} default: plan {r['default']['plan']}, candidates {r['default']['statuses']}, "
                         f"race {r['default']['race']}")
        lines.append(f"- {r['family']}: logits max |mamba-ssm - Transformers| {r.get('logits_max_abs_diff', float('nan')):.3g}")
        for e in r.get("errors", []):
            lines.append(f"- {r['family']} ERROR: {e}")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--families", default="mamba2,mamba", help="random-weight models to build (ignored with --checkpoint)")
    ap.add_argument("--checkpoint", default=None, help="a trained Transformers Mamba/Mamba-2 folder instead")
    ap.add_argument("--units", default=None, help="block or ssm (default: ssm for Mamba-2, block for Mamba-1)")
    ap.add_argument("--layers", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=2560)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--calibration", choices=["random", "bundled"], default="random")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                    help="both stacks (the reference runs fp16)")
    ap.add_argument("--ref-batch-size", type=int, default=2, help="the reference's batch (2)")
    ap.add_argument("--batch-size", type=int, default=8, help="hf_shedder's batch (the largest that fits)")
    ap.add_argument("--ref-candidates", type=int, default=None,
                    help="time the reference loop on this many candidates of step 1 and extrapolate")
    ap.add_argument("--ref-share", type=float, default=0.5,
                    help="fraction of the time left the full reference loop may take before it is extrapolated")
    ap.add_argument("--race-delta", type=float, default=None, help="hf_shedder's racing delta (default: its own)")
    ap.add_argument("--with-exact", action="store_true", help="also run the exact search (no racing)")
    ap.add_argument("--time-limit", type=float, default=250.0, help="total seconds for everything")
    args = ap.parse_args(argv)
    if args.units not in (None, "block", "ssm"):
        ap.error("--units must be block or ssm")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    deadline = Deadline(args.time_limit)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    env = environment()
    log(f"[env] {env}")
    missing = missing_requirements()
    if missing:
        (out / "reference_loop.json").write_text(json.dumps({"env": env, "error": missing}, indent=2))
        log(f"cannot run: {missing}")
        return 2
    results = []
    families = ["checkpoint"] if args.checkpoint else args.families.split(",")
    for fam in families:
        if deadline.left() < 20:
            results.append({"family": fam, "errors": ["skipped: total time guard reached"]})
            continue
        try:
            results.append(run_family(fam if fam != "checkpoint" else "mamba2", args, deadline))
        except Exception as e:
            traceback.print_exc()
            results.append({"family": fam, "errors": [repr(e)]})
        (out / "reference_loop.json").write_text(json.dumps({"env": env, "args": vars(args), "results": results},
                                                            indent=2, default=str))
    md = markdown(results, env, "python benchmarks/bench_reference_loop.py " + " ".join(sys.argv[1:] if argv is None else argv))
    (out / "reference_loop.md").write_text(md)
    log(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
