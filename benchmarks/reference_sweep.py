"""Search vs random vs a cheap criterion on the bundled reference models (issue 9), plus LoRA recovery.

``sweep``: for each reference model and unit kind, the validation perplexity after removing 1..K units
chosen by

* the greedy Mamba-Shedder search (``hf_shedder.search.search`` on the bundled calibration text),
* random draws (each seed: units drawn one at a time, uniformly among the still-removable ones),
* a cheap one-shot criterion, the *local output change* of a unit: on the unpruned model's hidden states
  entering each layer (one calibration forward), ``1 - cos(layer output, layer output with the unit
  masked)`` averaged over tokens (summed over the layers a shared unit feeds). For ``block`` this is
  exactly block influence (1 - cos(h_in, h_out), ShortGPT); for ``ssm``, ``hybrid``, heads and channels
  it is the same question asked of the smaller unit. Units are removed lowest score first, ranked once.

``recovery``: greedy plans at a few pruning levels are removed physically and tuned with
``hf_shedder.recovery.recover`` (LoRA, merged) on the bundled calibration text as plain text rows; the
validation perplexity before and after is recorded. An unpruned control gets the same tuning.

Calibration and validation never overlap: calibration windows come from the bundled tinyshakespeare
slice (lines 1-5769), validation windows from ``assets/reference/validation.txt`` (held-out Bible,
Shakespeare lines 34176-40000 and Python docs), evenly spaced over the whole file.

Runs on CPU with the pure-PyTorch paths (Mamba-2 SSD loaded with ``chunk_size=16``, which is the
same computation as 128, only cheaper in the fallback). Results: ``benchmarks/results/*.json``;
plots: ``docs/reference_sweep_<model>_<kind>.png``.

    python benchmarks/reference_sweep.py sweep --models mamba2 --kinds block ssm --steps 6 --seeds 5
    python benchmarks/reference_sweep.py recovery --model mamba2 --kind block --levels 0 2 4 6
    python benchmarks/reference_sweep.py report --replot   # markdown tables; redraw the PNGs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from datetime import date
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import hf_shedder  # noqa: E402
from hf_shedder.arch import get_adapter  # noqa: E402
from hf_shedder.data import CalibrationSet, load_calibration, load_eval_text, load_tokenizer  # noqa: E402
from hf_shedder.evaluation.perplexity import evaluate_perplexity  # noqa: E402
from hf_shedder.loading import skeleton_parameters  # noqa: E402
from hf_shedder.search import SearchSettings, search, unit_key  # noqa: E402
from hf_shedder.units import Plan, Unit  # noqa: E402

REFERENCE = os.path.join(os.path.dirname(hf_shedder.__file__), "assets", "reference")
VALIDATION = os.path.join(REFERENCE, "validation.txt")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_KINDS = {"mamba2": ["block", "ssm"], "mamba": ["block", "ssm"],
                 "hybrid": ["block", "ssm", "hybrid", "attn_heads", "mlp_channels"]}


# ----------------------------------------------------------------------------- data and models


def load_reference(name: str, chunk_size: int = 16) -> torch.nn.Module:
    """A bundled reference model in fp32; Mamba-2 SSD chunk size lowered (exact, cheaper on CPU)."""
    path = os.path.join(REFERENCE, name)
    config_kw = {} if name == "mamba" else {"chunk_size": chunk_size}
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **config_kw).eval()


def validation_windows(tokenizer: Any, windows: int, seqlen: int) -> tuple[CalibrationSet, list[int]]:
    """``windows`` windows of ``seqlen`` tokens evenly spaced over the whole validation file (all three
    of its texts), not just its start."""
    full = load_eval_text(VALIDATION, tokenizer, seqlen=seqlen)
    n = len(full)
    idx = sorted({round(i * (n - 1) / max(windows - 1, 1)) for i in range(windows)})
    ids = full.input_ids[idx].contiguous()
    return CalibrationSet(ids, torch.ones_like(ids), source="reference/validation.txt"), idx


def shakespeare_windows(tokenizer: Any, windows: int, seqlen: int) -> tuple[CalibrationSet, list[int]]:
    """Validation windows inside the held-out Shakespeare part only (the recovery text's domain): from the
    first speaker heading to the first reST directive of the Python-docs part."""
    with open(VALIDATION, encoding="utf-8") as f:
        text = f.read()
    lines = text.split("\n")
    first = next(i for i, ln in enumerate(lines) if ln.endswith(":") and ln[:-1].isupper() and ln.strip())
    last = next(i for i, ln in enumerate(lines) if ln.startswith(".. "))
    start_tok = len(tokenizer("\n".join(lines[:first]))["input_ids"])
    end_tok = len(tokenizer("\n".join(lines[:last]))["input_ids"])
    full = load_eval_text(VALIDATION, tokenizer, seqlen=seqlen)
    lo, hi = -(-start_tok // seqlen), end_tok // seqlen - 1
    idx = sorted({lo + round(i * (hi - lo) / max(windows - 1, 1)) for i in range(windows)})
    ids = full.input_ids[idx].contiguous()
    return CalibrationSet(ids, torch.ones_like(ids), source="reference/validation.txt (Shakespeare part)"), idx


def calibration_set(tokenizer: Any, samples: int, seqlen: int, seed: int) -> CalibrationSet:
    return load_calibration("bundled", tokenizer, n_samples=samples, seqlen=seqlen, seed=seed)


class PlanEvaluator:
    """Validation perplexity of masked plans, cached by the set of removed units."""

    def __init__(self, model: torch.nn.Module, val: CalibrationSet, batch_size: int = 8) -> None:
        self.model, self.val, self.batch_size = model, val, batch_size
        self.adapter = get_adapter(model)
        self._cache: dict[tuple[str, ...], float] = {}
        self.evaluations = 0

    def ppl(self, plan: Plan) -> float:
        key = tuple(sorted(unit_key(u) for u in plan))
        if key not in self._cache:
            with self.adapter.masked(plan):
                self._cache[key] = evaluate_perplexity(self.model, self.val, self.batch_size, progress=False).ppl
            self.evaluations += 1
        return self._cache[key]


# ----------------------------------------------------------------------------- orders of removal


def greedy_order(model: torch.nn.Module, cal: CalibrationSet, kind: str, steps: int, seed: int) -> dict[str, Any]:
    settings = SearchSettings(units=(kind,), steps=steps, calibration="bundled", samples=cal.n_samples,
                              seqlen=cal.seqlen, seed=seed, batch_size=8)
    t0 = time.perf_counter()
    result = search(model, cal, settings, out_dir=None, progress=True)
    return {"units": list(result.plan), "calibration_ppl": [r["ppl"] for r in result.trajectory],
            "seconds": time.perf_counter() - t0}


def max_removable(adapter: Any, kind: str) -> int:
    """How many units of ``kind`` can go in turn (width kinds never empty a layer)."""
    plan = adapter.empty_plan()
    while cands := adapter.candidates(plan, [kind]):
        plan = plan.extended(cands[0])
    return len(plan)


def random_order(adapter: Any, kind: str, steps: int, seed: int) -> list[Unit]:
    rng = random.Random(seed)
    plan = adapter.empty_plan()
    for _ in range(steps):
        plan = plan.extended(rng.choice(adapter.candidates(plan, [kind])))
    return list(plan)


@torch.no_grad()
def local_change_scores(model: torch.nn.Module, cal: CalibrationSet, kind: str) -> dict[str, float]:
    """Cheap criterion: per unit, 1 - cos(layer output, layer output with the unit masked), token mean,
    on the unpruned model's cached layer inputs (summed over layers for units of a shared module)."""
    adapter = get_adapter(model)
    empty = adapter.empty_plan()
    n = adapter.num_layers()
    inputs: list[list[torch.Tensor]] = [[] for _ in range(n)]
    outputs: list[list[torch.Tensor]] = [[] for _ in range(n)]
    ctxs = []
    for batch in cal.batches(8):
        h, ctx = adapter.embed(batch["input_ids"], batch["attention_mask"])
        ctxs.append(ctx)
        for i in range(n):
            inputs[i].append(h)
            h = adapter.run_layer(i, h, ctx)
            outputs[i].append(h)
    scores = {}
    for unit in adapter.all_units([kind]):
        layers = range(n) if kind in adapter.shared_kinds else [unit.layer]
        total = 0.0
        with adapter.masked(empty.extended(unit)):
            for i in layers:
                change = []
                for b, ctx in enumerate(ctxs):
                    out = adapter.run_layer(i, inputs[i][b], ctx)
                    cos = torch.nn.functional.cosine_similarity(out.float(), outputs[i][b].float(), dim=-1)
                    change.append((1 - cos).flatten())
                total += float(torch.cat(change).mean())
        scores[unit_key(unit)] = total
    return scores


def cheap_order(adapter: Any, scores: dict[str, float], kind: str, steps: int) -> list[Unit]:
    ranked = sorted(adapter.all_units([kind]), key=lambda u: scores[unit_key(u)])
    plan = adapter.empty_plan()
    for unit in ranked:
        if len(plan) == steps:
            break
        if unit in adapter.candidates(plan, [kind]):  # width units: never empty a layer
            plan = plan.extended(unit)
    return list(plan)


# ----------------------------------------------------------------------------- the sweep


def environment(threads: int) -> dict[str, Any]:
    import transformers

    return {"device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                      f"torch threads {threads}, pure-PyTorch Mamba paths)",
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "date": date.today().isoformat(),
            "command": " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])}


def sweep_one(name: str, kind: str, args: argparse.Namespace, tok: Any) -> dict[str, Any]:
    t_start = time.perf_counter()
    model = load_reference(name, args.chunk_size)
    adapter = get_adapter(model)
    cal = calibration_set(tok, args.cal_samples, args.cal_seqlen, args.seed)
    val, val_idx = validation_windows(tok, args.val_windows, args.val_seqlen)
    n_units = len(adapter.all_units([kind]))
    steps = min(args.steps, max_removable(adapter, kind) - (1 if kind == "block" else 0))
    ev = PlanEvaluator(model, val)
    empty = adapter.empty_plan()
    base_ppl = ev.ppl(empty)
    base_params = skeleton_parameters(model.config)

    def curve(units: list[Unit]) -> list[float]:
        return [base_ppl] + [ev.ppl(empty.extended(*units[:k])) for k in range(1, len(units) + 1)]

    print(f"[{name}/{kind}] {n_units} units, {steps} steps; base validation ppl {base_ppl:.2f}", flush=True)
    g = greedy_order(model, cal, kind, steps, args.seed)
    greedy = curve(g["units"])
    print(f"[{name}/{kind}] greedy {[unit_key(u) for u in g['units']]} -> {[round(p, 1) for p in greedy]} "
          f"(search {g['seconds']:.0f} s)", flush=True)
    t0 = time.perf_counter()
    scores = local_change_scores(model, cal, kind)
    cheap_seconds = time.perf_counter() - t0
    c_units = cheap_order(adapter, scores, kind, steps)
    cheap = curve(c_units)
    print(f"[{name}/{kind}] cheap {[unit_key(u) for u in c_units]} -> {[round(p, 1) for p in cheap]}", flush=True)
    rand = []
    for s in range(args.seeds):
        r_units = random_order(adapter, kind, steps, s)
        rand.append({"seed": s, "units": [unit_key(u) for u in r_units], "ppl": curve(r_units)})
        print(f"[{name}/{kind}] random seed {s} -> {[round(p, 1) for p in rand[-1]['ppl']]}", flush=True)
    by_level = list(zip(*[r["ppl"] for r in rand]))
    stats = [{"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
              "min": min(v), "max": max(v), "median": statistics.median(v)} for v in by_level]
    params = {"greedy": [skeleton_parameters(model.config, empty.extended(*g["units"][:k]))
                         for k in range(len(g["units"]) + 1)]}
    out = {
        "model": name, "model_type": model.config.model_type, "kind": kind, "units_of_kind": n_units,
        "steps": steps, "base_params": base_params,
        "calibration": {"source": "bundled (tinyshakespeare lines 1-5769)", "samples": cal.n_samples,
                        "seqlen": cal.seqlen, "seed": args.seed, "fingerprint": cal.fingerprint()},
        "validation": {"source": "hf_shedder/assets/reference/validation.txt", "windows": len(val),
                       "seqlen": val.seqlen, "window_indices": val_idx, "selection": "evenly spaced over the file"},
        "greedy": {"units": [unit_key(u) for u in g["units"]], "ppl": greedy,
                   "calibration_ppl": g["calibration_ppl"], "search_seconds": g["seconds"],
                   "params": params["greedy"]},
        "cheap": {"criterion": "local output change: mean over tokens of 1 - cos(layer out, layer out with unit "
                               "masked) on the unpruned model's layer inputs (= block influence for blocks)",
                  "scores": scores, "units": [unit_key(u) for u in c_units], "ppl": cheap,
                  "seconds": cheap_seconds},
        "random": {"seeds": rand, "stats": stats},
        "validation_evaluations": ev.evaluations,
        "seconds": time.perf_counter() - t_start,
        "environment": environment(torch.get_num_threads()),
    }
    return out


def plot_sweep(res: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    ks = list(range(len(res["greedy"]["ppl"])))
    st = res["random"]["stats"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    try:
        ax.fill_between(ks, [s["min"] for s in st], [s["max"] for s in st], color="tab:gray", alpha=0.25,
                        label=f"random: min-max of {len(res['random']['seeds'])} seeds")
        ax.plot(ks, [s["mean"] for s in st], "o--", color="tab:gray", label="random: mean")
        ax.plot(ks, [s["median"] for s in st], "v:", color="black", label="random: median")
        ax.plot(ks, res["cheap"]["ppl"], "s-", color="tab:blue", label="cheap: local output change")
        ax.plot(ks, res["greedy"]["ppl"], "o-", color="tab:red", label="greedy search")
        allp = [p for p in res["greedy"]["ppl"] + res["cheap"]["ppl"] + [s["max"] for s in st] if math.isfinite(p)]
        if max(allp) / min(allp) > 20:
            ax.set_yscale("log")
        ax.set_xlabel(f"{res['kind']} units removed")
        ax.set_ylabel(f"validation perplexity ({res['validation']['windows']} x {res['validation']['seqlen']} tokens)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"reference {res['model']} ({res['model_type']}): {res['kind']} removal, CPU")
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)


def plot_recovery(model: str, kind: str, levels: list[dict[str, Any]], path: str) -> None:
    """Perplexity before/after LoRA recovery per pruning level (mixed validation and its Shakespeare part)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted((lv for lv in levels if "shakespeare_ppl_before" in lv), key=lambda lv: lv["units_removed"])
    if not rows:
        return
    ks = [lv["units_removed"] for lv in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.8), dpi=110)
    try:
        for ax, (before, after, title) in zip(axes, [("ppl_before", "ppl_after", "mixed validation windows"),
                                                     ("shakespeare_ppl_before", "shakespeare_ppl_after",
                                                      "Shakespeare part (recovery text's domain)")]):
            ax.plot(ks, [lv[before] for lv in rows], "o-", color="tab:red", label="pruned")
            ax.plot(ks, [lv[after] for lv in rows], "s--", color="tab:green", label="pruned + LoRA recovery")
            ax.set_xlabel(f"{kind} units removed (greedy plan)")
            ax.set_ylabel("validation perplexity")
            ax.set_xticks(ks)
            ax.set_title(title, fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"reference {model}: LoRA recovery after {kind} removal, CPU", fontsize=10)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)


def cmd_sweep(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    tok = load_tokenizer()
    os.makedirs(args.results, exist_ok=True)
    os.makedirs(args.plots, exist_ok=True)
    for name in args.models:
        for kind in args.kinds or DEFAULT_KINDS[name]:
            res = sweep_one(name, kind, args, tok)
            path = os.path.join(args.results, f"reference_sweep_{name}_{kind}.json")
            with open(path, "w") as f:
                json.dump(res, f, indent=1)
            plot_sweep(res, os.path.join(args.plots, f"reference_sweep_{name}_{kind}.png"))
            print(f"[{name}/{kind}] done in {res['seconds']:.0f} s -> {path}", flush=True)
    return 0


# ----------------------------------------------------------------------------- recovery


def text_rows(path: str, chars: int) -> list[dict[str, str]]:
    """Plain text as Alpaca rows: consecutive paragraphs up to ``chars`` characters as the response,
    behind a fixed instruction (recover() computes the loss on the response only)."""
    with open(path, encoding="utf-8") as f:
        paragraphs = [p.strip() for p in f.read().split("\n\n") if p.strip()]
    rows, buf = [], ""
    for p in paragraphs:
        if buf and len(buf) + len(p) > chars:
            rows.append({"instruction": "Continue the text.", "input": "", "output": buf})
            buf = ""
        buf = f"{buf}\n\n{p}" if buf else p
    if buf:
        rows.append({"instruction": "Continue the text.", "input": "", "output": buf})
    return rows


def cmd_recovery(args: argparse.Namespace) -> int:
    import tempfile

    from hf_shedder.recovery import default_training_args, recover

    torch.set_num_threads(args.threads)
    tok = load_tokenizer()
    val, val_idx = validation_windows(tok, args.val_windows, args.val_seqlen)
    shk, shk_idx = shakespeare_windows(tok, args.val_windows, args.val_seqlen)
    sweep_file = os.path.join(args.results, f"reference_sweep_{args.model}_{args.kind}.json")
    with open(sweep_file) as f:
        sweep = json.load(f)
    if sweep["validation"]["window_indices"] != val_idx or sweep["validation"]["seqlen"] != args.val_seqlen:
        raise SystemExit(f"{sweep_file} used other validation windows; pass the same --val-windows/--val-seqlen")
    greedy_units = [Unit.from_dict(u) if isinstance(u, dict) else _parse_key(u) for u in sweep["greedy"]["units"]]
    rows = text_rows(os.path.join(os.path.dirname(hf_shedder.__file__), "assets", "text", "calibration.txt"),
                     args.row_chars)
    out_path = os.path.join(args.results, f"reference_recovery_{args.model}_{args.kind}{args.suffix}.json")
    levels_out = []
    for level in args.levels:
        t0 = time.perf_counter()
        model = load_reference(args.model, args.chunk_size)
        adapter = get_adapter(model)
        plan = adapter.empty_plan().extended(*greedy_units[:level])
        if level:
            adapter.apply_plan(plan)
        before = evaluate_perplexity(model, val, 8, progress=False).ppl
        shk_before = evaluate_perplexity(model, shk, 8, progress=False).ppl
        with tempfile.TemporaryDirectory() as tmp:
            targs = default_training_args(
                os.path.join(tmp, "checkpoints"), max_steps=args.train_steps, warmup_steps=max(1, args.train_steps // 10),
                per_device_train_batch_size=args.batch_size, learning_rate=args.lr, logging_steps=1,
                save_strategy="no", disable_tqdm=True, use_cpu=True)
            rec = recover(model, tok, rows, os.path.join(tmp, "out"), training_args=targs, max_length=args.max_length,
                          overwrite=True, eval_before=False)
            after = evaluate_perplexity(rec.model, val, 8, progress=False).ppl
            shk_after = evaluate_perplexity(rec.model, shk, 8, progress=False).ppl
        levels_out.append({"units_removed": level, "plan": [unit_key(u) for u in plan],
                           "params": skeleton_parameters(load_reference(args.model).config, plan),
                           "ppl_before": before, "ppl_after": after,
                           "shakespeare_ppl_before": shk_before, "shakespeare_ppl_after": shk_after,
                           "train_loss_first": rec.first_loss, "train_loss_last": rec.last_loss,
                           "train_steps": rec.settings["steps"], "trainable_params": rec.settings["trainable_params"],
                           "seconds": time.perf_counter() - t0})
        print(f"[recovery {args.model}/{args.kind} k={level}] ppl {before:.2f} -> {after:.2f}, Shakespeare part "
              f"{shk_before:.2f} -> {shk_after:.2f} "
              f"(train loss {rec.first_loss} -> {rec.last_loss}, {levels_out[-1]['seconds']:.0f} s)", flush=True)
        res = {"model": args.model, "kind": args.kind, "base_ppl": sweep["greedy"]["ppl"][0],
               "validation": sweep["validation"],
               "validation_shakespeare": {"window_indices": shk_idx, "seqlen": args.val_seqlen,
                                          "selection": "evenly spaced inside the held-out Shakespeare part"},
               "data": {"source": "bundled calibration text (tinyshakespeare lines 1-5769) as plain-text rows",
                        "rows": len(rows), "row_chars": args.row_chars, "max_length": args.max_length,
                        "instruction": "Continue the text.", "loss_on": "the text (response) tokens only"},
               "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "targets": "adapter default (in_proj)",
                        "lr": args.lr, "batch_size": args.batch_size, "steps": args.train_steps},
               "levels": levels_out, "environment": environment(torch.get_num_threads())}
        with open(out_path, "w") as f:
            json.dump(res, f, indent=1)
    return 0


def _parse_key(key: str) -> Unit:
    kind, rest = key.split("@")
    layer, _, idx = rest.partition(":")
    return Unit(kind, int(layer), tuple(int(i) for i in idx.split(",")) if idx else ())


# ----------------------------------------------------------------------------- markdown tables


def short_key(key: str) -> str:
    """``mlp_channels@3:0,1,...,47`` -> ``mlp_channels@3:0-47`` (contiguous index runs)."""
    head, _, idx = key.partition(":")
    if not idx:
        return key
    nums = [int(i) for i in idx.split(",")]
    if nums == list(range(nums[0], nums[-1] + 1)) and len(nums) > 2:
        return f"{head}:{nums[0]}-{nums[-1]}"
    return key


def cmd_report(args: argparse.Namespace) -> int:
    """Markdown tables of every result file (for benchmarks/BENCHMARKS.md)."""
    names = sorted(os.listdir(args.results))
    if args.replot:
        for fname in [n for n in names if n.startswith("reference_sweep_") and n.endswith(".json")]:
            with open(os.path.join(args.results, fname)) as f:
                r = json.load(f)
            plot_sweep(r, os.path.join(args.plots, fname.replace(".json", ".png")))
    for fname in [n for n in names if n.startswith("reference_sweep_") and n.endswith(".json")]:
        with open(os.path.join(args.results, fname)) as f:
            r = json.load(f)
        v = r["validation"]
        print(f"\n**{r['model']} ({r['model_type']}), {r['kind']}** ({r['units_of_kind']} units; validation "
              f"{v['windows']} x {v['seqlen']} tokens; greedy search {r['greedy']['search_seconds']:.0f} s):\n")
        print("| removed | greedy search | unit | cheap criterion | unit | random median | random mean ± std [min, max] |")
        print("|---|---|---|---|---|---|---|")
        for k, st in enumerate(r["random"]["stats"]):
            gu = short_key(r["greedy"]["units"][k - 1]) if k else "-"
            cu = short_key(r["cheap"]["units"][k - 1]) if k else "-"
            print(f"| {k} | {r['greedy']['ppl'][k]:.1f} | {gu} | {r['cheap']['ppl'][k]:.1f} | {cu} | {st['median']:.1f} | "
                  f"{st['mean']:.1f} ± {st['std']:.1f} [{st['min']:.1f}, {st['max']:.1f}] |")
    rec_files = [n for n in names if n.startswith("reference_recovery_") and n.endswith(".json")]
    groups: dict[tuple[str, str], list[tuple[dict[str, Any], dict[str, Any]]]] = {}
    for fname in rec_files:
        with open(os.path.join(args.results, fname)) as f:
            r = json.load(f)
        r["file"] = fname
        groups.setdefault((r["model"], r["kind"]), []).extend((r, lv) for lv in r["levels"])
    for (model, kind), levels in sorted(groups.items()):
        r0 = levels[0][0]
        lo = r0["lora"]
        print(f"\n**Recovery, {model} {kind}** (LoRA r={lo['r']} on {lo['targets']}, {lo['steps']} steps x "
              f"batch {lo['batch_size']}, lr {lo['lr']}; data: {r0['data']['rows']} rows of the calibration text):\n")
        print("| removed | plan | params | val ppl before | after | Shakespeare-part ppl before | after "
              "| train loss first -> last | seconds | file |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r, lv in sorted(levels, key=lambda x: x[1]["units_removed"]):
            shk = (f"{lv['shakespeare_ppl_before']:.1f} | {lv['shakespeare_ppl_after']:.1f}"
                   if "shakespeare_ppl_before" in lv else "- | -")
            print(f"| {lv['units_removed']} | {', '.join(map(short_key, lv['plan'])) or '(unpruned)'} | "
                  f"{lv['params']:,} | {lv['ppl_before']:.1f} | {lv['ppl_after']:.1f} | {shk} | "
                  f"{lv['train_loss_first']:.2f} -> {lv['train_loss_last']:.2f} | {lv['seconds']:.0f} | {r['file']} |")
        if args.replot:
            plot_recovery(model, kind, [lv for _, lv in levels], os.path.join(args.plots, f"reference_recovery_{model}_{kind}.png"))
    return 0


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("sweep", "recovery", "report"):
        s = sub.add_parser(name)
        s.add_argument("--val-windows", type=int, default=8)
        s.add_argument("--val-seqlen", type=int, default=128)
        s.add_argument("--chunk-size", type=int, default=16)
        s.add_argument("--threads", type=int, default=1)
        s.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    s = sub.choices["sweep"]
    s.add_argument("--models", nargs="+", default=["mamba2", "mamba", "hybrid"], choices=list(DEFAULT_KINDS))
    s.add_argument("--kinds", nargs="+", default=None)
    s.add_argument("--steps", type=int, default=6)
    s.add_argument("--seeds", type=int, default=5)
    s.add_argument("--seed", type=int, default=42, help="calibration seed")
    s.add_argument("--cal-samples", type=int, default=8)
    s.add_argument("--cal-seqlen", type=int, default=128)
    s.add_argument("--plots", default=os.path.join(ROOT, "docs"))
    sub.choices["report"].add_argument("--replot", action="store_true", help="redraw the PNGs from the JSON")
    sub.choices["report"].add_argument("--plots", default=os.path.join(ROOT, "docs"))
    r = sub.choices["recovery"]
    r.add_argument("--model", default="mamba2", choices=list(DEFAULT_KINDS))
    r.add_argument("--kind", default="block")
    r.add_argument("--levels", type=int, nargs="+", default=[0, 2, 4, 6])
    r.add_argument("--suffix", default="", help="appended to the result file name (e.g. _control)")
    r.add_argument("--train-steps", type=int, default=30)
    r.add_argument("--batch-size", type=int, default=8)
    r.add_argument("--lr", type=float, default=1e-3)
    r.add_argument("--max-length", type=int, default=160)
    r.add_argument("--row-chars", type=int, default=480)
    args = p.parse_args(argv)
    return {"sweep": cmd_sweep, "recovery": cmd_recovery, "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    raise SystemExit(main())
