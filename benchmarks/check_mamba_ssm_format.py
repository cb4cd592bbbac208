#!/usr/bin/env python
"""mamba-ssm format in and out, checked against mamba-ssm itself on a GPU (issue 13).

Needs a CUDA GPU with mamba-ssm (2.3.x) and causal-conv1d installed (see gpu_setup.sh). For a small
random Mamba-1 and Mamba-2 (default 8 layers x 768, vocabulary 50277 padded as mamba-ssm pads it, fp32):

1. **in**: build mamba-ssm's ``MambaLMHeadModel``, ``save_pretrained`` it, load the folder with
   ``hf_shedder.loading.load_model`` (converted to ``MambaForCausalLM`` / ``Mamba2ForCausalLM``) and report
   max |delta logit| against mamba-ssm's own forward, fp32, on the same random token ids;
2. **out**: remove 2 blocks with ``hf_shedder.prune``, ``save_pretrained(export="mamba_ssm")``, load it with
   stock ``MambaLMHeadModel.from_pretrained(dir, device=..., dtype=...)``, report max |delta logit| against
   hf_shedder's pruned model, and compare greedy tokens from mamba-ssm's ``generate(..., cg=True)``
   against hf_shedder's ``generate`` (greedy, fp32). Where tokens differ, the logit margin between the
   two best tokens at the first difference says whether it is a near-tie;
3. **speed**: mamba-ssm decode tokens/s of the export and of its unpruned source (batch 1, 256 new tokens,
   ``cg=True``, median of timed runs after a warm-up that captures the CUDA graph), fp32 and fp16.

The embedding (tied to the output head) is scaled up after mamba-ssm's init so that greedy choices are
not near-ties between equal-ish logits; the scale is recorded. Each check runs in its own try/except;
failures are reported, not raised. Writes ``<out>.json`` and ``<out>.md`` (``--out`` a file stem or a
path ending in .json) and prints the markdown.

Usage (GPU):   python benchmarks/check_mamba_ssm_format.py --out benchmarks/results/mamba_ssm_format
Without mamba-ssm or a GPU it writes the reason into the result files and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="result path stem (writes STEM.json and STEM.md)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--vocab", type=int, default=50277, help="unpadded vocabulary (GPT-NeoX-20B: 50277)")
    p.add_argument("--remove", default="2,5", help="block indices to remove (default 2,5)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence for the logit checks")
    p.add_argument("--compare-tokens", type=int, default=128, help="greedy tokens compared per model")
    p.add_argument("--decode-tokens", type=int, default=256, help="new tokens per timed decode")
    p.add_argument("--repeats", type=int, default=3, help="timed decode runs (median reported)")
    p.add_argument("--embedding-scale", type=float, default=20.0,
                   help="multiply mamba-ssm's initial embedding (std 0.02) by this (default 20)")
    p.add_argument("--families", default="mamba1,mamba2")
    p.add_argument("--speed-dtypes", default="float32", help="dtypes of the decode timing, e.g. float32,float16")
    p.add_argument("--budget-s", type=float, default=85.0,
                   help="skip the checks not started after this many seconds (reported as skipped)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda", help="cuda (default); anything else is only a dry run of the script")
    return p.parse_args(argv)


def out_paths(out: str) -> tuple[Path, Path]:
    stem = Path(out[:-5] if out.endswith(".json") else out)
    return stem.with_suffix(".json"), stem.with_suffix(".md")


def versions() -> dict[str, Any]:
    from importlib import metadata

    out: dict[str, Any] = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "mamba-ssm", "causal-conv1d", "triton"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    try:
        import torch

        out["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001
        out["gpu"] = None
    return out


def mamba_ssm_config(family: str, args: argparse.Namespace) -> dict[str, Any]:
    ssm = {} if family == "mamba1" else {"layer": "Mamba2"}
    return {"d_model": args.d_model, "d_intermediate": 0, "n_layer": args.layers, "vocab_size": args.vocab,
            "ssm_cfg": ssm, "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True,
            "fused_add_norm": True, "pad_vocab_size_multiple": 8 if family == "mamba1" else 16,
            "tie_embeddings": True}


START = time.perf_counter()
BUDGET_S = [float("inf")]


def _run(results: dict[str, Any], name: str, fn: Any) -> Any:
    """Run one check; record its value or its error, never raise; skip it once the time budget is spent."""
    t0 = time.perf_counter()
    if t0 - START > BUDGET_S[0]:
        results[name] = {"ok": False, "error": f"skipped: the {BUDGET_S[0]:.0f} s budget was spent", "seconds": 0}
        return None
    try:
        value = fn()
        results[name] = {"ok": True, **(value if isinstance(value, dict) else {"value": value})}
        return value
    except Exception as e:  # noqa: BLE001  (every check is reported, the next one still runs)
        results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}",
                         "traceback": traceback.format_exc(limit=6)}
        return None
    finally:
        results[name]["seconds"] = round(time.perf_counter() - t0, 2)


def _max_delta(a: Any, b: Any) -> dict[str, float]:
    a, b = a.float(), b.float()
    return {"max_abs_delta_logit": float((a - b).abs().max()), "logit_std": float(b.std()),
            "argmax_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean())}


def _decode_tps(model: Any, prompt: Any, new_tokens: int, repeats: int) -> dict[str, Any]:
    import torch

    def sync() -> None:
        if prompt.is_cuda:
            torch.cuda.synchronize()

    max_length = prompt.shape[1] + new_tokens
    model.generate(prompt, max_length=max_length, cg=True, top_k=1)  # warm-up: captures the CUDA graph
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        out = model.generate(prompt, max_length=max_length, cg=True, top_k=1)
        sync()
        times.append(time.perf_counter() - t0)
    assert out.shape[1] == max_length, out.shape
    return {"tokens_per_s": new_tokens / statistics.median(times), "times_s": [round(t, 4) for t in times],
            "new_tokens": new_tokens, "batch": int(prompt.shape[0])}


def check_family(family: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    import hf_shedder
    from hf_shedder.loading import load_model
    from hf_shedder.units import Plan, Unit

    res: dict[str, Any] = {}
    dev = args.device
    cfg = mamba_ssm_config(family, args)
    res["config"] = cfg
    torch.manual_seed(args.seed)
    src, exp_dir = work / f"{family}_source", work / f"{family}_export"
    source = MambaLMHeadModel(MambaConfig(**cfg), device=dev, dtype=torch.float32)
    with torch.no_grad():
        source.backbone.embedding.weight.mul_(args.embedding_scale)  # tied: the head follows
    source.eval()
    source.save_pretrained(str(src))
    g = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    ids = torch.randint(0, args.vocab, (2, args.seq_len), generator=g).to(dev)
    prompt = torch.randint(0, args.vocab, (1, 16), generator=g).to(dev)
    state: dict[str, Any] = {}

    def load_in() -> dict[str, Any]:
        model = load_model(str(src), dtype=torch.float32, device=dev)
        state["ours"] = model
        with torch.no_grad():
            return {"class": type(model).__name__, **_max_delta(model(ids).logits, source(ids).logits)}

    _run(res, "in_logits_fp32", load_in)

    def export() -> dict[str, Any]:
        removed = [int(x) for x in args.remove.split(",")]
        pruned = hf_shedder.prune(state["ours"], Plan([Unit("block", i) for i in removed]))
        pruned.save_pretrained(exp_dir, export="mamba_ssm")
        state["pruned"] = pruned
        return {"removed_blocks": removed, "files": sorted(os.listdir(exp_dir)),
                "n_layer": json.loads((exp_dir / "config.json").read_text())["n_layer"]}

    _run(res, "export", export)

    def load_out() -> dict[str, Any]:
        stock = MambaLMHeadModel.from_pretrained(str(exp_dir), device=dev, dtype=torch.float32).eval()
        state["stock"] = stock
        with torch.no_grad():
            return _max_delta(stock(ids).logits, state["pruned"](ids).logits)

    _run(res, "out_logits_fp32", load_out)

    def greedy() -> dict[str, Any]:
        n = args.compare_tokens
        theirs = state["stock"].generate(prompt, max_length=prompt.shape[1] + n, cg=True, top_k=1)
        ours_model = state["pruned"]
        ours_model.model.generation_config.eos_token_id = None  # mamba-ssm's generate has no eos stop here
        ours = ours_model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                   do_sample=False, pad_token_id=0)
        a, b = theirs[0, prompt.shape[1]:].tolist(), ours[0, prompt.shape[1]:].tolist()
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        out: dict[str, Any] = {"compared": min(len(a), len(b)), "lengths": [len(a), len(b)], "equal": a == b,
                               "first_difference": first,
                               "mamba_ssm_head": a[:12], "hf_shedder_head": b[:12]}
        if first is not None:  # how close was the choice where they part?
            with torch.no_grad():
                logits = ours_model(theirs[:, : prompt.shape[1] + first]).logits[0, -1].float()
            top = logits.topk(2).values
            out["margin_top2_at_difference"] = float(top[0] - top[1])
        return out

    _run(res, "greedy_tokens_fp32", greedy)

    for dtype_name in [d.strip() for d in args.speed_dtypes.split(",") if d.strip()]:
        def speed(dtype_name: str = dtype_name) -> dict[str, Any]:
            dtype = getattr(torch, dtype_name)
            out = {}
            for label, path in (("export", exp_dir), ("source", src)):
                model = MambaLMHeadModel.from_pretrained(str(path), device=dev, dtype=dtype).eval()
                out[label] = _decode_tps(model, prompt, args.decode_tokens, args.repeats)
                del model
                torch.cuda.empty_cache()
            out["speedup"] = out["export"]["tokens_per_s"] / out["source"]["tokens_per_s"]
            out["layer_ratio"] = args.layers / (args.layers - len(args.remove.split(",")))
            return out

        _run(res, f"decode_cg_{dtype_name}", speed)
    return res


def to_markdown(report: dict[str, Any]) -> str:
    v = report.get("versions", {})
    lines = [f"# mamba-ssm format check ({report.get('status')})", "",
             f"{v.get('gpu')}; torch {v.get('torch')}, transformers {v.get('transformers')}, mamba-ssm "
             f"{v.get('mamba-ssm')}, causal-conv1d {v.get('causal-conv1d')}; {report.get('seconds')} s", ""]
    if report.get("error"):
        return "\n".join([*lines, f"**Not run**: {report['error']}", ""])
    a = report.get("args", {})
    lines += [f"Random {a.get('layers')} layers x {a.get('d_model')}, vocabulary {a.get('vocab')} (padded), "
              f"embedding scaled x{a.get('embedding_scale')}, blocks {a.get('remove')} removed.", "",
              "| check | " + " | ".join(report.get("families", {})) + " |",
              "|---|" + "---:|" * len(report.get("families", {}))]

    def cell(fam: dict[str, Any], key: str, fmt: Any) -> str:
        r = fam.get(key) or {}
        if not r:
            return "-"
        if not r.get("ok"):
            err = r.get("error", "")
            return err if err.startswith("skipped") else f"FAILED: {err[:80]}"
        try:
            return fmt(r)
        except Exception as e:  # noqa: BLE001
            return f"? ({e})"

    fams = list(report.get("families", {}).values())
    rows = [
        ("in: max abs delta logit vs MambaLMHeadModel (fp32)", "in_logits_fp32",
         lambda r: f"{r['max_abs_delta_logit']:.3g} (logit std {r['logit_std']:.3g}, argmax agree "
                   f"{100 * r['argmax_agreement']:.2f}%)"),
        ("out: stock from_pretrained max abs delta logit vs hf_shedder (fp32)", "out_logits_fp32",
         lambda r: f"{r['max_abs_delta_logit']:.3g} (argmax agree {100 * r['argmax_agreement']:.2f}%)"),
        ("greedy tokens, generate(cg=True) vs hf_shedder (fp32)", "greedy_tokens_fp32",
         lambda r: (f"{r['compared']}/{r['compared']} equal" if r["equal"] else
                    f"differ from token {r['first_difference']} (top-2 margin there "
                    f"{r.get('margin_top2_at_difference', float('nan')):.3g})")),
    ]
    for dt in [d.strip() for d in str(a.get("speed_dtypes", "float32")).split(",") if d.strip()]:
        rows.append((f"mamba-ssm decode tok/s b1, {a.get('decode_tokens')} new tokens, cg=True, {dt}: export / source",
                     f"decode_cg_{dt}",
                     lambda r: f"{r['export']['tokens_per_s']:.0f} / {r['source']['tokens_per_s']:.0f} "
                               f"({r['speedup']:.2f}x; layer ratio {r['layer_ratio']:.2f})"))
    for label, key, fmt in rows:
        lines.append(f"| {label} | " + " | ".join(cell(f, key, fmt) for f in fams) + " |")
    return "\n".join(lines) + "\n"


def write(report: dict[str, Any], out: str) -> str:
    jpath, mpath = out_paths(out)
    jpath.parent.mkdir(parents=True, exist_ok=True)
    jpath.write_text(json.dumps(report, indent=2, default=str))
    md = to_markdown(report)
    mpath.write_text(md)
    print(md)
    print(f"wrote {jpath} and {mpath}")
    return md


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    BUDGET_S[0] = args.budget_s
    t0 = time.perf_counter()
    report: dict[str, Any] = {"args": vars(args), "versions": versions(), "families": {}}
    try:
        import torch

        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError("no CUDA GPU: mamba-ssm's kernels and CUDA-graph decode need one")
        import mamba_ssm  # noqa: F401
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel  # noqa: F401
    except Exception as e:  # noqa: BLE001  (ImportError, or a broken kernel build)
        report.update(status="not run", error=f"{type(e).__name__}: {e}. Install mamba-ssm and causal-conv1d on a "
                                              "GPU machine (benchmarks/gpu_setup.sh)", seconds=0)
        write(report, args.out)
        return 2
    with tempfile.TemporaryDirectory(prefix="mamba_ssm_check_") as work:
        for family in [f.strip() for f in args.families.split(",") if f.strip()]:
            fam: dict[str, Any] = {}
            report["families"][family] = fam
            _run(fam, "setup", lambda family=family, fam=fam: fam.update(check_family(family, args, Path(work)))
                 or {"ok": True})
            if fam.get("setup", {}).get("ok"):
                fam.pop("setup")
    checks = [r for fam in report["families"].values() for r in fam.values() if isinstance(r, dict) and "ok" in r]
    report["status"] = "all checks ran" if checks and all(r["ok"] for r in checks) else "some checks failed"
    report["seconds"] = round(time.perf_counter() - t0, 1)
    write(report, args.out)
    return 0 if report["status"] == "all checks ran" else 1


if __name__ == "__main__":
    sys.exit(main())
