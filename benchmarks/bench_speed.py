#!/usr/bin/env python
"""Pruned-model speed on a GPU: base vs pruned vs masked (issue 7, parts 2 and 3).

Shapes of mamba-2.8b (Mamba-1) and mamba2-2.7b (Mamba-2), random weights (speed does not depend
on the values), bf16, with the fast kernels (mamba-ssm + causal-conv1d; see gpu_setup.sh).
For each shape: the base model, the paper's headline plan ((a) 14 blocks removed from Mamba-1,
(b) 22 SSMs removed from Mamba-2), the same plan *masked* (search-time module swaps on the unpruned
model, ``get_adapter(model).masked(plan)``), and 25% / 50% of the blocks removed. Removed units are
evenly spaced (unit i at layer floor((i + 0.5) * L / k)); on random weights which units go does not
change the speed.

Measured with ``hf_shedder.evaluation.speed.benchmark_speed``: prefill tokens/s (one forward over
batch x length, logits of the last position only), decode tokens/s (greedy ``generate`` with the
recurrent cache, fixed length ``min_new_tokens = max_new_tokens``, (t(N) - t(1)) / (N - 1) steps)
and peak memory (weights + activation/cache peak). Ideal speed-ups:

* block removal: the layer ratio L / (L - k);
* SSM removal (and, for reference, every plan): prefill = ratio of per-token forward FLOPs of the
  decoder layers; decode = ratio of bytes moved per step (every weight read once + the recurrent
  cache read and written once per sequence). The formulas are in ``layer_flops_per_token``.

Usage (GPU, full shapes):  python benchmarks/bench_speed.py --out results/
Usage (CPU smoke test):    python benchmarks/bench_speed.py --quick --out /tmp/bench
Re-render a saved run:     python benchmarks/bench_speed.py --from-json results/speed_results.json
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

import hf_shedder
from hf_shedder import Plan, Unit, get_adapter
from hf_shedder.compat import CACHE_KWARG
from hf_shedder.evaluation.speed import benchmark_speed

# ----------------------------------------------------------------------------- shapes
PRESETS: dict[str, dict[str, Any]] = {
    # state-spaces/mamba-2.8b(-hf): 64 layers, d_model 2560, d_state 16, expand 2, dt_rank 160
    "mamba-2.8b": {
        "family": "mamba",
        "config": dict(hidden_size=2560, num_hidden_layers=64, state_size=16, expand=2, conv_kernel=4,
                       time_step_rank=160, vocab_size=50280, tie_word_embeddings=True),
        "quick": dict(hidden_size=32, num_hidden_layers=4, state_size=8, expand=2, conv_kernel=4,
                      time_step_rank=4, vocab_size=512, tie_word_embeddings=True),
    },
    # state-spaces/mamba2-2.7b: 64 layers, d_model 2560, headdim 64 (80 heads), d_state 128, ngroups 1
    "mamba2-2.7b": {
        "family": "mamba2",
        "config": dict(hidden_size=2560, num_hidden_layers=64, num_heads=80, head_dim=64, state_size=128,
                       n_groups=1, expand=2, conv_kernel=4, chunk_size=256, vocab_size=50280,
                       tie_word_embeddings=True),
        "quick": dict(hidden_size=32, num_hidden_layers=4, num_heads=4, head_dim=16, state_size=16,
                      n_groups=1, expand=2, conv_kernel=4, chunk_size=16, vocab_size=512,
                      tie_word_embeddings=True),
    },
}

# (preset, label, unit kind, units removed out of 64 layers, masked, phase). Phases run in order so
# that, if the time budget runs short, the headline numbers are the ones that exist.
VARIANTS: list[tuple[str, str, str | None, int, bool, int]] = [
    ("mamba-2.8b", "base", None, 0, False, 1),
    ("mamba-2.8b", "(a) 14 blocks removed", "block", 14, False, 1),
    ("mamba2-2.7b", "base", None, 0, False, 1),
    ("mamba2-2.7b", "(b) 22 SSMs removed", "ssm", 22, False, 1),
    ("mamba-2.8b", "(a) 14 blocks, masked", "block", 14, True, 2),
    ("mamba2-2.7b", "(b) 22 SSMs, masked", "ssm", 22, True, 2),
    ("mamba-2.8b", "25% blocks removed", "block", 16, False, 3),
    ("mamba2-2.7b", "25% blocks removed", "block", 16, False, 3),
    ("mamba-2.8b", "50% blocks removed", "block", 32, False, 3),
    ("mamba2-2.7b", "50% blocks removed", "block", 32, False, 3),
]
PROFILED = {("mamba-2.8b", "base"), ("mamba-2.8b", "(a) 14 blocks removed"),
            ("mamba2-2.7b", "base"), ("mamba2-2.7b", "(b) 22 SSMs removed")}

KERNEL_FUNCS = {
    "mamba": ["causal_conv1d_fn", "causal_conv1d_update", "mamba_selective_scan", "mamba_selective_state_update"],
    "mamba2": ["causal_conv1d_fn", "causal_conv1d_update", "mamba2_chunk_scan", "mamba2_selective_state_update"],
}


def evenly_spaced(n_layers: int, k: int) -> list[int]:
    """k distinct layers spread over 0..n_layers-1 (deterministic)."""
    return [int((i + 0.5) * n_layers / k) for i in range(k)]


def scaled_count(count64: int, n_layers: int) -> int:
    """Units removed at this depth (the counts are defined for 64 layers; --quick models are shallower)."""
    return count64 if n_layers == 64 else max(1, round(count64 * n_layers / 64))


# ----------------------------------------------------------------------------- model building
def build_model(preset: str, quick: bool, device: torch.device, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """Random-weight causal LM of the preset's shape, built directly on the device in ``dtype``."""
    from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

    spec = PRESETS[preset]
    cfg_cls, model_cls = (MambaConfig, MambaForCausalLM) if spec["family"] == "mamba" else (Mamba2Config, Mamba2ForCausalLM)
    config = cfg_cls(**spec["quick" if quick else "config"])
    torch.manual_seed(seed)
    with torch.device(device):  # HF's own init runs on the GPU: a few seconds for 2.8B parameters
        model = model_cls._from_config(config, dtype=dtype)
    return model.eval()


