"""Prefill / decode throughput and peak memory of a causal LM, and a base-vs-pruned comparison.

Timing: CUDA events + synchronize on GPU, ``time.perf_counter`` on CPU; warm-up runs are
discarded and the median of the timed repeats is reported. Decode speed is isolated from the
prompt: it is ``(generate N tokens) - (generate 1 token)`` with a fixed length
(``min_new_tokens = max_new_tokens``, greedy, KV/SSM cache on).

Peak memory is what the benchmark adds on top of the loaded model: ``torch.cuda.max_memory_allocated``
after a reset on GPU; on CPU (Linux) the resident-set high-water mark, reset to the current RSS before
the runs. Within one process the first model measured pays the process's one-time costs and later
models reuse memory it freed, so :func:`benchmark_pair_in_subprocesses` (``hf-shedder bench``) measures
each model in a fresh process. Speed claims belong in benchmarks run on the GPU, not in unit tests.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

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
    # "cuda_max_allocated" (over the loaded model), "cpu_peak_rss_over_loaded" (RSS high-water mark reset
    # before the runs) or "cpu_peak_rss_increase" (no reset possible: includes earlier peaks of the process)
    memory_kind: str
    warmup: int
    repeats: int
    decode_batch_sizes: tuple[int, ...] = ()  # requested (a size missing from decode_tokens_per_s was unmeasurable)
    extra: dict[str, Any] = field(default_factory=dict)  # "fresh_process": measured alone in its own process

    @property
    def fresh_process(self) -> bool:
        return bool(self.extra.get("fresh_process"))

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


def _time_once(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall time of one call of ``fn`` in seconds (CUDA events on GPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000.0
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _time_it(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of ``fn`` in seconds after ``warmup`` discarded calls."""
    for _ in range(warmup):
        fn()
    return statistics.median(_time_once(fn, device) for _ in range(repeats))


def _peak_rss_bytes() -> int | None:
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(kb) * (1 if os.uname().sysname == "Darwin" else 1024)


def _proc_status_kb(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field_name}:\s+(\d+) kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _reset_peak_rss() -> int | None:
    """Reset this process's RSS high-water mark to its current RSS (Linux >= 4.0); that RSS in bytes,
    or None where the mark cannot be reset."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    rss = _proc_status_kb("VmRSS")
    return None if rss is None else rss * 1024


class _MemoryPeak:
    """Peak memory that the code run between construction and :meth:`read` adds over the loaded model."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.start = torch.cuda.memory_allocated(device)
        else:
            self.loaded_rss = _reset_peak_rss()
            self.rss_before = _peak_rss_bytes() if self.loaded_rss is None else None

    def read(self) -> tuple[int | None, str]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device) - self.start), "cuda_max_allocated"
        hwm = _proc_status_kb("VmHWM") if self.loaded_rss is not None else None
        if hwm is not None:
            return max(hwm * 1024 - self.loaded_rss, 0), "cpu_peak_rss_over_loaded"
        rss_after = _peak_rss_bytes()
        peak = None if self.rss_before is None or rss_after is None else max(rss_after - self.rss_before, 0)
        return peak, "cpu_peak_rss_increase"


def _check_settings(batch_size: int, prefill_len: int, decode_tokens: int, repeats: int, warmup: int) -> None:
    if min(batch_size, prefill_len, decode_tokens, repeats) < 1 or warmup < 0:
        raise ShedderError("batch_size, prefill_len, decode_tokens and repeats must be >= 1 (warmup >= 0)")


