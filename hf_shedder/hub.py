"""Model card rendering and upload of a pruned model folder to the Hugging Face Hub.

The card is rendered from ``model_cards/pruned_model_card.md`` (``string.Template``) and a context
dict; ``card_context_from_dir`` builds that dict from the results files that the commands write
into a model folder. Anything not measured is said to be "not measured", never filled in.
"""

from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path
from string import Template
from typing import Any

from hf_shedder.errors import CheckpointError, HubError
from hf_shedder.records import (
    PLAN_FILE,
    PROVENANCE_FILE,
    SEARCH_FILE,
    folder_provenance,
    search_settings_for_card,
)

NOT_MEASURED = "not measured"
INSTALL_HINT = ("hf_shedder is not on PyPI: install it from its source repository (`pip install .` in a checkout) "
                "or from a wheel built there (`pip wheel . -w dist`)")

# Results files read by ``hf-shedder card`` (written by prune / eval / bench / recover).
EVAL_FILE = "eval_results.json"  # {"base": {...}, "pruned": {...}} from `hf-shedder eval`
SPEED_FILE = "speed_results.json"  # SpeedComparison.to_dict() from `hf-shedder bench`
RECOVERY_FILE = "recovery.json"  # recovery settings + losses from `hf-shedder recover`
RESULT_FILES = (SEARCH_FILE, EVAL_FILE, "eval_results.csv", SPEED_FILE, RECOVERY_FILE, PLAN_FILE, PROVENANCE_FILE,
                "trajectory.png", "trajectory.csv", "trajectory.json", "pruning_config.json")
PLAIN_EXPORT_DIRS = ("plain_export", "plain")

# What a model repo needs; anything else in the folder (checkpoints, journals, scratch) stays local.
MODEL_PATTERNS = (
    "config.json", "generation_config.json",
    "*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
    "README.md",
)


# ----------------------------------------------------------------------------- card