def make_plan(model: torch.nn.Module, kind: str, count64: int) -> Plan:
    adapter = get_adapter(model)
    n = adapter.num_layers()
    layers = evenly_spaced(n, scaled_count(count64, n))
    return Plan([Unit(kind, i) for i in layers], adapter.family, n)


# ----------------------------------------------------------------------------- ideal ratios
def layer_flops_per_token(cfg: Any, family: str, ssm_removed: bool) -> float:
    """Forward FLOPs (2 per multiply-add) of one decoder layer per token, from the config.

    Mamba-1 (d model, E = d_inner, R dt-rank, N state, K conv):
        in_proj 2*d*2E + conv 2*K*E + x_proj 2*E*(R+2N) + dt_proj 2*R*E + scan 8*E*N + out_proj 2*E*d
    Mamba-2 (H heads of P dims, G groups, N state, Q chunk, conv over E+2GN channels):
        in_proj 2*d*(2E+2GN+H) + conv 2*K*(E+2GN) + SSD [2*Q*G*N (C.B^T in a chunk)
        + 2*Q*H*P (intra-chunk output) + 4*H*P*N (chunk states + output from states)] + out_proj 2*E*d
    SSM removed (both): in_proj 2*d*2E + conv 2*K*E + out_proj 2*E*d.
    Norms, gates and the residual are elementwise and left out (< 1%).
    """
    d, K = cfg.hidden_size, cfg.conv_kernel
    E = cfg.intermediate_size if family == "mamba" else cfg.num_heads * cfg.head_dim
    if ssm_removed:
        return 2 * d * 2 * E + 2 * K * E + 2 * E * d
    if family == "mamba":
        R, N = cfg.time_step_rank, cfg.state_size
        return 2 * d * 2 * E + 2 * K * E + 2 * E * (R + 2 * N) + 2 * R * E + 8 * E * N + 2 * E * d
    H, P, G, N, Q = cfg.num_heads, cfg.head_dim, cfg.n_groups, cfg.state_size, cfg.chunk_size
    conv_dim = E + 2 * G * N
    ssd = 2 * Q * G * N + 2 * Q * H * P + 4 * H * P * N
    return 2 * d * (2 * E + 2 * G * N + H) + 2 * K * conv_dim + ssd + 2 * E * d


