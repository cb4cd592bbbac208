"""``hf-shedder bench DIR [--base M]``: prefill/decode speed and memory, pruned beside base."""

from __future__ import annotations

import argparse
import json
import os

from ..errors import ShedderError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", help="pruned model directory")
    p.add_argument("--base", default=None,
                   help="base model (directory or hub name); default: the base named in the pruned model's provenance")
    p.add_argument("--batch-size", type=int, default=1, help="prefill batch size")
    p.add_argument("--prefill-len", type=int, default=2048)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--decode-batch-sizes", default="1,16")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--out", default=None, help="where to write speed_results.json (default: the model folder)")


def _base_name(model_dir: str) -> str | None:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return ((json.load(f).get("provenance") or {}).get("base_model")) or None


def run(args: argparse.Namespace) -> int:
    import torch

    from ..evaluation.speed import compare_speed
    from ..loading import count_parameters, load_model, parse_dtype

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = parse_dtype(args.dtype) or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    base_name = args.base or _base_name(args.model_dir)
    if not base_name:
        raise ShedderError(f"no base model to compare with: pass --base (the provenance in {args.model_dir} names none)")
    try:
        decode_bs = tuple(int(x) for x in args.decode_batch_sizes.split(",") if x.strip())
    except ValueError:
        raise ShedderError(f"--decode-batch-sizes must be integers like 1,16, got {args.decode_batch_sizes!r}") from None
    kwargs = dict(batch_size=args.batch_size, prefill_len=args.prefill_len, decode_tokens=args.decode_tokens,
                  decode_batch_sizes=decode_bs, warmup=args.warmup, repeats=args.repeats, device=device)
    from ..evaluation.speed import benchmark_speed

    # one model in memory at a time, so the peak-memory numbers do not include the other model
    base = load_model(base_name, dtype=dtype, device=device)
    base_res = benchmark_speed(base, **kwargs)
    n_base = count_parameters(base)
    del base
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    pruned = load_model(args.model_dir, dtype=dtype, device=device)
    pruned_res = benchmark_speed(pruned, **kwargs)
    cmp = compare_speed(base_res, pruned_res, ideal_ratio=n_base / count_parameters(pruned),
                        ideal_label="ideal speed-up (parameter ratio base/pruned)")
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
