"""``hf-shedder eval DIR``: perplexity (project evaluator) and zero-shot accuracy (lm-eval)."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from ..errors import ShedderError

DEFAULT_TASKS = "lambada_openai,hellaswag,piqa,arc_easy,arc_challenge,winogrande,openbookqa"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", help="model directory (or hub name) to evaluate, e.g. a pruned model")
    p.add_argument("--base", default=None, help="also evaluate this base model and store it as 'base'")
    p.add_argument("--ppl", default=None, metavar="SRC",
                   help="perplexity on wikitext2 | ptb | c4 | alpaca | bundled | a local .txt/.json/.jsonl file")
    p.add_argument("--seqlen", type=int, default=2048, help="perplexity window length (default 2048)")
    p.add_argument("--ppl-limit", type=int, default=None,
                   help="use only the first N windows of the perplexity text (quick checks; default: all)")
    p.add_argument("--tasks", default=None, help=f"comma-separated lm-eval tasks, e.g. {DEFAULT_TASKS}")
    p.add_argument("--task-dir", default=None, help="folder of <task>.jsonl files (full local copies, offline)")
    p.add_argument("--task-source", choices=("hub", "bundled"), default=None,
                   help="task data: hub, or the bundled offline slices (default: bundled when offline)")
    p.add_argument("--limit", type=float, default=None, help="evaluate at most this many documents per task")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer name/folder (default: the model's own; GPT-NeoX-20B for mamba-ssm checkpoints)")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    p.add_argument("--device-map", default=None,
                   help="e.g. auto: spread a model too large for one GPU over several (accelerate); replaces --device")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: as saved; float32 on CPU)")
    p.add_argument("--out", default=None, help="where to write eval_results.json/.csv (default: the model folder)")
    p.add_argument("--no-progress", action="store_true")


def evaluate_model(path: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from ..loading import compute_dtype, count_parameters, load_model, parse_dtype
    from ..tokenizer_choice import tokenizer_for_command

    chosen = tokenizer_for_command(path, args.tokenizer)  # before loading: a misfit is refused before any work
    tok = chosen.tokenizer
    if args.device_map:
        mapped_to = "cuda" if torch.cuda.is_available() else "cpu"  # where --device-map puts it
        model = load_model(path, dtype=compute_dtype(parse_dtype(args.dtype), mapped_to), device_map=args.device_map)
        device = ",".join(sorted({str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()})) or "cpu"
    else:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = load_model(path, dtype=compute_dtype(parse_dtype(args.dtype), device), device=device)
    entry: dict[str, Any] = {"model": path, "n_params": count_parameters(model), "device": device,
                             "tokenizer": chosen.name}
    if args.ppl:
        from ..data import load_eval_text
        from ..evaluation.perplexity import evaluate_perplexity

        text = load_eval_text(args.ppl, tok, seqlen=args.seqlen, max_samples=args.ppl_limit)
        res = evaluate_perplexity(model, text, batch_size=args.batch_size, progress=not args.no_progress)
        entry["perplexity"] = res.to_dict()
    if args.tasks:
        from ..evaluation.harness import evaluate_tasks

        limit = int(args.limit) if args.limit and args.limit >= 1 else args.limit
        tasks = evaluate_tasks(model, tok, [t for t in args.tasks.split(",") if t.strip()],
                               batch_size=args.batch_size, limit=limit, task_dir=args.task_dir, source=args.task_source)
        entry["tasks"] = tasks.to_dict()
    return entry


def run(args: argparse.Namespace) -> int:
    from ..evaluation.harness import RESULTS_JSON, save_eval_results

    if not args.ppl and not args.tasks:
        raise ShedderError("nothing to evaluate: give --ppl SRC and/or --tasks " + DEFAULT_TASKS)
    out = args.out or (args.model_dir if os.path.isdir(args.model_dir) else "eval_out")
    entries: dict[str, Any] = {"pruned": evaluate_model(args.model_dir, args)}
    if args.base:
        entries["base"] = evaluate_model(args.base, args)
    previous = os.path.join(out, RESULTS_JSON)
    if os.path.isfile(previous):  # keep what earlier runs measured (e.g. --ppl now, --tasks before)
        with open(previous) as f:
            old = json.load(f)
        for label, entry in entries.items():
            prev = old.get(label) or {}
            if prev.get("model") == entry["model"]:
                entries[label] = {**prev, **entry}
        entries = {**{k: v for k, v in old.items() if k not in entries}, **entries}
    json_path, _ = save_eval_results(out, entries)
    print(format_summary(entries))
    print(f"\nwrote {json_path}")
    return 0


def format_summary(entries: dict[str, Any]) -> str:
    labels = sorted(entries, key=lambda k: (k != "base", k))  # base first, as in the card
    rows: list[tuple[str, list[str]]] = []
    ppls = [(entries[k].get("perplexity") or {}) for k in labels]
    if any(ppls):
        src = next(p.get("source") for p in ppls if p)
        rows.append((f"perplexity ({src})", [f"{p['ppl']:.3f}" if p else "-" for p in ppls]))
    tasks = [(entries[k].get("tasks") or {}) for k in labels]
    names = list(dict.fromkeys(t for tr in tasks for t in (tr.get("scores") or {})))
    for t in names:
        rows.append((t, [f"{100 * tr['scores'][t]:.1f}" if t in (tr.get("scores") or {}) else "-" for tr in tasks]))
    if "lambada_openai" in names:
        rows.append(("lambada_openai ppl", [f"{tr['lambada_ppl']:.2f}" if tr.get("lambada_ppl") else "-" for tr in tasks]))
    if names:
        rows.append(("average acc (%)", [f"{100 * tr['average']:.1f}" if tr else "-" for tr in tasks]))
    lines = ["| metric | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    lines += [f"| {m} | " + " | ".join(v) + " |" for m, v in rows]
    if any(tr.get("data_source") == "bundled" for tr in tasks):
        lines.append("\n(task scores on the bundled hand-written slices: a pipeline check, not benchmark results)")
    return "\n".join(lines)