def plan_flops_per_token(cfg: Any, family: str, plan: Plan | None) -> float:
    n = cfg.num_hidden_layers
    blocks = plan.removed_blocks() if plan else set()
    ssms = {u.layer for u in plan.of_kind("ssm")} if plan else set()
    return sum(layer_flops_per_token(cfg, family, i in ssms) for i in range(n) if i not in blocks)


def param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights counted once


def _tensor_bytes(obj: Any, seen: set[int]) -> int:
    if isinstance(obj, torch.Tensor):
        if id(obj) in seen:
            return 0
        seen.add(id(obj))
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, torch.nn.Module):
        return sum(_tensor_bytes(v, seen) for v in vars(obj).values())
    return 0


@torch.no_grad()
def state_bytes_per_sequence(model: torch.nn.Module, device: torch.device) -> int:
    """Bytes of the recurrent cache (conv + SSM states) of one sequence, read off a real cache."""
    ids = torch.zeros(1, 4, dtype=torch.long, device=device)
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache = getattr(out, CACHE_KWARG, None) or getattr(out, "cache_params", None)  # Mamba outputs in 5.17
    return _tensor_bytes(cache, set())


# ----------------------------------------------------------------------------- kernels
def kernel_resolution() -> dict[str, str]:
    """What Transformers resolved each kernel entry point to (the fast package or its torch fallback)."""
    import transformers.models.mamba.modeling_mamba as m1
    import transformers.models.mamba2.modeling_mamba2 as m2

    out: dict[str, str] = {}
    for family, module in (("mamba", m1), ("mamba2", m2)):
        for name in KERNEL_FUNCS[family]:
            fn = getattr(module, name, None)
            impl = None
            try:
                impl = inspect.getclosurevars(fn).nonlocals.get("implementation")
            except Exception:  # a different wrapper: report what we can
                pass
            if impl is None:
                out[f"{family}.{name}"] = "unknown (wrapper not inspectable)"
            else:
                out[f"{family}.{name}"] = f"{getattr(impl, '__module__', '?')}.{getattr(impl, '__name__', '?')}"
    return out


def kernels_in_use(res: dict[str, str]) -> bool:
    return all(v.startswith(("mamba_ssm", "causal_conv1d")) for v in res.values())


def versions() -> dict[str, str]:
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "hf_shedder": hf_shedder.__version__, "cuda": str(torch.version.cuda)}
    for pkg in ("mamba_ssm", "causal_conv1d", "triton"):
        try:
            out[pkg] = __import__(pkg).__version__
        except Exception as e:  # missing or broken build
            out[pkg] = f"not importable ({type(e).__name__}: {str(e)[:80]})"
    return out


def nvidia_smi() -> str:
    try:
        return subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit", "--format=csv"],
            capture_output=True, text=True, timeout=20,
        ).stdout.strip()
    except Exception as e:
        return f"nvidia-smi unavailable: {e}"


