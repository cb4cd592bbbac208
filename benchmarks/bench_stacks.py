"""Three stacks on the paper's shapes, in one run: Transformers eager, hf_shedder's fast path, mamba-ssm.

Called by ``bench_speed.py --stacks`` (see BENCHMARKS.md, "Fast path"). On one GPU, for the shapes of
mamba-2.8b (Mamba-1) and mamba2-2.7b (Mamba-2), random weights:

* **forward + full-logit CE** tokens/s at batch 8 x 2048 (and 2 x 2048, the reference search's batch):
  ``F.cross_entropy`` over every position's logits, as the search scores a candidate;
* **decode** tokens/s at batch 1 and 16, ``N`` new tokens after a 16-token prompt, greedy:
  ``batch * N / t(generate)`` after warm-up runs (graph captures happen there), median of repeats;
* **pruned / base** speed-ups for 14 of 64 blocks, 25% and 50% of blocks (Mamba-1) and 22 SSMs, 25% and
  50% of blocks (Mamba-2), base and pruned timed in alternation, ``--runs`` pairs per point: median,
  min and max of the per-pair ratios;
* every forward and decode rate of the Transformers-model stacks has mamba-ssm's rate beside it from the
  same run (``--sections stacks``: all three stacks; ``fast``: hf_shedder and mamba-ssm only);
* **correctness**: max |delta logit| of the fused forward against Transformers' eager forward (bf16,
  the big shapes), and greedy tokens of CUDA-graph decode against eager decode in fp32 (smaller shapes).

Stacks: ``transformers`` = stock classes, eager forward and ``generate`` (hf_shedder's fast path
switched off on the same model object); ``hf_shedder`` = fused forward + CUDA-graph decode (on by
default for models hf_shedder builds or loads); ``mamba_ssm`` = ``MambaLMHeadModel`` in fp16 (the
reference's dtype), ``generate(cg=True)`` for decode.
"""

from __future__ import annotations

import gc
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import hf_shedder
from hf_shedder.runtime import (
    disable_fast_path,
    enable_fast_path,
    get_kernels,
    graph_decoder_of,
)

PROMPT = 16
DEVICE = "cuda"  # "cpu" only for the --quick smoke test of this script's plumbing
SEQ = 2048


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        out.append(time.perf_counter() - t0)
    return out


def hf_config(preset: dict[str, Any], layers: int | None = None, hidden: int | None = None) -> Any:
    from transformers import Mamba2Config, MambaConfig

    cfg = dict(preset["config"])
    if DEVICE == "cpu":
        cfg, layers, hidden = dict(preset["quick"]), None, None
    if layers:
        cfg["num_hidden_layers"] = layers
    if hidden:
        cfg["hidden_size"] = hidden
        if preset["family"] == "mamba2":
            cfg["num_heads"] = 2 * hidden // cfg["head_dim"]
        else:
            cfg["time_step_rank"] = max(1, hidden // 16)
    return (MambaConfig if preset["family"] == "mamba" else Mamba2Config)(**cfg)


def build_hf(preset: dict[str, Any], dtype: torch.dtype, seed: int = 0, **shape: Any) -> torch.nn.Module:
    from transformers import Mamba2ForCausalLM, MambaForCausalLM

    cls = MambaForCausalLM if preset["family"] == "mamba" else Mamba2ForCausalLM
    torch.manual_seed(seed)
    with torch.device(DEVICE):
        model = cls._from_config(hf_config(preset, **shape), dtype=dtype)
    return model.eval()


def build_mamba_ssm(preset: dict[str, Any], dtype: torch.dtype) -> torch.nn.Module:
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    c = preset["config"]
    if preset["family"] == "mamba":
        ssm_cfg = {"layer": "Mamba1", "d_state": c["state_size"], "d_conv": c["conv_kernel"], "expand": c["expand"]}
    else:
        ssm_cfg = {"layer": "Mamba2", "d_state": c["state_size"], "d_conv": c["conv_kernel"], "expand": c["expand"],
                   "headdim": c["head_dim"], "ngroups": c["n_groups"], "chunk_size": c["chunk_size"]}
    cfg = MambaConfig(d_model=c["hidden_size"], n_layer=c["num_hidden_layers"], vocab_size=c["vocab_size"],
                      ssm_cfg=ssm_cfg, rms_norm=True, residual_in_fp32=True, fused_add_norm=True,
                      pad_vocab_size_multiple=8, tie_embeddings=True)
    torch.manual_seed(0)
    return MambaLMHeadModel(cfg, device=DEVICE, dtype=dtype).eval()


# ------------------------------------------------------------------------------------ measurements
@torch.no_grad()
def forward_ce_rate(model: torch.nn.Module, batch: int, length: int, vocab: int, repeats: int, hf: bool) -> dict[str, Any]:
    ids = torch.randint(0, vocab, (batch, length), device=DEVICE)
    kwargs = {"use_cache": False} if hf else {}

    def run() -> None:
        logits = model(ids, **kwargs).logits
        F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    times = timed(run, warmup=1, repeats=repeats)
    return {"tok_s": batch * length / statistics.median(times), "times_s": times}


def _hf_generate(model: torch.nn.Module, prompt: torch.Tensor, n: int) -> torch.Tensor:
    return model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                          min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None)


