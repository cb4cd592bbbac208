#!/usr/bin/env python
"""The offline demo (`make demo`): search -> extract -> eval -> short LoRA recovery -> model card.

Runs on CPU with no network, on the bundled Mamba-2 reference model (hf_shedder/assets/reference/mamba2,
trained by recipes/pretrain_reference.py), the bundled text (calibration / validation slices), the
bundled lm-eval task slices and the bundled hand-written instruction rows. If the reference model is
missing it falls back to a tiny *random* Mamba-2 and says so: the mechanics still run, the numbers mean
nothing.

    python recipes/demo_offline.py --out demo_out            # about a minute
    python recipes/demo_offline.py --out demo_out --quick    # smaller settings (tests)

Writes OUT/search (plan, trajectory), OUT/pruned (pruned model), OUT/recovered (pruned + merged LoRA,
eval results, README.md model card), OUT/trajectory.png and OUT/summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
REFERENCE = REPO / "hf_shedder" / "assets" / "reference" / "mamba2"

# (normal, quick) settings
SETTINGS = {
    "samples": (8, 4), "seqlen": (128, 64), "batch_size": (4, 4), "steps": (3, 2), "eval_seqlen": (128, 64),
    "eval_windows": (16, 4), "limit": (5, 2), "recovery_steps": (8, 2), "recovery_batch": (4, 4),
    "recovery_seqlen": (128, 96),
}
QUICK_TASKS = ("arc_easy",)


def banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def load_base(model_dir: str | None):  # noqa: ANN201
    """The bundled reference Mamba-2 (float32), or a loudly announced tiny random one."""
    import hf_shedder  # noqa: F401
    from hf_shedder.loading import load_model

    path = Path(model_dir) if model_dir else REFERENCE
    if (path / "config.json").is_file():
        return load_model(str(path), dtype=torch.float32), str(path), False
    if model_dir:
        raise SystemExit(f"demo: no model in {model_dir}")
    from transformers import Mamba2Config, Mamba2ForCausalLM

    print("\n" + "!" * 78)
    print(f"!!  The bundled reference model ({REFERENCE.relative_to(REPO)}) is not there.")
    print("!!  FALLING BACK TO A TINY *RANDOM* MAMBA-2: the pipeline runs, but its perplexities,")
    print("!!  accuracies and pruning choices are meaningless. Train the reference model with")
    print("!!  recipes/pretrain_reference.py to see real results.")
    print("!" * 78, flush=True)
    torch.manual_seed(0)
    cfg = Mamba2Config(vocab_size=50280, hidden_size=64, num_hidden_layers=8, num_heads=4, head_dim=32,
                       state_size=16, n_groups=1, expand=2, chunk_size=64, tie_word_embeddings=True,
                       pad_token_id=0, bos_token_id=0, eos_token_id=0)
    return Mamba2ForCausalLM(cfg).eval(), "random-tiny-mamba2 (NOT TRAINED)", True


def evaluate(model, tok, label: str, s: dict, tasks: tuple[str, ...]) -> dict:  # noqa: ANN001
    from hf_shedder.data import load_eval_text
    from hf_shedder.evaluation.harness import evaluate_tasks
    from hf_shedder.evaluation.perplexity import evaluate_perplexity
    from hf_shedder.loading import count_parameters

    text = load_eval_text("bundled", tok, seqlen=s["eval_seqlen"])
    # A fixed slice of the held-out text keeps the demo near a minute on a 2-core CPU.
    n = s["eval_windows"]
    text.input_ids, text.attention_mask = text.input_ids[:n], text.attention_mask[:n]
    ppl = evaluate_perplexity(model, text, batch_size=4, progress=False)
    res = evaluate_tasks(model, tok, list(tasks), batch_size=8, limit=s["limit"], source="bundled", max_length=512)
    print(f"{label}: validation perplexity {ppl.ppl:.2f}, average task accuracy {100 * res.average:.1f}%", flush=True)
    return {"model": label, "n_params": count_parameters(model), "perplexity": ppl.to_dict(), "tasks": res.to_dict()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out")
    p.add_argument("--quick", action="store_true", help="smaller settings (a few seconds of work per stage)")
    p.add_argument("--model", default=None, help="model folder (default: the bundled Mamba-2 reference model)")
    p.add_argument("--units", default="ssm", help="unit kinds to search (default: ssm; e.g. block,ssm)")
    p.add_argument("--steps", type=int, default=None, help="units to remove")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = p.parse_args(argv)
    s = {k: v[1 if args.quick else 0] for k, v in SETTINGS.items()} | {"quick": args.quick}
    if args.steps:
        s["steps"] = args.steps
    from hf_shedder.evaluation.harness import DEFAULT_TASKS

    tasks = QUICK_TASKS if args.quick else DEFAULT_TASKS
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        if not args.overwrite:
            raise SystemExit(f"demo: {out} is not empty (pass --overwrite)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    torch.manual_seed(0)

    import hf_shedder
    from hf_shedder.data import load_calibration, load_tokenizer
    from hf_shedder.evaluation.harness import save_eval_results
    from hf_shedder.hub import SEARCH_FILE, write_model_card
    from hf_shedder.loading import count_parameters
    from hf_shedder.log_filters import install as drop_unactionable_warnings
    from hf_shedder.recovery import default_training_args, recover
    from hf_shedder.search import SearchSettings, search

    drop_unactionable_warnings()
    banner("1/5 model")
    base, base_name, is_random = load_base(args.model)
    tok = load_tokenizer()
    print(f"{base_name}: {type(base).__name__}, {base.config.num_hidden_layers} layers, "
          f"{count_parameters(base):,} parameters")

    banner("2/5 search (greedy, training-free)")
    calib = load_calibration("bundled", tok, n_samples=s["samples"], seqlen=s["seqlen"], seed=42)
    settings = SearchSettings(units=tuple(args.units.split(",")), steps=s["steps"], calibration="bundled",
                              samples=s["samples"], seqlen=s["seqlen"], batch_size=s["batch_size"])
    found = search(base, calib, settings, out_dir=out / "search", progress=not args.quick)
    for row in found.trajectory:
        print(f"  step {row['step']}: removed {row['unit']!s:<10} calibration ppl {row['ppl']:.2f}")
    shutil.copy2(out / "search" / "trajectory.png", out / "trajectory.png")

    banner("3/5 extract (physical removal) and evaluate")
    pruned = hf_shedder.prune(base, found.plan, provenance={"base_model": base_name})
    pruned.save_pretrained(out / "pruned", export="remote_code")
    tok.save_pretrained(out / "pruned")
    params_before, params_after = count_parameters(base), count_parameters(pruned)
    search_info = {
        "base_model": base_name, "family": found.plan.family, "units": [u.to_dict() for u in found.plan],
        "params_before": params_before, "params_after": params_after,
        "settings": {"unit_kinds": list(settings.units), "steps": settings.steps, "calibration": "bundled",
                     "n_samples": settings.samples, "seqlen": settings.seqlen, "seed": settings.seed,
                     "mode": "accelerated (same plan as the reference loop)"},
    }
    for name in ("trajectory.png", "trajectory.csv", "trajectory.json"):
        shutil.copy2(out / "search" / name, out / "pruned" / name)
    (out / "pruned" / SEARCH_FILE).write_text(json.dumps(search_info, indent=2) + "\n")
    entries = {"base": evaluate(base, tok, base_name, s, tasks)}
    entries["pruned"] = evaluate(pruned, tok, "pruned", s, tasks)

    banner("4/5 LoRA recovery (short, on the bundled hand-written instruction rows)")
    targs = default_training_args(str(out / "recovered" / "checkpoints"), max_steps=s["recovery_steps"],
                                  per_device_train_batch_size=s["recovery_batch"], learning_rate=1e-3,
                                  warmup_steps=0, logging_steps=1, save_steps=s["recovery_steps"],
                                  disable_tqdm=args.quick, dataloader_pin_memory=False)
    result = recover(pruned, tok, "bundled", str(out / "recovered"), training_args=targs,
                     max_length=s["recovery_seqlen"], source_dir=str(out / "pruned"))
    print(f"train loss {result.first_loss:.3f} -> {result.last_loss:.3f} over {len(result.losses)} steps")
    entries["recovered"] = evaluate(result.model, tok, "pruned + LoRA", s, tasks)

    banner("5/5 model card")
    save_eval_results(str(out), entries)
    # the published model is the recovered one: its card compares it with the base
    save_eval_results(str(out / "recovered"), {"base": entries["base"], "pruned": entries["recovered"]})
    card = write_model_card(out / "recovered")
    print(f"wrote {card}")

    rows = [("base", entries["base"]), ("pruned", entries["pruned"]), ("pruned + LoRA", entries["recovered"])]
    print(f"\nSummary ({found.plan.summary()} removed from {base_name}; tasks: bundled slices, limit {s['limit']})")
    print("| model | parameters | validation ppl | avg task acc (%) |\n|---|---:|---:|---:|")
    for label, e in rows:
        print(f"| {label} | {e['n_params']:,} | {e['perplexity']['ppl']:.2f} | {100 * e['tasks']['average']:.1f} |")
    if is_random:
        print("\n(random fallback model: these numbers are meaningless, see the warning above)")
    summary = {"base_model": base_name, "random_fallback": is_random, "plan": found.plan.to_dict(),
               "trajectory": found.trajectory, "results": entries, "recovery": result.settings,
               "seconds": round(time.perf_counter() - t0, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"\ndone in {summary['seconds']} s; wrote {out / 'trajectory.png'} and {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