# ----------------------------------------------------------------------------- profiling
@torch.no_grad()
def profile_model(model: torch.nn.Module, device: torch.device, batch: int, length: int, decode_tokens: int,
                  title: str) -> tuple[str, dict[str, Any]]:
    """torch.profiler tables (top kernels) of one prefill forward and one short greedy decode."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    vocab = model.get_input_embeddings().num_embeddings
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, length), generator=gen).to(device)
    prompt = torch.randint(0, vocab, (1, 16), generator=gen).to(device)
    text, summary = [], {}

    def prefill() -> None:
        model(input_ids=ids, use_cache=False, logits_to_keep=1)

    def decode() -> None:
        model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=decode_tokens,
                       min_new_tokens=decode_tokens, do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None)

    for name, fn in (("prefill", prefill), (f"decode batch 1, {decode_tokens} tokens", decode)):
        fn()  # warm (Triton autotune, allocator)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        with profile(activities=acts) as prof:
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            wall = time.perf_counter() - t0
        avgs = prof.key_averages()
        kernels = [e for e in avgs if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
        busy_us = sum(getattr(e, "self_device_time_total", 0.0) for e in kernels)
        launches = sum(e.count for e in kernels)
        summary[name] = {"wall_s": wall, "gpu_busy_s": busy_us / 1e6, "kernel_launches": launches,
                         "gpu_busy_fraction": (busy_us / 1e6) / wall if wall else None,
                         "kernel_names": sorted({e.key for e in kernels})}
        text.append(f"=== {title} :: {name} ===\nwall {wall * 1e3:.1f} ms, GPU busy {busy_us / 1e3:.1f} ms "
                    f"({100 * busy_us / 1e6 / wall:.0f}%), {launches} kernel launches\n")
        text.append(avgs.table(sort_by=sort, row_limit=22, max_name_column_width=70) + "\n")
    return "".join(text), summary


# ----------------------------------------------------------------------------- rendering
def _fmt(x: float | None, spec: str = ",.0f") -> str:
    return "—" if x is None else format(x, spec)


def render(results: dict[str, Any]) -> str:
    rows = results["rows"]
    bss = results["settings"]["decode_batch_sizes"]
    s = results["settings"]
    head = (f"prefill: batch {s['prefill_batch']} x {s['prefill_len']} tokens; decode: {s['decode_tokens']} new tokens "
            f"(fixed length), batches {', '.join(map(str, bss))}; {s['dtype']}; median of {s['repeats']} after "
            f"{s['warmup']} warm-up")
    lines = [head, "", "| model | variant | layers | params | prefill tok/s | x | "
             + " | ".join(f"decode b{b} tok/s | x" for b in bss) + " | peak mem GiB (weights) |",
             "|---|---|---:|---:|---:|---:|" + "---:|---:|" * len(bss) + "---:|"]
    base = {r["preset"]: r for r in rows if r["variant"] == "base" and "error" not in r}
    for r in rows:
        if "error" in r or "skipped" in r:
            lines.append(f"| {r['preset']} | {r['variant']} | " + (r.get("skipped") or r.get("error"))[:120] + " |")
            continue
        b = base.get(r["preset"])
        cells = [r["preset"], r["variant"], str(r["layers"]), f"{r['n_params'] / 1e9:.2f}B",
                 _fmt(r["prefill_tok_s"]), _fmt(r["prefill_tok_s"] / b["prefill_tok_s"], ".3f") if b else "—"]
        for bs in bss:
            v = r["decode_tok_s"].get(str(bs))
            bv = b["decode_tok_s"].get(str(bs)) if b else None
            cells += [_fmt(v, ",.1f"), _fmt(v / bv, ".3f") if v and bv else "—"]
        cells.append(f"{r['peak_total_bytes'] / 2**30:.2f} ({r['weight_bytes'] / 2**30:.2f})")
        lines.append("| " + " | ".join(cells) + " |")

    lines += ["", "Measured speed-up against the ideal (ideal = layer ratio for block plans; for SSM plans the "
              "prefill FLOP ratio and the decode byte ratio; masked rows are compared with the ideal of their plan):",
              "", "| model | variant | ideal prefill | measured/ideal | "
              + " | ".join(f"ideal decode b{b} | measured/ideal" for b in bss)
              + " | FLOP ratio | byte ratio b1 |",
              "|---|---|---:|---:|" + "---:|---:|" * len(bss) + "---:|---:|"]
    for r in rows:
        b = base.get(r["preset"])
        if r["variant"] == "base" or not b or "error" in r or "skipped" in r:
            continue
        ideal = r["ideal"]
        blockish = ideal["kind"] == "block"
        ip = ideal["layer_ratio"] if blockish else ideal["flop_ratio"]
        sp = r["prefill_tok_s"] / b["prefill_tok_s"]
        cells = [r["preset"], r["variant"], f"{ip:.3f}", f"{sp / ip:.1%}"]
        for bs in bss:
            idd = ideal["layer_ratio"] if blockish else ideal["byte_ratio"][str(bs)]
            v, bv = r["decode_tok_s"].get(str(bs)), b["decode_tok_s"].get(str(bs))
            cells += [f"{idd:.3f}", f"{(v / bv) / idd:.1%}" if v and bv else "—"]
        cells += [f"{ideal['flop_ratio']:.3f}", f"{ideal['byte_ratio'][str(bss[0])]:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    fits = results.get("fits")
    if fits:
        lines += ["", "Per-call time vs layer count, least squares t = a + b * layers over the block plans "
                  "(a: cost that block removal cannot remove):", ""]
        for key, f in fits.items():
            lines.append(f"- {key}: a = {f['a'] * 1e3:.3f} ms, b = {f['b'] * 1e3:.4f} ms/layer "
                         f"(a is {f['a_share']:.1%} of the base time)")
    return "\n".join(lines)


def fit_fixed_costs(results: dict[str, Any]) -> dict[str, Any]:
    """Time per call = a + b * layers, from the unmasked block plans (and the base) of each shape."""
    out: dict[str, Any] = {}
    s = results["settings"]
    for preset in PRESETS:
        rows = [r for r in results["rows"] if r["preset"] == preset and "error" not in r and "skipped" not in r
                and not r["masked"] and r["ideal"]["kind"] in ("none", "block")]
        if len(rows) < 3:
            continue
        series = {"prefill (s per forward)": [(r["layers"], s["prefill_batch"] * s["prefill_len"] / r["prefill_tok_s"])
                                              for r in rows]}
        for bs in s["decode_batch_sizes"]:
            series[f"decode b{bs} (s per step)"] = [(r["layers"], bs / r["decode_tok_s"][str(bs)]) for r in rows
                                                    if r["decode_tok_s"].get(str(bs))]
        for name, pts in series.items():
            if len(pts) < 3:
                continue
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            mx, my = statistics.fmean(xs), statistics.fmean(ys)
            b = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x in xs)
            a = my - b * mx
            base_t = max(pts)[1]
            out[f"{preset} {name}"] = {"a": a, "b": b, "a_share": a / base_t, "points": pts}
    return out


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes and workloads (CPU smoke test)")
    p.add_argument("--device", default=None, help="default: cuda if available")
    p.add_argument("--out", default="bench_out", help="folder for speed_results.json, table.md, profiles.txt")
    p.add_argument("--presets", default=",".join(PRESETS), help="comma list of " + ", ".join(PRESETS))
    p.add_argument("--phases", default="1,2,3",
                   help="1: headline plans, 2: masked, 3: 25%%/50%% blocks (each shape's base always runs)")
    p.add_argument("--prefill-batch", type=int, default=None)
    p.add_argument("--prefill-len", type=int, default=None)
    p.add_argument("--decode-tokens", type=int, default=None)
    p.add_argument("--decode-batch-sizes", default=None)
    p.add_argument("--warmup", type=int, default=None, help="discarded runs per measurement (default 1; --quick 0)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs, median reported (default 3; --quick 1)")
    p.add_argument("--budget-s", type=float, default=None, help="skip variants that would end past this many seconds")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--allow-slow", action="store_true", help="run on CUDA even if the fast kernels are missing")
    p.add_argument("--from-json", default=None, help="only print the table of a saved speed_results.json")
    p.add_argument("--stacks", action="store_true",
                   help="Transformers eager vs hf_shedder fast path vs mamba-ssm on the full shapes (bench_stacks.py)")
    p.add_argument("--sections", default="correctness,stacks,pruned",
                   help="--stacks: which parts, in order: fast (hf_shedder + mamba-ssm), correctness, stacks (all three), pruned")
    p.add_argument("--runs", type=int, default=5, help="--stacks: base/pruned pairs per speed-up point")
    p.add_argument("--eager-decode-tokens", type=int, default=32,
                   help="--stacks: new tokens for Transformers' eager decode (about 17 tok/s at batch 1)")
    args = p.parse_args(argv)

    if args.stacks:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import bench_stacks

        args.decode_tokens = args.decode_tokens or 256
        args.repeats = args.repeats or 3
        presets = {name: PRESETS[name] for name in args.presets.split(",")}
        meta = {"versions": versions(), "nvidia_smi": nvidia_smi(), "kernel_resolution": kernel_resolution(),
                "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
                "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        print(json.dumps(meta, indent=1), flush=True)
        return bench_stacks.run(presets, make_plan, args, meta)

    if args.from_json:
        with open(args.from_json) as f:
            print(render(json.load(f)))
        return 0

    t_start = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q = args.quick
    settings = {
        "prefill_batch": args.prefill_batch or (2 if q else 8),
        "prefill_len": args.prefill_len or (32 if q else 2048),
        "decode_tokens": args.decode_tokens or (4 if q else 256),
        "decode_batch_sizes": [int(x) for x in (args.decode_batch_sizes or ("1,2" if q else "1,16")).split(",")],
        "warmup": args.warmup if args.warmup is not None else (0 if q else 1),
        "repeats": args.repeats if args.repeats is not None else (1 if q else 3), "dtype": str(dtype).replace("torch.", ""),
        "device": str(device), "quick": q,
    }
    os.makedirs(args.out, exist_ok=True)
    res_kernels = kernel_resolution()
    env = {"versions": versions(), "nvidia_smi": nvidia_smi() if device.type == "cuda" else None,
           "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "kernel_resolution": res_kernels, "kernels_in_use": kernels_in_use(res_kernels),
           "command": " ".join([os.path.basename(sys.executable), *sys.argv])}
    print(json.dumps(env, indent=2), flush=True)
    if device.type == "cuda" and not env["kernels_in_use"] and not args.allow_slow:
        print("ERROR: mamba-ssm / causal-conv1d are not in use (see kernel_resolution); run gpu_setup.sh first "
              "or pass --allow-slow", file=sys.stderr)
        return 2

    results: dict[str, Any] = {"settings": settings, "env": env, "rows": [], "profiles": {}}
    out_json = os.path.join(args.out, "speed_results.json")

    def save() -> None:
        results["elapsed_s"] = time.perf_counter() - t_start
        tmp = out_json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1)
        os.replace(tmp, out_json)

    presets = [x for x in args.presets.split(",") if x]
    phases = {int(x) for x in args.phases.split(",")}
    bases: dict[str, torch.nn.Module] = {}
    base_cost: dict[str, float] = {}
    prof_text: list[str] = []
    bench_kw = dict(batch_size=settings["prefill_batch"], prefill_len=settings["prefill_len"],
                    decode_tokens=settings["decode_tokens"], decode_batch_sizes=tuple(settings["decode_batch_sizes"]),
                    warmup=settings["warmup"], repeats=settings["repeats"], device=device)

    for preset, label, kind, count64, masked, phase in VARIANTS:
        # the base of a shape is measured whenever any of its variants is, so every call has its own baseline
        if preset not in presets or (phase not in phases and kind is not None):
            continue
        row: dict[str, Any] = {"preset": preset, "variant": label, "masked": masked, "phase": phase}
        elapsed = time.perf_counter() - t_start
        est = base_cost.get(preset, 0.0) * 1.1
        if args.budget_s is not None and elapsed + est > args.budget_s:
            row["skipped"] = f"skipped: time budget ({elapsed:.0f}s used, ~{est:.0f}s needed, budget {args.budget_s:.0f}s)"
            results["rows"].append(row)
            print(row["skipped"], flush=True)
            save()
            continue
        t0 = time.perf_counter()
        try:
            if preset not in bases:
                tb = time.perf_counter()
                bases[preset] = build_model(preset, q, device, dtype, seed=0)
                print(f"[{preset}] built in {time.perf_counter() - tb:.1f}s", flush=True)
            base = bases[preset]
            family = PRESETS[preset]["family"]
            cfg = base.config
            n_layers = cfg.num_hidden_layers
            plan = make_plan(base, kind, count64) if kind else None
            pruned_wrapper = None
            if kind is None or masked:
                model = base
            else:
                # hf_shedder.prune -> PrunedMambaForCausalLM. Its .model is the pruned base-architecture LM that the
                # wrapper's forward/generate delegate to; we time that one so the prefill gets logits_to_keep=1 like
                # the base (benchmark_speed only passes it when forward's signature names it; the wrapper's does not).
                pruned_wrapper = hf_shedder.prune(base, plan)
                model = pruned_wrapper.model
            row.update(plan=[str(u) for u in plan] if plan else [], layers=n_layers - (len(plan.removed_blocks()) if plan else 0))

            def measure(m: torch.nn.Module) -> dict[str, Any]:
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                r = benchmark_speed(m, **bench_kw)
                return {"n_params": r.n_params, "prefill_tok_s": r.prefill_tokens_per_s, "prefill_s": r.prefill_seconds,
                        "decode_tok_s": {str(k): v for k, v in r.decode_tokens_per_s.items()},
                        "act_peak_bytes": r.peak_memory_bytes, "memory_kind": r.memory_kind}

            if masked:
                with get_adapter(base).masked(plan):
                    row.update(measure(model))
                    row["state_bytes_per_seq"] = state_bytes_per_sequence(model, device)
            else:
                row.update(measure(model))
                row["state_bytes_per_seq"] = state_bytes_per_sequence(model, device)
            # masked: all weights stay resident (module swaps only), so memory = full weights
            row["weight_bytes"] = param_bytes(model)
            row["peak_total_bytes"] = row["weight_bytes"] + (row["act_peak_bytes"] or 0)
            # ideal ratios against the base (of this plan, masked or not)
            base_flops = plan_flops_per_token(cfg, family, None)
            base_row = next((r for r in results["rows"] if r["preset"] == preset and r["variant"] == "base"), None)
            ideal: dict[str, Any] = {"kind": kind or "none", "layer_ratio": n_layers / row["layers"],
                                     "flops_per_token": plan_flops_per_token(cfg, family, plan),
                                     "base_flops_per_token": base_flops}
            ideal["flop_ratio"] = base_flops / ideal["flops_per_token"]
            if masked:  # bytes of the physically pruned equivalent (the plan's ideal), not of the masked model
                ideal_model = hf_shedder.prune(base, plan).model
                pb, sb = param_bytes(ideal_model), state_bytes_per_sequence(ideal_model, device)
                del ideal_model
            else:
                pb, sb = row["weight_bytes"], row["state_bytes_per_seq"]
            if base_row:
                ideal["byte_ratio"] = {str(bs): (base_row["weight_bytes"] + 2 * bs * base_row["state_bytes_per_seq"])
                                       / (pb + 2 * bs * sb) for bs in settings["decode_batch_sizes"]}
            row["ideal"] = ideal
            if not args.no_profile and (preset, label) in PROFILED:
                try:  # a profiler problem must not cost the measured row
                    text, summ = profile_model(model, device, settings["prefill_batch"], settings["prefill_len"],
                                               min(32, settings["decode_tokens"]), f"{preset} / {label}")
                    prof_text.append(text)
                    results["profiles"][f"{preset} / {label}"] = summ
                    with open(os.path.join(args.out, "profiles.txt"), "w") as f:
                        f.write("\n".join(prof_text))
                except Exception as e:
                    print(f"profiling {preset} / {label} failed: {type(e).__name__}: {e}", flush=True)
            del model, pruned_wrapper
        except Exception as e:  # keep going: one failed variant must not lose the others
            import traceback

            traceback.print_exc()
            row["error"] = f"error: {type(e).__name__}: {e}"
        row["wall_s"] = time.perf_counter() - t0
        if label == "base":
            base_cost[preset] = row["wall_s"]
        results["rows"].append(row)
        print(f"[{preset}] {label}: {json.dumps({k: row.get(k) for k in ('prefill_tok_s', 'decode_tok_s', 'peak_total_bytes', 'wall_s', 'error')})}",
              flush=True)
        save()

    results["fits"] = fit_fixed_costs(results)
    save()
    table = render(results)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    print("\nkernel resolution: " + ("fast kernels in use" if env["kernels_in_use"] else "TORCH FALLBACK (slow path)"))
    for name, summ in results["profiles"].items():
        for part, s in summ.items():
            scan = [k for k in s["kernel_names"] if any(t in k.lower() for t in ("scan", "conv1d", "state_update", "chunk"))]
            print(f"profile {name} {part}: GPU busy {s['gpu_busy_fraction'] or 0:.0%} of wall, "
                  f"{s['kernel_launches']} launches; SSM/conv kernels seen: {', '.join(k[:40] for k in scan[:6]) or 'none'}")
    print(f"\ntotal {time.perf_counter() - t_start:.0f}s\n")
    print(table)
    return 0 if not any("error" in r for r in results["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
