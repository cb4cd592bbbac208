"""Prefill / decode throughput and peak memory of a causal LM, and a base-vs-pruned comparison.

Timing: CUDA events + synchronize on GPU, ``time.perf_counter`` on CPU; warm-up runs are
discarded and the median of the timed repeats is reported. Decode speed is isolated from the
prompt: it is ``(generate N tokens) - (generate 1 token)`` with a fixed length
(``min_new_tokens = max_new_tokens``, greedy, KV/SSM cache on).
Speed claims belong in benchmarks run on the GPU, not in unit tests.
"""

from __future__ import annotations

import inspect
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from hf_shedder.errors import ShedderError


@dataclass
class SpeedResult:
    device: str
    dtype: str
    n_params: int
    batch_size: int
    prefill_len: int
    prefill_seconds: float
    prefill_tokens_per_s: float
    decode_tokens: int
    decode_tokens_per_s: dict[int, float]  # batch size -> generated tokens per second (absent: not measurable)
    peak_memory_bytes: int | None
    memory_kind: str  # "cuda_max_allocated" or "cpu_peak_rss_increase"
    warmup: int
    repeats: int
    decode_batch_sizes: tuple[int, ...] = ()  # requested (a size missing from decode_tokens_per_s was unmeasurable)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["decode_tokens_per_s"] = {str(k): v for k, v in self.decode_tokens_per_s.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SpeedResult:
        d = dict(d)
        d["decode_tokens_per_s"] = {int(k): float(v) for k, v in d.get("decode_tokens_per_s", {}).items()}
        d["decode_batch_sizes"] = tuple(d.get("decode_batch_sizes", ()))
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def _device_of(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _time_it(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of ``fn`` in seconds after ``warmup`` discarded calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1000.0)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _peak_rss_bytes() -> int | None:
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(kb) * (1 if os.uname().sysname == "Darwin" else 1024)


@torch.no_grad()
def benchmark_speed(
    model: torch.nn.Module,
    batch_size: int = 1,
    prefill_len: int = 512,
    decode_tokens: int = 64,
    decode_batch_sizes: tuple[int, ...] = (1, 16),
    warmup: int = 1,
    repeats: int = 3,
    device: torch.device | str | None = None,
    decode_prompt_len: int = 16,
    seed: int = 0,
) -> SpeedResult:
    """Prefill tokens/s (one forward over ``batch_size x prefill_len``), decode tokens/s per batch
    size and peak memory. Inputs are random token ids (speed does not depend on the text)."""
    if min(batch_size, prefill_len, decode_tokens, repeats) < 1 or warmup < 0:
        raise ShedderError("batch_size, prefill_len, decode_tokens and repeats must be >= 1 (warmup >= 0)")
    device = torch.device(device) if device is not None else _device_of(model)
    model = model.to(device).eval()
    vocab = model.get_input_embeddings().num_embeddings
    gen = torch.Generator().manual_seed(seed)
    n_params = sum(p.numel() for p in model.parameters())

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base_mem = torch.cuda.memory_allocated(device)
    rss_before = _peak_rss_bytes()

    prefill_ids = torch.randint(0, vocab, (batch_size, prefill_len), generator=gen).to(device)
    fwd_kwargs: dict[str, Any] = {"use_cache": False}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        fwd_kwargs["logits_to_keep"] = 1  # prefill only needs the last position's logits
    prefill_s = _time_it(lambda: model(input_ids=prefill_ids, **fwd_kwargs), device, warmup, repeats)

    pad_id = getattr(model.generation_config, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(model.generation_config, "eos_token_id", None) or 0
    decode: dict[int, float] = {}
    for bs in decode_batch_sizes:
        prompt = torch.randint(0, vocab, (bs, decode_prompt_len), generator=gen).to(device)
        mask = torch.ones_like(prompt)

        def generate(n: int, prompt=prompt, mask=mask) -> None:
            model.generate(
                input_ids=prompt,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                use_cache=True,
                pad_token_id=pad_id,
                eos_token_id=None,
            )

        t_one = _time_it(lambda: generate(1), device, warmup, repeats)
        t_all = _time_it(lambda: generate(decode_tokens), device, warmup, repeats)
        if decode_tokens == 1:
            decode[bs] = bs / t_all
        elif t_all > t_one:
            decode[bs] = bs * (decode_tokens - 1) / (t_all - t_one)
        # else: timing noise swamped the decode steps; leave it unmeasured rather than report nonsense

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak, kind = int(torch.cuda.max_memory_allocated(device) - base_mem), "cuda_max_allocated"
    else:
        rss_after = _peak_rss_bytes()
        peak = None if rss_before is None or rss_after is None else max(rss_after - rss_before, 0)
        kind = "cpu_peak_rss_increase"
    return SpeedResult(
        device=str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
        n_params=n_params,
        batch_size=batch_size,
        prefill_len=prefill_len,
        prefill_seconds=prefill_s,
        prefill_tokens_per_s=batch_size * prefill_len / prefill_s,
        decode_tokens=decode_tokens,
        decode_tokens_per_s=decode,
        peak_memory_bytes=peak,
        memory_kind=kind,
        warmup=warmup,
        repeats=repeats,
        decode_batch_sizes=tuple(decode_batch_sizes),
    )


@dataclass
class SpeedComparison:
    base: SpeedResult
    pruned: SpeedResult
    ideal_ratio: float | None = None
    ideal_label: str = "ideal"

    @property
    def prefill_speedup(self) -> float:
        return self.pruned.prefill_tokens_per_s / self.base.prefill_tokens_per_s

    def decode_speedup(self, bs: int) -> float | None:
        b, p = self.base.decode_tokens_per_s.get(bs), self.pruned.decode_tokens_per_s.get(bs)
        return None if not b or not p else p / b

    def rows(self) -> list[tuple[str, str, str, str]]:
        """(metric, base, pruned, measured ratio) for the table."""
        rows = [
            (
                f"prefill tokens/s (batch {self.base.batch_size} x {self.base.prefill_len})",
                f"{self.base.prefill_tokens_per_s:,.0f}",
                f"{self.pruned.prefill_tokens_per_s:,.0f}",
                f"{self.prefill_speedup:.2f}x",
            )
        ]
        sizes = set(self.base.decode_tokens_per_s) | set(self.pruned.decode_tokens_per_s)
        for bs in sorted(sizes | set(self.base.decode_batch_sizes) | set(self.pruned.decode_batch_sizes)):
            b, p, r = self.base.decode_tokens_per_s.get(bs), self.pruned.decode_tokens_per_s.get(bs), self.decode_speedup(bs)
            rows.append(
                (
                    f"decode tokens/s (batch {bs}, {self.base.decode_tokens} new)",
                    "not measured" if b is None else f"{b:,.1f}",
                    "not measured" if p is None else f"{p:,.1f}",
                    "n/a" if r is None else f"{r:.2f}x",
                )
            )
        mem_b, mem_p = self.base.peak_memory_bytes, self.pruned.peak_memory_bytes
        rows.append(
            (
                f"peak memory MiB ({self.base.memory_kind})",
                "not measured" if mem_b is None else f"{mem_b / 2**20:,.1f}",
                "not measured" if mem_p is None else f"{mem_p / 2**20:,.1f}",
                # a CPU RSS high-water mark is per process: only the first model measured is meaningful
                "n/a" if not mem_b or mem_p is None or self.base.memory_kind != "cuda_max_allocated"
                else f"{mem_p / mem_b:.2f}x",
            )
        )
        rows.append(("parameters", f"{self.base.n_params:,}", f"{self.pruned.n_params:,}",
                     f"{self.pruned.n_params / self.base.n_params:.3f}x"))
        return rows

    def to_markdown(self) -> str:
        lines = [
            f"Device: {self.pruned.device} ({self.pruned.dtype}); median of {self.pruned.repeats} runs "
            f"after {self.pruned.warmup} warm-up",
            "",
            "| metric | base | pruned | measured speed-up |",
            "|---|---:|---:|---:|",
        ]
        lines += [f"| {m} | {b} | {p} | {r} |" for m, b, p, r in self.rows()]
        if self.ideal_ratio is not None:
            lines += ["", f"{self.ideal_label}: {self.ideal_ratio:.2f}x"]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.pruned.device,
            "base": self.base.to_dict(),
            "pruned": self.pruned.to_dict(),
            "prefill_speedup": self.prefill_speedup,
            "decode_speedup": {str(bs): self.decode_speedup(bs) for bs in self.pruned.decode_batch_sizes},
            "ideal_ratio": self.ideal_ratio,
            "ideal_label": self.ideal_label,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SpeedComparison:
        return cls(
            SpeedResult.from_dict(d["base"]),
            SpeedResult.from_dict(d["pruned"]),
            d.get("ideal_ratio"),
            d.get("ideal_label", "ideal"),
        )


def compare_speed(
    base: torch.nn.Module | SpeedResult,
    pruned: torch.nn.Module | SpeedResult,
    ideal_ratio: float | None = None,
    ideal_label: str = "ideal speed-up",
    **bench_kwargs: Any,
) -> SpeedComparison:
    """Benchmark both models with the same settings (or take given results) and compare them."""
    results = [m if isinstance(m, SpeedResult) else benchmark_speed(m, **bench_kwargs) for m in (base, pruned)]
    return SpeedComparison(results[0], results[1], ideal_ratio=ideal_ratio, ideal_label=ideal_label)