@torch.no_grad()
def decode_rate(model: torch.nn.Module, batch: int, n: int, vocab: int, repeats: int, stack: str) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, vocab, (batch, PROMPT), generator=gen).to(DEVICE)
    if stack == "mamba_ssm":
        def run() -> None:
            model.generate(prompt, max_length=PROMPT + n, cg=True, top_k=1)
    else:
        def run() -> None:
            _hf_generate(model, prompt, n)
    times = timed(run, warmup=1, repeats=repeats)
    return {"tok_s": batch * n / statistics.median(times), "times_s": times, "new_tokens": n}


def set_stack(model: torch.nn.Module, stack: str) -> None:
    if stack == "transformers":
        disable_fast_path(model)
    else:
        enable_fast_path(model)


# ------------------------------------------------------------------------------------ sections
def correctness(presets: dict[str, dict[str, Any]], make_plan: Callable[..., Any], out: dict[str, Any]) -> None:
    """Fused vs eager logits (full shapes, fp32 and bf16, with bf16's own distance from fp32 as the noise
    floor) and greedy tokens of the graph paths vs eager decode (fp32, 8 x 1024 models)."""
    res = out.setdefault("correctness", {})
    for name, preset in presets.items():
        model = build_hf(preset, torch.float32)
        ids = torch.randint(0, hf_config(preset).vocab_size, (2, min(512, SEQ)), device=DEVICE)
        variants: list[tuple[str, torch.nn.Module]] = [("base", model),
                                                       ("22 SSMs removed", hf_shedder.prune(model, make_plan(model, "ssm", 22)).model)]
        for label, m in variants:
            logits = {}
            for dtype in (torch.float32, torch.bfloat16):
                m.to(dtype)
                with torch.no_grad():
                    disable_fast_path(m)
                    logits[f"eager {dtype}"] = m(ids, use_cache=False).logits.float()
                    enable_fast_path(m)
                    logits[f"fused {dtype}"] = m(ids, use_cache=False).logits.float()
            ref = logits["eager torch.float32"]
            entry = {"max_abs_logit_fp32": ref.abs().max().item()}
            for key in ("fused torch.float32", "eager torch.bfloat16", "fused torch.bfloat16"):
                entry[f"{key} vs eager fp32: max_abs_delta"] = (logits[key] - ref).abs().max().item()
                entry[f"{key} vs eager fp32: argmax_agreement"] = (logits[key].argmax(-1) == ref.argmax(-1)).float().mean().item()
            entry["fused bf16 vs eager bf16: max_abs_delta"] = (
                logits["fused torch.bfloat16"] - logits["eager torch.bfloat16"]).abs().max().item()
            res[f"{name} / {label} / logits"] = entry
            print(f"[correctness] {name} {label}: {entry}", flush=True)
        del variants, model
        gc.collect()
        torch.cuda.empty_cache()

        small = build_hf(preset, torch.float32, layers=8, hidden=1024)
        for label, m in [("base", small), ("4 SSMs removed", hf_shedder.prune(small, make_plan(small, "ssm", 32)).model),
                         ("2 blocks removed", hf_shedder.prune(small, make_plan(small, "block", 16)).model)]:
            for batch in (1, 4):
                prompt = torch.randint(0, hf_config(preset).vocab_size, (batch, PROMPT), device=DEVICE)
                with torch.no_grad():
                    disable_fast_path(m)
                    eager = _hf_generate(m, prompt, 64)
                    enable_fast_path(m)
                    greedy_graph = _hf_generate(m, prompt, 64)  # plain greedy: one graph per token, choice included
                    step_graph = m.generate(  # a dict output: Transformers' loop, the step replayed
                        input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=64, min_new_tokens=64,
                        do_sample=False, pad_token_id=0, eos_token_id=None, return_dict_in_generate=True).sequences
                    dec = graph_decoder_of(m)
                key = f"{name} 8x1024 fp32 / {label} / batch {batch}"
                res[key] = {"greedy_graph_tokens_equal_eager": bool(torch.equal(eager, greedy_graph)),
                            "step_graph_tokens_equal_eager": bool(torch.equal(eager, step_graph)),
                            "first_mismatch": _first_mismatch(eager, greedy_graph),
                            "step_graph_replays": dec.replays if dec else 0}
                print(f"[correctness] {key}: {res[key]}", flush=True)
        del small
        gc.collect()
        torch.cuda.empty_cache()