def prepare_measurements(
    model: torch.nn.Module,
    device: torch.device,
    batch_size: int = 1,
    prefill_len: int = 512,
    decode_tokens: int = 64,
    decode_batch_sizes: tuple[int, ...] = (1, 16),
    decode_prompt_len: int = 16,
    seed: int = 0,
) -> dict[str, Callable[[], Any]]:
    """The calls whose times :func:`benchmark_speed` measures, by name: ``prefill`` and, per decode batch
    size ``b``, ``decode_1_b`` (generate 1 token) and ``decode_n_b`` (generate ``decode_tokens``)."""
    vocab = model.get_input_embeddings().num_embeddings
    gen = torch.Generator().manual_seed(seed)
    prefill_ids = torch.randint(0, vocab, (batch_size, prefill_len), generator=gen).to(device)
    fwd_kwargs: dict[str, Any] = {"use_cache": False}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        fwd_kwargs["logits_to_keep"] = 1  # prefill only needs the last position's logits

    @torch.no_grad()
    def prefill() -> None:
        model(input_ids=prefill_ids, **fwd_kwargs)

    calls: dict[str, Callable[[], Any]] = {"prefill": prefill}
    pad_id = getattr(model.generation_config, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(model.generation_config, "eos_token_id", None) or 0
    for bs in decode_batch_sizes:
        prompt = torch.randint(0, vocab, (bs, decode_prompt_len), generator=gen).to(device)
        mask = torch.ones_like(prompt)

        @torch.no_grad()
        def generate(n: int, prompt: torch.Tensor = prompt, mask: torch.Tensor = mask) -> None:
            model.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, use_cache=True, pad_token_id=pad_id, eos_token_id=None)

        calls[f"decode_1_{bs}"] = lambda g=generate: g(1)
        calls[f"decode_n_{bs}"] = lambda g=generate: g(decode_tokens)
        decoder = _graph_decoder(model)
        if decoder is not None and device.type == "cuda":  # the same decode with CUDA graphs off, for comparison
            calls[f"decode_1_{bs}{EAGER}"] = lambda g=generate, d=decoder: _without_graphs(d, lambda: g(1))
            calls[f"decode_n_{bs}{EAGER}"] = lambda g=generate, d=decoder: _without_graphs(d, lambda: g(decode_tokens))
    return calls


EAGER = "_eager"  # suffix of the decode calls timed with CUDA-graph decode switched off


def _graph_decoder(model: torch.nn.Module) -> Any:
    from hf_shedder.modeling import PrunedMambaForCausalLM
    from hf_shedder.runtime import graph_decoder_of

    return graph_decoder_of(model.model if isinstance(model, PrunedMambaForCausalLM) else model)


def _without_graphs(decoder: Any, fn: Callable[[], Any]) -> Any:
    enabled, decoder.enabled = decoder.enabled, False
    try:
        return fn()
    finally:
        decoder.enabled = enabled


def _eager_decode_extra(times: dict[str, float], decode_tokens: int, decode_batch_sizes: tuple[int, ...]) -> dict[str, Any]:
    """``extra`` entry with eager decode rates, when the CUDA-graph decode was also timed without graphs."""
    if not all(f"decode_n_{bs}{EAGER}" in times for bs in decode_batch_sizes):
        return {}
    eager = {k[: -len(EAGER)]: v for k, v in times.items() if k.endswith(EAGER)}
    rates = _decode_rates(eager, decode_tokens, decode_batch_sizes)
    return {"decode_tokens_per_s_eager": {str(k): v for k, v in rates.items()}}