def template_path() -> Path:
    """``model_cards/pruned_model_card.md`` of the source tree (or a copy shipped in the package)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "assets" / "model_cards" / "pruned_model_card.md",
                      here.parent / "model_cards" / "pruned_model_card.md"):
        if candidate.is_file():
            return candidate
    raise HubError("model card template pruned_model_card.md not found (expected in model_cards/)")


def _fmt_int(x: Any) -> str:
    return NOT_MEASURED if x is None else f"{int(x):,}"


def _fmt_float(x: Any, digits: int = 3) -> str:
    return NOT_MEASURED if x is None else f"{float(x):.{digits}f}"


def _fmt_pct(x: Any) -> str:
    return NOT_MEASURED if x is None else f"{100 * float(x):.1f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _removed_section(units: list[dict] | None, searched: bool = True) -> str:
    if units is None:
        return f"Removed units: {NOT_MEASURED} (no plan found)."
    if not units:
        return "Nothing was removed (empty plan)."
    rows = []
    for i, u in enumerate(units, 1):
        idx = u.get("indices") or []
        shown = "all" if not idx else (", ".join(map(str, idx[:16])) + (f" ... ({len(idx)} in all)" if len(idx) > 16 else ""))
        rows.append([str(i), str(u.get("kind")), str(u.get("layer")), shown])
    kinds: dict[str, int] = {}
    for u in units:
        kinds[str(u.get("kind"))] = kinds.get(str(u.get("kind")), 0) + 1
    summary = ", ".join(f"{n} x {k}" for k, n in kinds.items())
    order = "in the order the search removed them" if searched else "in plan order"
    return f"{len(units)} units removed ({summary}), {order}:\n\n" + _table(
        ["step", "unit kind", "layer (original index)", "indices"], rows
    )


def _params_section(before: Any, after: Any) -> str:
    rows = [["parameters", _fmt_int(before), _fmt_int(after)]]
    if before and after:
        rows.append(["fraction kept", "100.0%", f"{100 * after / before:.1f}%"])
    return _table(["", "base", "pruned"], rows)


def _search_section(search: dict | None, metrics: dict | None = None, versions: dict | None = None) -> str:
    made_with = ("\n\nMade with " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".") if versions else ""
    if not search:
        return "No search was recorded: the plan was applied as given." + made_with
    labels = {
        "unit_kinds": "unit kinds", "steps": "steps", "calibration": "calibration data", "n_samples": "samples",
        "seqlen": "sequence length", "seed": "seed", "batch_size": "batch size", "mode": "search mode",
        "seconds": "search time (s)", "device": "device", "target": "stopping target",
    }
    rows = [[labels.get(k, k), ", ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)]
            for k, v in search.items() if not isinstance(v, dict)]
    metrics = metrics or {}
    if metrics.get("calibration_ppl_base") is not None:
        rows.append(["calibration perplexity, base", _fmt_float(metrics["calibration_ppl_base"])])
    if metrics.get("calibration_ppl_pruned") is not None:
        rows.append(["calibration perplexity, after the search", _fmt_float(metrics["calibration_ppl_pruned"])])
    if metrics.get("stop_reason"):
        rows.append(["stopped because", str(metrics["stop_reason"])])
    return "Greedy training-free search (Mamba-Shedder): at each step remove the unit whose removal gives the " \
        "lowest calibration perplexity.\n\n" + _table(["setting", "value"], rows) + made_with


def _is_full_fine_tune(recovery: dict) -> bool:
    return str(recovery.get("method", "")).startswith("full")


def _results_section(evals: dict | None, recovery: dict | None = None) -> str:
    """Base beside this model; a model that went through recovery tuning is labelled as such (its
    ``pruned`` entry is the pruned + recovered model)."""
    evals = evals or {}
    label = "pruned" if not recovery else ("pruned + fine-tune" if _is_full_fine_tune(recovery) else "pruned + LoRA")
    base, pruned = evals.get("base") or {}, evals.get("pruned") or {}
    if not base and not pruned:
        return f"Perplexity and zero-shot accuracy: {NOT_MEASURED}."

    def ppl(e: dict) -> str:
        p = e.get("perplexity")
        return NOT_MEASURED if not p else _fmt_float(p.get("ppl"), 3)

    ppl_src = (pruned.get("perplexity") or base.get("perplexity") or {}).get("source") or "calibration text"
    rows = [[f"perplexity ({ppl_src})", ppl(base), ppl(pruned)]]
    bt, pt = base.get("tasks") or {}, pruned.get("tasks") or {}
    tasks = list(dict.fromkeys([*(pt.get("scores") or {}), *(bt.get("scores") or {})]))
    for t in tasks:
        metric = (pt.get("metrics") or bt.get("metrics") or {}).get(t, "acc")
        rows.append([f"{t} ({metric}, %)", _fmt_pct((bt.get("scores") or {}).get(t)),
                     _fmt_pct((pt.get("scores") or {}).get(t))])
    if tasks:
        if "lambada_openai" in tasks:
            rows.append(["lambada_openai perplexity", _fmt_float(bt.get("lambada_ppl"), 2),
                         _fmt_float(pt.get("lambada_ppl"), 2)])
        rows.append(["average accuracy (%)", _fmt_pct(bt.get("average")), _fmt_pct(pt.get("average"))])
    else:
        rows.append(["zero-shot accuracy", NOT_MEASURED, NOT_MEASURED])
    text = _table(["metric", "base", label], rows)
    notes = []
    src = pt.get("data_source") or bt.get("data_source")
    if src == "bundled":
        notes.append("Task scores come from hf_shedder's bundled hand-written task slices (offline test data, "
                     "a few items per task): they are NOT benchmark results.")
    elif src and src != "hub":
        notes.append(f"Task data: local copies in `{src}`.")
    limit = pt.get("limit") or bt.get("limit")
    if limit:
        notes.append(f"Evaluated with limit={limit} documents per task.")
    if tasks:
        notes.append("Metric choice as the Mamba-Shedder reference: acc for arc_easy, acc_norm where the task has it, "
                     "else acc; zero-shot, lm-eval.")
    return text + ("\n\n" + "\n".join(f"- {n}" for n in notes) if notes else "")


def _recovery_section(recovery: dict | None) -> str:
    if not recovery:
        return "No recovery tuning was run: the weights are the base model's, minus the removed units."
    rows = [[k, ", ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)]
            for k, v in recovery.items() if not isinstance(v, dict)]
    what = ("Full fine-tune (every weight, Transformers `Trainer`) for recovery." if _is_full_fine_tune(recovery)
            else "LoRA recovery tuning (PEFT + Transformers `Trainer`), merged into the weights.")
    return what + "\n\n" + _table(
        ["setting", "value"], rows
    )


def _speed_section(speed: dict | None) -> str:
    if not speed:
        return f"Speed-up: {NOT_MEASURED}."
    from hf_shedder.evaluation.speed import SpeedComparison

    return SpeedComparison.from_dict(speed).to_markdown()


def _load_section(repo: str, has_remote_code: bool, plain_export: str | None, is_plain: bool = False,
                  is_mamba_ssm: bool = False) -> str:
    if is_mamba_ssm:
        return "\n".join([
            "This is a mamba-ssm export: a standard `MambaLMHeadModel` checkpoint (whole blocks removed) that "
            "mamba-ssm serves with CUDA-graph decoding:",
            "",
            "```python",
            "import torch",
            "from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel",
            "from transformers import AutoTokenizer",
            "",
            f'model = MambaLMHeadModel.from_pretrained("{repo}", device="cuda", dtype=torch.float16)',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}")  # GPT-NeoX-20B, saved beside the weights',
            'ids = tokenizer("Mamba is", return_tensors="pt").input_ids.cuda()',
            "out = model.generate(ids, max_length=ids.shape[1] + 64, cg=True)",
            "```",
            "",
            "With hf_shedder installed it also loads as a Transformers model: "
            f'`hf_shedder.loading.load_model("{repo}")`. `{PLAN_FILE}` records which units were removed.',
        ])
    if is_plain:
        return "\n".join([
            "This is a plain export: a stock-architecture checkpoint (whole blocks removed) that loads with "
            "Transformers alone:",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{repo}")',
            "```",
            "",
            f"`{PLAN_FILE}` records which units were removed.",
        ])
    parts = [
        f"With hf_shedder installed ({INSTALL_HINT}):",
        "",
        "```python",
        "import hf_shedder  # registers the pruned architecture with AutoModelForCausalLM",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{repo}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
        "```",
    ]
    if has_remote_code:
        parts += [
            "",
            "Without hf_shedder, with the modelling code stored in this repository:",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{repo}", trust_remote_code=True)',
            "```",
        ]
    else:
        parts += ["", "Loading with `trust_remote_code=True`: not available (no remote-code files in this repository)."]
    if plain_export:
        parts += [
            "",
            f"Plain export: `{plain_export}/` is a stock-architecture checkpoint (whole blocks removed) that "
            "loads with Transformers alone:",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{repo}", subfolder="{plain_export}")',
            "```",
        ]
    else:
        parts += ["", "Plain stock-architecture export: not available for this model."]
    return "\n".join(parts)


def render_model_card(context: dict[str, Any], template: str | os.PathLike[str] | None = None) -> str:
    """Render the card. Context keys (all optional; missing ones are reported as not measured):
    ``repo_id``, ``title``, ``base_model``, ``family``, ``units`` (list of unit dicts, removal order),
    ``params_before``, ``params_after``, ``search`` (settings dict; absent: the plan was applied as given),
    ``search_metrics`` (calibration perplexities), ``versions``, ``export`` ("plain" for a stock checkpoint),
    ``eval`` (``eval_results.json``:
    {"base": {...}, "pruned": {...}}), ``recovery`` (settings dict), ``speed`` (``SpeedComparison.to_dict()``),
    ``has_remote_code`` (bool), ``plain_export`` (subfolder name)."""
    c = dict(context)
    repo = c.get("repo_id") or "path/to/this/model"
    base = c.get("base_model")
    units = c.get("units")
    title = c.get("title") or (f"{base.split('/')[-1]} pruned with Mamba-Shedder" if base else "Pruned model (Mamba-Shedder)")
    front = ["library_name: transformers", "tags:", "  - hf_shedder", "  - mamba-shedder", "  - pruned"]
    if base and not os.path.isabs(base):
        front.insert(0, f"base_model: {base}")
    if c.get("family"):
        front.append(f"  - {c['family']}")
    pb, pa = c.get("params_before"), c.get("params_after")
    searched = bool(c.get("search"))
    # only what is known goes into the sentence; the sections below say what was not measured
    summary = (f"A structurally pruned version of `{base}`" if base else "A structurally pruned model") + (
        f" ({c['family']})" if c.get("family") else "")
    if units is not None:
        how = "by a training-free Mamba-Shedder search" if searched else "following a given pruning plan"
        summary += f": {len(units)} units removed {how}"
    if pb and pa:
        summary += f", keeping {100 * pa / pb:.1f}% of the parameters"
    summary += "."
    base_section = (
        f"`{base}`" + (f" (family: {c['family']})" if c.get("family") else "") if base else "Base model: not recorded."
    )
    values = {
        "front_matter": "\n".join(front),
        "title": title,
        "summary": summary,
        "base_model_section": base_section,
        "removed_section": _removed_section(units, searched),
        "params_section": _params_section(pb, pa),
        "search_section": _search_section(c.get("search"), c.get("search_metrics"), c.get("versions")),
        "results_section": _results_section(c.get("eval"), c.get("recovery")),
        "recovery_section": _recovery_section(c.get("recovery")),
        "speed_section": _speed_section(c.get("speed")),
        "load_section": _load_section(repo, bool(c.get("has_remote_code")), c.get("plain_export"),
                                      c.get("export") == "plain", c.get("export") == "mamba_ssm"),
    }
    text = Path(template or template_path()).read_text(encoding="utf-8")
    return Template(text).substitute(values)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise HubError(f"{path} is not valid JSON ({e.msg}); re-run the command that writes it") from e


def card_context_from_dir(folder: str | os.PathLike[str], repo_id: str | None = None) -> dict[str, Any]:
    """Collect the card context from the files a pruned model folder holds."""
    d = Path(folder)
    if not (d / "config.json").is_file():
        raise HubError(f"{d} is not a model folder (no config.json)")
    config = _read_json(d / "config.json")
    ctx: dict[str, Any] = {"repo_id": repo_id}
    try:
        provenance = folder_provenance(d)
    except CheckpointError as e:
        raise HubError(str(e)) from e
    plan = config.get("plan") or {}
    ctx["base_model"] = provenance.get("base_model")
    ctx["family"] = plan.get("family")
    if "units" in plan:
        ctx["units"] = plan["units"]
    if config.get("model_type") == "hf_shedder" or (d / PLAN_FILE).is_file():
        from hf_shedder.commands.info import describe

        info = describe(str(d))  # parameter counts from the base skeleton with and without the plan
        ctx.update({k: info[k] for k in ("params_before", "params_after", "family") if info.get(k) is not None})
        ctx["units"] = info["removed"]
        ctx["export"] = info["export"]
        ctx["base_model"] = ctx["base_model"] or info.get("base_model")
    metrics = provenance.get("metrics") or {}
    for key in ("params_before", "params_after"):
        if ctx.get(key) is None and metrics.get(key) is not None:
            ctx[key] = metrics[key]
    if provenance.get("search"):
        ctx["search"] = search_settings_for_card(provenance["search"])
    ctx["search_metrics"] = metrics or None
    ctx["versions"] = provenance.get("versions")
    if (d / SEARCH_FILE).is_file():
        search = _read_json(d / SEARCH_FILE)
        for key in ("base_model", "family", "units", "params_before", "params_after"):
            if search.get(key) is not None:
                ctx[key] = search[key]
        ctx["search"] = search.get("settings") or ctx.get("search")
        ctx["search_metrics"] = search.get("metrics") or ctx["search_metrics"]
        ctx["versions"] = search.get("versions") or ctx["versions"]
    if (d / EVAL_FILE).is_file():
        ctx["eval"] = _read_json(d / EVAL_FILE)
        for label, key in (("base", "params_before"), ("pruned", "params_after")):
            n = (ctx["eval"].get(label) or {}).get("n_params")
            if ctx.get(key) is None and n:
                ctx[key] = n
    if (d / SPEED_FILE).is_file():
        ctx["speed"] = _read_json(d / SPEED_FILE)
        if ctx.get("params_before") is None:
            ctx["params_before"] = ctx["speed"]["base"].get("n_params")
        if ctx.get("params_after") is None:
            ctx["params_after"] = ctx["speed"]["pruned"].get("n_params")
    if (d / RECOVERY_FILE).is_file():
        ctx["recovery"] = _read_json(d / RECOVERY_FILE)
    ctx["has_remote_code"] = bool(config.get("auto_map")) and any(d.glob("modeling_*.py"))
    ctx["plain_export"] = next((p for p in PLAIN_EXPORT_DIRS if (d / p / "config.json").is_file()), None)
    return ctx


def write_model_card(folder: str | os.PathLike[str], repo_id: str | None = None) -> Path:
    text = render_model_card(card_context_from_dir(folder, repo_id))
    out = Path(folder) / "README.md"
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out)
    return out


# ----------------------------------------------------------------------------- push


def files_to_upload(folder: str | os.PathLike[str]) -> list[str]:
    """Relative paths (sorted) that a push uploads: weights, config, tokenizer, card, remote code, results,
    plain export. Raises HubError when the folder lacks what a model repo needs."""
    d = Path(folder)
    if not d.is_dir():
        raise HubError(f"{d} is not a folder")
    top = sorted(p.name for p in d.iterdir() if p.is_file())
    missing = [n for n in ("config.json", "README.md") if n not in top]
    weights = [n for n in top if fnmatch.fnmatch(n, "*.safetensors") or fnmatch.fnmatch(n, "pytorch_model*.bin")]
    if not weights:
        missing.append("weights (*.safetensors)")
    if missing:
        hint = " (render it with `hf-shedder card DIR`)" if "README.md" in missing else ""
        raise HubError(f"{d} is missing {', '.join(missing)}{hint}; nothing was uploaded")
    chosen = [n for n in top if any(fnmatch.fnmatch(n, pat) for pat in MODEL_PATTERNS) or n in RESULT_FILES]
    config = _read_json(d / "config.json")
    if config.get("auto_map"):
        chosen += [n for n in top if n.endswith(".py")]  # remote code written next to the weights
    for sub in PLAIN_EXPORT_DIRS:
        sd = d / sub
        if (sd / "config.json").is_file():
            chosen += [f"{sub}/{p.name}" for p in sorted(sd.iterdir())
                       if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in MODEL_PATTERNS)]
    return sorted(set(chosen))


def resolve_token(token: str | None = None) -> str:
    """Token from the argument, ``HF_TOKEN`` or the huggingface_hub login; HubError without one."""
    if token:
        return token
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"]
    from huggingface_hub import get_token

    found = get_token()
    if not found:
        raise HubError(
            "no Hugging Face token: pass --token, set HF_TOKEN, or run `hf auth login` (a write token is needed to push)"
        )
    return found


def http_client_modules() -> list:
    """The HTTP client packages huggingface_hub may raise errors from: ``httpx`` (1.x) and ``httpx2`` (2.x)."""
    import importlib

    found = []
    for name in ("httpx2", "httpx"):
        try:
            found.append(importlib.import_module(name))
        except ImportError:
            continue
    return found


def push_to_hub(
    folder: str | os.PathLike[str],
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload model pruned with hf_shedder (Mamba-Shedder)",
) -> str:
    """Create ``repo_id`` (if needed) and upload exactly ``files_to_upload(folder)``; returns the commit URL."""
    if not repo_id or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise HubError(f"--repo must look like 'user/name', got {repo_id!r}")
    files = files_to_upload(folder)
    tok = resolve_token(token)
    transport_errors = tuple(m.TransportError for m in http_client_modules())
    http_errors = tuple(m.HTTPError for m in http_client_modules())
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    api = HfApi(token=tok)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            folder_path=str(folder), repo_id=repo_id, repo_type="model",
            allow_patterns=files, commit_message=commit_message,
        )
    except OfflineModeIsEnabled as e:
        raise HubError(f"cannot push to {repo_id}: Hugging Face Hub offline mode is on (HF_HUB_OFFLINE=1)") from e
    except HfHubHTTPError as e:  # the Hub answered with an error (bad token, no permission, ...)
        raise HubError(f"push to {repo_id} failed: {type(e).__name__}: {e}") from e
    except (*transport_errors, ConnectionError) as e:  # huggingface_hub raises its HTTP client's own errors
        raise HubError(
            f"push to {repo_id} failed: cannot reach the Hugging Face Hub ({type(e).__name__}: {e}); "
            "check the network connection (or proxy settings) and try again"
        ) from e
    except (*http_errors, OSError) as e:
        raise HubError(f"push to {repo_id} failed: {type(e).__name__}: {e}") from e
    return str(getattr(info, "commit_url", info))