def _first_mismatch(a: torch.Tensor, b: torch.Tensor) -> int | None:
    if a.shape != b.shape:
        return -1
    diff = (a != b).any(0).nonzero()
    return None if diff.numel() == 0 else int(diff[0])


def _rates(model: torch.nn.Module, stack: str, label: str, vocab: int, decode_tokens: int, decode_repeats: int,
           repeats: int, entry: dict[str, Any]) -> None:
    """Forward + CE (batch 8 and 2) and decode (batch 1 and 16) of one stack, into ``entry``."""
    for batch in (8, 2):
        entry[f"forward_ce_b{batch}"] = forward_ce_rate(model, batch, SEQ, vocab, repeats, hf=stack != "mamba_ssm")
        print(f"{label} {stack} fwd+CE b{batch}: {entry[f'forward_ce_b{batch}']['tok_s']:,.0f} tok/s", flush=True)
    for batch in (1, 16):
        entry[f"decode_b{batch}"] = decode_rate(model, batch, decode_tokens, vocab, decode_repeats, stack)
        print(f"{label} {stack} decode b{batch}: {entry[f'decode_b{batch}']['tok_s']:,.1f} tok/s", flush=True)


def stacks(presets: dict[str, dict[str, Any]], args: Any, out: dict[str, Any], save: Callable[[], None],
           section: str = "stacks", hf_stacks: tuple[str, ...] = ("hf_shedder", "transformers")) -> None:
    """Forward+CE and decode of the Transformers-model stacks and of mamba-ssm, one shape after the other:
    every number has mamba-ssm's beside it from the same run (``fast``: hf_shedder and mamba-ssm only)."""
    res = out.setdefault(section, {})
    for name, preset in presets.items():
        vocab = hf_config(preset).vocab_size
        entry = res.setdefault(name, {})
        model = build_hf(preset, torch.bfloat16)
        for stack in hf_stacks:
            set_stack(model, stack)
            eager = stack == "transformers"  # about 17 tok/s at batch 1: fewer tokens, one run
            _rates(model, stack, f"[{section}] {name}", vocab, args.eager_decode_tokens if eager else args.decode_tokens,
                   1 if eager else args.repeats, args.repeats, entry.setdefault(stack, {}))
            save()
        del model
        gc.collect()
        torch.cuda.empty_cache()
        try:
            ref = build_mamba_ssm(preset, torch.float16)
            _rates(ref, "mamba_ssm", f"[{section}] {name}", vocab, args.decode_tokens, args.repeats, args.repeats,
                   entry.setdefault("mamba_ssm", {"dtype": "float16"}))
            del ref
        except Exception as ex:  # keep the rest of the run
            entry["mamba_ssm_error"] = repr(ex)
            print(f"[{section}] mamba_ssm failed: {ex!r}", flush=True)
        gc.collect()
        torch.cuda.empty_cache()
        save()


PRUNED_POINTS = {
    "mamba-2.8b": [("14 blocks", "block", 14), ("25% blocks", "block", 16), ("50% blocks", "block", 32)],
    "mamba2-2.7b": [("22 SSMs", "ssm", 22), ("25% blocks", "block", 16), ("50% blocks", "block", 32)],
}


