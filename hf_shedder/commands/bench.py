"""``hf-shedder bench DIR [--base M]``: prefill/decode speed and memory, pruned beside base."""

from __future__ import annotations

import argparse
import json
import os
from typing import TYPE_CHECKING

from ..errors import ShedderError

if TYPE_CHECKING:
    from ..evaluation.speed import SpeedResult


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", help="pruned model directory")
    p.add_argument("--base", default=None,
                   help="base model (directory or hub name); default: the base named in the pruned model's provenance")
    p.add_argument("--batch-size", type=int, default=1, help="prefill batch size")
    p.add_argument("--prefill-len", type=int, default=2048)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--decode-batch-sizes", default="1,16")
    p.add_argument("--warmup", type=int, default=2, help="discarded runs per measurement (each model in its own process)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (the median is reported)")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--out", default=None, help="where to write speed_results.json (default: the model folder)")
    p.add_argument("--no-progress", action="store_true")


def _base_name(model_dir: str) -> str | None:
    from ..records import folder_provenance

    return folder_provenance(model_dir).get("base_model") or None if os.path.isdir(model_dir) else None


def ideal_speedup(model_dir: str, base: SpeedResult, pruned: SpeedResult) -> tuple[float, str]:
    """The ideal speed-up to print beside the measured one, and what it is.

    Whole blocks removed: the layer ratio (layers counted by the family adapter in each benchmark process).
    Anything else (SSMs, heads, channels, ...): the parameter ratio, a rough proxy only; the FLOP ideal that
    benchmarks/bench_speed.py computes for SSM plans is not computed here.
    """
    from ..records import folder_plan

    plan = folder_plan(model_dir) if os.path.isdir(model_dir) else None
    lb, lp = base.extra.get("num_layers"), pruned.extra.get("num_layers")
    if plan is not None and plan.kinds() == {"block"} and lb and lp:
        return lb / lp, f"ideal speed-up (layer ratio {lb}/{lp}: the plan removes whole blocks)"
    why = "no pruning plan found" if plan is None else f"the plan removes {plan.summary()}, not only whole blocks"
    return (base.n_params / pruned.n_params,
            f"ideal speed-up (parameter ratio base/pruned, a rough proxy: {why}; FLOP ideal not computed)")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..evaluation.speed import benchmark_pair_in_subprocesses, compare_speed
    from ..loading import parse_dtype

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    try:
        parse_dtype(dtype)
    except ValueError as e:
        raise ShedderError(str(e)) from None
    base_name = args.base or _base_name(args.model_dir)
    if not base_name:
        raise ShedderError(f"no base model to compare with: pass --base (the provenance in {args.model_dir} names none)")
    try:
        decode_bs = tuple(int(x) for x in args.decode_batch_sizes.split(",") if x.strip())
    except ValueError:
        raise ShedderError(f"--decode-batch-sizes must be integers like 1,16, got {args.decode_batch_sizes!r}") from None
    kwargs = dict(batch_size=args.batch_size, prefill_len=args.prefill_len, decode_tokens=args.decode_tokens,
                  decode_batch_sizes=decode_bs, warmup=args.warmup, repeats=args.repeats)
    # Each model in a fresh process, taking turns: in one process the first model pays the one-time costs
    # (first calls, allocator growth) and the next reuses memory it freed, which flatters the second.
    base_res, pruned_res = benchmark_pair_in_subprocesses(base_name, args.model_dir, dtype=dtype, device=device,
                                                          progress=not args.no_progress, **kwargs)
    ratio, label = ideal_speedup(args.model_dir, base_res, pruned_res)
    cmp = compare_speed(base_res, pruned_res, ideal_ratio=ratio, ideal_label=label)
    print(cmp.to_markdown())
    out = args.out or args.model_dir
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "speed_results.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({**cmp.to_dict(), "base_model": base_name}, f, indent=2)
    os.replace(tmp, path)
    print(f"\nwrote {path}")
    return 0