def _decode_rates(times: dict[str, float], decode_tokens: int, decode_batch_sizes: tuple[int, ...]) -> dict[int, float]:
    """Generated tokens/s per batch size from the median times of ``decode_1_b`` and ``decode_n_b``."""
    decode: dict[int, float] = {}
    for bs in decode_batch_sizes:
        t_one, t_all = times[f"decode_1_{bs}"], times[f"decode_n_{bs}"]
        if decode_tokens == 1:
            decode[bs] = bs / t_all
        elif t_all > t_one:
            decode[bs] = bs * (decode_tokens - 1) / (t_all - t_one)
        # else: timing noise swamped the decode steps; leave it unmeasured rather than report nonsense
    return decode


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
    size and peak memory, in this process. Inputs are random token ids (speed does not depend on the text)."""
    _check_settings(batch_size, prefill_len, decode_tokens, repeats, warmup)
    device = torch.device(device) if device is not None else _device_of(model)
    model = model.to(device).eval()
    settings = dict(batch_size=batch_size, prefill_len=prefill_len, decode_tokens=decode_tokens,
                    decode_batch_sizes=tuple(decode_batch_sizes), decode_prompt_len=decode_prompt_len, seed=seed)
    memory = _MemoryPeak(device)
    calls = prepare_measurements(model, device, **settings)
    times = {name: _time_it(fn, device, warmup, repeats) for name, fn in calls.items()}
    peak, kind = memory.read()
    return SpeedResult(
        device=str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
        n_params=sum(p.numel() for p in model.parameters()),
        batch_size=batch_size,
        prefill_len=prefill_len,
        prefill_seconds=times["prefill"],
        prefill_tokens_per_s=batch_size * prefill_len / times["prefill"],
        decode_tokens=decode_tokens,
        decode_tokens_per_s=_decode_rates(times, decode_tokens, tuple(decode_batch_sizes)),
        peak_memory_bytes=peak,
        memory_kind=kind,
        warmup=warmup,
        repeats=repeats,
        decode_batch_sizes=tuple(decode_batch_sizes),
        extra=_eager_decode_extra(times, decode_tokens, tuple(decode_batch_sizes)),
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
        eager_b = self.base.extra.get("decode_tokens_per_s_eager", {})
        eager_p = self.pruned.extra.get("decode_tokens_per_s_eager", {})
        for key in sorted(set(eager_b) & set(eager_p), key=int):
            b, p = eager_b[key], eager_p[key]
            rows.append((f"decode tokens/s (batch {key}, eager: CUDA graphs off)", f"{b:,.1f}", f"{p:,.1f}",
                         f"{p / b:.2f}x"))
        mem_b, mem_p = self.base.peak_memory_bytes, self.pruned.peak_memory_bytes
        # CPU RSS is per process: a ratio means something only when each model had a process of its own
        comparable = self.base.memory_kind == "cuda_max_allocated" or (
            self.base.memory_kind == "cpu_peak_rss_over_loaded" and self.base.fresh_process and self.pruned.fresh_process)
        rows.append(
            (
                f"peak memory MiB over the loaded model ({self.base.memory_kind})",
                "not measured" if mem_b is None else f"{mem_b / 2**20:,.1f}",
                "not measured" if mem_p is None else f"{mem_p / 2**20:,.1f}",
                "n/a" if not mem_b or mem_p is None or not comparable else f"{mem_p / mem_b:.2f}x",
            )
        )
        rows.append(("parameters", f"{self.base.n_params:,}", f"{self.pruned.n_params:,}",
                     f"{self.pruned.n_params / self.base.n_params:.3f}x"))
        return rows

    def to_markdown(self) -> str:
        alone = (", each model in a fresh process, taking turns" if self.base.fresh_process and self.pruned.fresh_process
                 else "")
        lines = [
            f"Device: {self.pruned.device} ({self.pruned.dtype}); median of {self.pruned.repeats} runs "
            f"after {self.pruned.warmup} warm-up{alone}",
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
    """Benchmark both models with the same settings (or take given results) and compare them.

    Models given as modules are measured one after the other in this process (base first), which favours
    the second on CPU; :func:`benchmark_pair_in_subprocesses` gives results for a fair comparison.
    """
    results = [m if isinstance(m, SpeedResult) else benchmark_speed(m, **bench_kwargs) for m in (base, pruned)]
    return SpeedComparison(results[0], results[1], ideal_ratio=ideal_ratio, ideal_label=ideal_label)


class _Worker:
    """A benchmark child process holding one loaded model (see ``bench_worker``); JSON lines both ways."""

    def __init__(self, model_path: str, spec: dict[str, Any], env: dict[str, str]) -> None:
        self.model_path = model_path
        self.stderr = tempfile.TemporaryFile(mode="w+")
        cmd = [sys.executable, "-m", "hf_shedder.evaluation.bench_worker", json.dumps({**spec, "model": model_path})]
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, text=True, bufsize=1)

    def ask(self, message: dict[str, Any] | None = None) -> dict[str, Any]:
        if message is not None:
            self.proc.stdin.write(json.dumps(message) + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        reply = json.loads(line) if line.strip() else None
        if reply is None or "error" in reply:
            self.proc.wait(timeout=60)
            self.stderr.seek(0)
            why = (reply or {}).get("error") or "\n".join(self.stderr.read().strip().splitlines()[-15:])
            raise ShedderError(f"benchmark of {self.model_path} failed in its process (exit {self.proc.poll()}): {why}")
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.stderr.close()


def benchmark_pair_in_subprocesses(
    base_path: str,
    pruned_path: str,
    dtype: str | None = None,
    device: str = "cpu",
    batch_size: int = 1,
    prefill_len: int = 512,
    decode_tokens: int = 64,
    decode_batch_sizes: tuple[int, ...] = (1, 16),
    warmup: int = 1,
    repeats: int = 3,
    decode_prompt_len: int = 16,
    seed: int = 0,
    progress: bool = False,
) -> tuple[SpeedResult, SpeedResult]:
    """Benchmark two models (folders or hub names), each loaded in a fresh Python process of its own.

    Fair where one process is not: each model pays its own one-time costs (first calls, allocator growth)
    and its peak memory is its own. The two processes take turns call by call (alternating which goes
    first), so a change in machine load during the run affects both alike; medians of ``repeats`` timed
    calls after ``warmup`` discarded ones, as :func:`benchmark_speed`. The children use as many torch
    threads as this process; ``extra`` of each result holds ``fresh_process`` and the model's
    ``num_layers`` (from its family adapter; None for families without one).
    """
    import hf_shedder

    _check_settings(batch_size, prefill_len, decode_tokens, repeats, warmup)
    settings = dict(batch_size=batch_size, prefill_len=prefill_len, decode_tokens=decode_tokens,
                    decode_batch_sizes=list(decode_batch_sizes), decode_prompt_len=decode_prompt_len, seed=seed)
    spec = {"dtype": dtype, "device": device, "threads": torch.get_num_threads(), "settings": settings}
    env = dict(os.environ)
    # the children import this very hf_shedder, installed or not
    root = os.path.dirname(os.path.dirname(os.path.abspath(hf_shedder.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    if progress:
        print(f"benchmark: loading {base_path} and {pruned_path}, one process each", flush=True)
    workers = [_Worker(base_path, spec, env), _Worker(pruned_path, spec, env)]
    bar = None
    try:
        ready = [w.ask() for w in workers]
        names = ready[0]["names"]
        times: list[dict[str, list[float]]] = [{n: [] for n in names}, {n: [] for n in names}]
        bar = tqdm(total=len(names) * (warmup + repeats) * 2, desc="benchmark runs (base, pruned)", disable=not progress)
        for name in names:
            bar.set_postfix_str(name)
            for i in range(warmup + repeats):
                order = (0, 1) if i % 2 == 0 else (1, 0)
                for k in order:
                    reply = workers[k].ask({"op": "run", "name": name})
                    bar.update()
                    if i >= warmup:
                        times[k][name].append(reply["seconds"])
        finals = [w.ask({"op": "finish"}) for w in workers]
    finally:
        if bar is not None:
            bar.close()
        for w in workers:
            w.close()
    results = []
    for k in (0, 1):
        med = {n: statistics.median(v) for n, v in times[k].items()}
        r = ready[k]
        results.append(SpeedResult(
            device=r["device"], dtype=r["dtype"], n_params=r["n_params"], batch_size=batch_size,
            prefill_len=prefill_len, prefill_seconds=med["prefill"],
            prefill_tokens_per_s=batch_size * prefill_len / med["prefill"], decode_tokens=decode_tokens,
            decode_tokens_per_s=_decode_rates(med, decode_tokens, tuple(decode_batch_sizes)),
            peak_memory_bytes=finals[k]["peak"], memory_kind=finals[k]["kind"], warmup=warmup, repeats=repeats,
            decode_batch_sizes=tuple(decode_batch_sizes), extra={"fresh_process": True, "num_layers": r["num_layers"],
                                                            **_eager_decode_extra(med, decode_tokens, tuple(decode_batch_sizes))},
        ))
    return results[0], results[1]