def pruned_ratios(presets: dict[str, dict[str, Any]], make_plan: Callable[..., Any], args: Any, out: dict[str, Any],
                  save: Callable[[], None], deadline: float) -> None:
    """Pruned / base speed-ups on the fast path: alternating pairs, median and spread of the ratios."""
    res = out.setdefault("pruned", {})
    for name, preset in presets.items():
        vocab = hf_config(preset).vocab_size
        base = build_hf(preset, torch.bfloat16)
        enable_fast_path(base)
        n_layers = hf_config(preset).num_hidden_layers
        for label, kind, count in PRUNED_POINTS[name]:
            if time.time() > deadline:
                res.setdefault("skipped", []).append(f"{name} {label}")
                continue
            plan = make_plan(base, kind, count)
            pruned = hf_shedder.prune(base, plan).model
            point: dict[str, Any] = {"layer_ratio": n_layers / (n_layers - len(plan)) if kind == "block" else None,
                                     "units_removed": len(plan)}
            for metric, batch in (("decode_b1", 1), ("decode_b16", 16), ("prefill_b8", 8)):
                if metric.startswith("decode"):
                    def measure(m: torch.nn.Module, b: int = batch, vocab: int = vocab) -> float:
                        return decode_rate(m, b, args.decode_tokens, vocab, 1, "hf_shedder")["tok_s"]
                else:
                    def measure(m: torch.nn.Module, b: int = batch, vocab: int = vocab) -> float:
                        ids = torch.randint(0, vocab, (b, SEQ), device=DEVICE)
                        t = timed(lambda: m(ids, use_cache=False, logits_to_keep=1), warmup=0, repeats=1)[0]
                        return b * SEQ / t
                measure(base)  # warm-up (graph capture, autotune) of both
                measure(pruned)
                ratios, base_rates, pruned_rates = [], [], []
                for _ in range(args.runs):
                    rb, rp = measure(base), measure(pruned)
                    base_rates.append(rb)
                    pruned_rates.append(rp)
                    ratios.append(rp / rb)
                point[metric] = {"ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
                                 "ratio_max": max(ratios), "base_tok_s": base_rates, "pruned_tok_s": pruned_rates}
                print(f"[pruned] {name} {label} {metric}: ratio {statistics.median(ratios):.3f} "
                      f"[{min(ratios):.3f}, {max(ratios):.3f}] (layer ratio {point['layer_ratio']})", flush=True)
            res.setdefault(name, {})[label] = point
            del pruned
            gc.collect()
            torch.cuda.empty_cache()
            save()
        del base
        gc.collect()
        torch.cuda.empty_cache()


def run(presets: dict[str, dict[str, Any]], make_plan: Callable[..., Any], args: Any, meta: dict[str, Any]) -> int:
    global DEVICE, SEQ
    if args.quick:
        DEVICE, SEQ = "cpu", 64
    elif not torch.cuda.is_available():
        print("bench_speed --stacks needs a CUDA GPU (--quick: a CPU smoke test of the script)")
        return 2
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"meta": meta, "kernels": get_kernels() is not None}
    path = out_dir / "stacks_results.json"

    def save() -> None:
        path.write_text(json.dumps(out, indent=1, default=str))

    if get_kernels() is None and not args.allow_slow and not args.quick:
        print("mamba-ssm / causal-conv1d not importable: the fast path would fall back (use --allow-slow)")
        return 2
    deadline = time.time() + (args.budget_s or 1e9)
    sections = args.sections.split(",")
    for section in sections:
        if time.time() > deadline:
            out.setdefault("skipped_sections", []).append(section)
            continue
        t0 = time.time()
        try:
            if section == "correctness":
                correctness(presets, make_plan, out)
            elif section == "stacks":
                stacks(presets, args, out, save)
            elif section == "pruned":
                pruned_ratios(presets, make_plan, args, out, save, deadline)
            elif section == "fast":  # hf_shedder's fast path beside mamba-ssm, without Transformers' slow eager
                stacks(presets, args, out, save, section="fast", hf_stacks=("hf_shedder",))
            else:
                raise ValueError(f"unknown section {section!r}")
        except Exception as ex:
            import traceback

            traceback.print_exc()
            out.setdefault("errors", {})[section] = repr(ex)
        out.setdefault("section_seconds", {})[section] = time.time() - t0
        save()
    print(json.dumps(out.get("section_seconds"), indent=1))
    return 0
