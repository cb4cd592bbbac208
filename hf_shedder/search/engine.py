"""The greedy Mamba-Shedder search: reference semantics, accelerated evaluation, resumable journal.

At every step each remaining candidate unit is removed (masked) on top of the current plan and the
calibration perplexity is measured; the candidate with the lowest perplexity (first in candidate
order on ties) joins the plan. ``exact_reference=True`` measures each candidate with a full model
forward per batch, like the reference. The default runs, per batch, the current plan once layer by
layer, caching the hidden state entering each layer, and each candidate only from its own layer on.
By default candidates are raced on paired per-sample NLL differences (``racing.py``): after every
batch, a candidate leaves once a confidence bound shows it cannot be the step's best; the survivors
finish on all batches and the pick among them is exact. Every elimination and its bound is journaled.
Without racing (``race_delta=None``, the ``--exact`` search), exact early abandon: every per-sample NLL
is >= 0, so once a candidate's partial sum exceeds the total of a candidate already measured on all
batches (the *leader*, the previous step's runner-up), it cannot win and is dropped.

Work is organised in *rounds* of ``world_size`` calibration batches (one per process); results are
gathered and replayed in batch order, so one process and several make the same decisions and write
the same journal.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import get_adapter
from ..arch.base import ArchAdapter
from ..data import CalibrationSet
from ..distributed import Comm
from ..errors import DataError, SearchError
from ..loading import parse_dtype, skeleton_parameters
from ..runtime import fused_forward
from ..units import Plan, Unit
from . import racing
from .evaluator import BASE, Evaluator, unit_key
from .journal import JOURNAL_NAME, check_resumable, new_journal, read_journal, write_journal
from .reference_mode import reference_mean_ppl
from .settings import SearchSettings, identity, model_identity


def _is_terminal() -> bool:
    return sys.stderr.isatty()


def _resume_line(path: Path, journal: dict[str, Any]) -> str:
    """One line saying that (and where) a search resumes."""
    done = len(journal.get("steps") or [])
    part = journal.get("partial") or {}
    measured = sum((part.get("batches") or {}).values())
    extra = f", step {done + 1} partly measured ({measured} candidate batches)" if measured else ""
    return f"resuming the search in {path}: {done} step(s) done{extra}"


@dataclass
class SearchResult:
    """What a search found: the ordered plan, the trajectory and every candidate's perplexity."""

    plan: Plan
    trajectory: list[dict[str, Any]]
    steps: list[dict[str, Any]]
    counters: dict[str, Any]
    stop_reason: str
    base_ppl: float
    base_params: int
    settings: SearchSettings
    out_dir: Path | None = None
    journal: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def candidate_ppls(self) -> list[dict[str, float | None]]:
        """Per step: candidate key -> perplexity (None when abandoned or raced out)."""
        return [{c["unit"]: c["ppl"] for c in s["candidates"]} for s in self.steps]


def max_removable(adapter: ArchAdapter, kinds: tuple[str, ...], limit: int | None = None) -> int:
    """How many units of ``kinds`` one plan can remove (counting stops at ``limit``).

    Greedy through the adapter's own rules: each step removes a unit that leaves the most candidates
    (the first that costs no other candidate, when there is one). Where units nest (a block holds its
    SSM and heads; a layer's last head group goes only with its SSM) this is the true maximum: the
    inner units go first, then the ones holding them.
    """
    plan, n = adapter.empty_plan(), 0
    cands = adapter.candidates(plan, kinds)
    while cands and (limit is None or n < limit):
        best, best_left = None, None
        for unit in cands:
            left = adapter.candidates(plan.extended(unit), kinds)
            if best_left is None or len(left) > len(best_left):
                best, best_left = unit, left
            if len(left) >= len(cands) - 1:  # costs nothing else: no other choice does better
                break
        plan, cands, n = plan.extended(best), best_left, n + 1
    return n


def _mean(values: list[float | None], n_valid: int) -> float:
    # fsum is exactly rounded, so a partial sum of non-negative terms never exceeds the full one:
    # the early-abandon bound stays exact without any tolerance.
    return math.fsum(v for v in values if v is not None) / n_valid


def _ppl(mean_nll: float) -> float:
    return math.exp(mean_nll) if mean_nll < 700 else math.inf


class _Search:
    def __init__(
        self,
        model: nn.Module,
        calibration: CalibrationSet,
        settings: SearchSettings,
        out_dir: str | Path | None,
        progress: bool,
        comm: Comm,
    ) -> None:
        self.settings = settings
        self.comm = comm
        self.progress = progress and comm.is_main
        if settings.dtype:
            model.to(parse_dtype(settings.dtype))
        if settings.device and not getattr(model, "hf_device_map", None):
            model.to(settings.device)
        self.model = model.eval()
        self.adapter = get_adapter(model)
        self.adapter.configure_search(settings.extra)
        self.adapter.clear_mask()
        self.empty = self.adapter.empty_plan()
        initial = self.adapter.candidates(self.empty, settings.units)
        reachable = max_removable(self.adapter, settings.units, limit=settings.steps)
        if settings.steps > reachable:
            why = "" if reachable == len(initial) else (
                f" (of {len(initial)} candidates, at most {reachable} can be removed in any order: removing a "
                "unit can take others with it, e.g. a block the units inside it)")
            raise SearchError(
                f"steps={settings.steps} is more than the {reachable} removable "
                f"{'/'.join(settings.units)} units of this {self.adapter.num_layers()}-layer model{why}; "
                f"use --steps {reachable} or fewer"
            )
        if len(calibration) == 0:
            raise DataError("the calibration set has no samples")
        self.ev = Evaluator(model, self.adapter, calibration, settings.batch_size, settings.ignore_token_id,
                            settings.cache_device, reference_numerics=settings.reference_numerics)
        if self.ev.n_valid == 0:
            raise DataError("the calibration set has no targets: every sample is padding or shorter than 2 tokens")
        self.nb = self.ev.n_batches
        self.base_params = skeleton_parameters(model.config)
        self._params_cache: dict[tuple[Unit, ...], int] = {}
        model_id = model_identity(model)
        self.model_name = model_id["name"]
        self.ident = identity(settings, model_id, calibration.fingerprint())
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.journal = self._open_journal()
        self._last = self.ev.snapshot()
        self._clock = time.perf_counter()

    # ------------------------------------------------------------------ journal
    def _open_journal(self) -> dict[str, Any]:
        fresh = new_journal(self.settings.to_dict(), self.ident, self.model_name)
        if self.out_dir is None:
            return fresh
        path = self.out_dir / JOURNAL_NAME
        outcome: Any = None
        if self.comm.is_main:
            try:
                data = read_journal(path)
                if data is not None:
                    check_resumable(data, self.ident, path)
                    data["settings"] = self.settings.to_dict()  # stopping rules may differ
                    print(_resume_line(path, data), flush=True)
                outcome = ("ok", data)
            except SearchError as e:
                outcome = ("error", str(e))
        outcome = self.comm.broadcast(outcome)
        if outcome[0] == "error":
            raise SearchError(outcome[1])
        return outcome[1] if outcome[1] is not None else fresh

    def _account(self, deltas: list[dict[str, int]] | None = None) -> None:
        """Add work and time since the last call to the journal (work summed over processes)."""
        now = time.perf_counter()
        snap = self.ev.snapshot()
        local = {k: snap[k] - self._last[k] for k in snap}
        self._last = snap
        for d in deltas if deltas is not None else [local]:
            for k, v in d.items():
                self.journal["counters"][k] += v
        dt = now - self._clock
        self._clock = now
        self.journal["counters"]["seconds"] += dt
        if self.journal["partial"] is not None:
            self.journal["partial"]["seconds"] += dt

    def _local_delta(self) -> dict[str, int]:
        snap = self.ev.snapshot()
        return {k: snap[k] - self._last[k] for k in snap}

    def _gather(self, payload: Any) -> list[tuple[Any, dict[str, int]]]:
        gathered = self.comm.gather((payload, self._local_delta()))
        self._account([d for _, d in gathered])
        return gathered

    def _save(self) -> None:
        if self.out_dir is not None and self.comm.is_main:
            write_journal(self.out_dir / JOURNAL_NAME, self.journal)

    # ------------------------------------------------------------------ parameters and scores
    def _params(self, plan: Plan) -> int:
        if not len(plan):
            return self.base_params
        key = tuple(plan.units)
        if key not in self._params_cache:
            self._params_cache[key] = skeleton_parameters(self.model.config, plan)
        return self._params_cache[key]

    def _removed(self, plan: Plan, unit: Unit) -> int:
        """Parameters ``unit`` removes on top of the whole of ``plan``: units interact across layers too
        (the last use of a shared block takes its weights along; KV-sharing layers)."""
        return self._params(plan) - self._params(plan.extended(unit))

    def _score(self, mean_nll: float, plan: Plan, unit: Unit, current_nll: float | None) -> float:
        if self.settings.normalize is None:
            return mean_nll
        if current_nll is None:
            raise AssertionError("normalized scores need the current plan's NLL")
        return (mean_nll - current_nll) / max(1, self._removed(plan, unit))

    # ------------------------------------------------------------------ stopping rules
    def _accepted(self) -> tuple[int, str | None]:
        """How many recorded steps form the plan, and why the search stops there (None: go on)."""
        s, n = self.settings, 0
        for step in self.journal["steps"]:
            if n >= s.steps:
                return n, "steps"
            if s.max_ppl is not None and step["ppl"] > s.max_ppl:
                return n, "max_ppl"
            n += 1
            if s.target_params is not None and step["params"] <= s.target_params * self.base_params:
                return n, "target_params"
        if n >= s.steps:
            return n, "steps"
        exhausted = self.journal.get("exhausted_at")
        if exhausted is not None and n >= exhausted:
            return n, "no_candidates"
        return n, None

    def _plan_of(self, n: int) -> Plan:
        return self.empty.extended(*[Unit.from_dict(st["unit"]) for st in self.journal["steps"][:n]])

    # ------------------------------------------------------------------ running
    def run(self) -> SearchResult:
        # In a log (not a terminal) nested bars leave cursor-up codes behind: there each step's bar stays
        # as one finished line instead, and the outer bar is left out.
        self._nested = _is_terminal()
        steps_bar = tqdm(total=self.settings.steps, desc="search steps", disable=not self.progress or not self._nested,
                         initial=min(len(self.journal["steps"]), self.settings.steps))
        try:
            while True:
                n, reason = self._accepted()
                if reason is not None:
                    break
                plan = self._plan_of(n)
                cands = self.adapter.candidates(plan, self.settings.units)
                if not cands:
                    self.journal["exhausted_at"] = n
                    continue
                record = self._step(n, plan, cands)
                self.journal["steps"].append(record)
                self.journal["partial"] = None
                self._save()
                steps_bar.update(1)
                steps_bar.set_postfix_str(f"{record['key']} ppl={record['ppl']:.4g}")
        finally:
            steps_bar.close()
            self.ev.release()
            self.ev.close()
        self.journal["stop_reason"] = reason
        self.journal["done"] = True
        self._save()
        return self._result(n, reason)

    def _result(self, n: int, reason: str) -> SearchResult:
        steps = self.journal["steps"][:n]
        base = self.journal["base"]
        rows = [{"step": 0, "unit": None, "ppl": base["ppl"], "params": base["params"], "seconds": 0.0}]
        for st in steps:
            rows.append({"step": st["step"] + 1, "unit": st["key"], "ppl": st["ppl"], "params": st["params"],
                         "seconds": st["seconds"]})
        return SearchResult(
            plan=self._plan_of(n), trajectory=rows, steps=steps, counters=dict(self.journal["counters"]),
            stop_reason=reason, base_ppl=base["ppl"], base_params=base["params"], settings=self.settings,
            out_dir=self.out_dir, journal=self.journal,
        )

    # ------------------------------------------------------------------ one step
    def _new_partial(self, n: int, cands: list[Unit]) -> dict[str, Any]:
        leader, s = None, self.settings
        race = None
        if not s.exact_reference and s.race_delta is not None and len(cands) > 1:
            race = racing.RaceSpec(s.race_delta, len(cands), self.nb, s.race_min_samples).to_dict()
        elif not s.exact_reference and s.early_abandon and len(cands) > 1:
            leader = unit_key(self._leader(cands))
        keys = [unit_key(u) for u in cands]
        if self.journal["base"] is None:
            keys = [BASE, *keys]
        # The current plan's own NLL is needed before the main pass only to score the leader
        # (normalize="params"); otherwise it rides along the main pass, whose prefix runs anyway, instead
        # of costing the leader phase a second full prefix per batch.
        base_with_leader = leader is not None and BASE in keys and self.settings.normalize is not None
        return {
            "step": n,
            "leader": leader,
            "base_with_leader": base_with_leader,
            "values": {k: [] for k in keys},
            "batches": {k: 0 for k in keys},
            "status": {k: "active" for k in keys},
            "main_batches": 0,
            "race": race,
            "eliminations": [],
            "seconds": 0.0,
            "counters_at_start": {k: self.journal["counters"][k] for k in ("layer_evals", "head_evals", "candidate_batches")},
        }

    def _leader(self, cands: list[Unit]) -> Unit:
        """The previous step's best remaining candidate (it usually stays good), else the first one."""
        if self.journal["steps"]:
            prev = self.journal["steps"][-1]
            by_key = {unit_key(u): u for u in cands}
            done = [c for c in prev["candidates"] if c["status"] == "done" and c["unit"] in by_key]
            if done:
                return by_key[min(done, key=lambda c: c["score"])["unit"]]
        return cands[0]

    def _step(self, n: int, plan: Plan, cands: list[Unit]) -> dict[str, Any]:
        part = self.journal["partial"]
        if part is None or part.get("step") != n:
            part = self.journal["partial"] = self._new_partial(n, cands)
        self._clock = time.perf_counter()
        total = sum(self.nb - b for b in part["batches"].values())
        bar = tqdm(total=total, desc=f"step {n + 1} candidates x batches", leave=not self._nested,
                   disable=not self.progress)
        try:
            if self.settings.exact_reference:
                self._plain_step(plan, cands, part, bar)
            else:
                self._layered_step(plan, cands, part, bar)
        finally:
            bar.close()
        return self._finish_step(n, plan, cands, part)

    def _current_nll(self) -> float | None:
        if self.journal["steps"]:
            return self.journal["steps"][-1]["mean_nll"]
        base = self.journal["base"]
        return base["mean_nll"] if base is not None else None

    def _record_base(self, part: dict[str, Any]) -> None:
        if self.journal["base"] is None and part["batches"].get(BASE) == self.nb:
            mean, ppl = self._mean_ppl(part["values"][BASE])
            self.journal["base"] = {"mean_nll": mean, "ppl": ppl, "params": self.base_params}

    def _mean_ppl(self, values: list[float | None]) -> tuple[float, float]:
        if self.settings.reference_numerics:  # the reference's fp32 mean and exp (reference_mode)
            return reference_mean_ppl(values)
        mean = _mean(values, self.ev.n_valid)
        return mean, _ppl(mean)

    # ---- the plain reference loop: candidate after candidate, every batch through model(...)
    def _plain_step(self, plan: Plan, cands: list[Unit], part: dict[str, Any], bar: tqdm) -> None:
        rank = self.comm.rank
        items: list[Unit | str] = [BASE] if BASE in part["values"] else []
        items += cands
        if self._split_candidates:
            self._plain_step_by_candidates(plan, items, part, bar)
            return
        for item in items:
            k = item if item == BASE else unit_key(item)
            unit = None if item == BASE else item
            while part["batches"][k] < self.nb:
                start = part["batches"][k]
                b = start + rank
                local = self.ev.plain(b, plan, unit) if b < self.nb else None
                gathered = self._gather((b, local))
                for (gb, vals), _ in sorted(gathered, key=lambda g: g[0][0]):
                    if gb < self.nb:
                        part["values"][k].extend(vals)
                        part["batches"][k] += 1
                        bar.update(1)
                if item == BASE:
                    self._record_base(part)
                self._save()
            if k != BASE:
                part["status"][k] = "done"

    def _plain_step_by_candidates(self, plan: Plan, items: list[Unit | str], part: dict[str, Any], bar: tqdm) -> None:
        """Several processes, each measuring whole candidates on all batches (``split="candidates"``)."""
        todo = [it for it in items if part["batches"][it if it == BASE else unit_key(it)] < self.nb]
        W, rank = self.comm.world_size, self.comm.rank
        for start in range(0, len(todo), W):
            chunk = todo[start : start + W]
            local = None
            if rank < len(chunk):
                item = chunk[rank]
                unit = None if item == BASE else item
                local = [v for b in range(self.nb) for v in self.ev.plain(b, plan, unit)]
            for rk, (vals, _) in enumerate(self._gather(local)):
                if rk < len(chunk):
                    item = chunk[rk]
                    k = item if item == BASE else unit_key(item)
                    part["values"][k] = vals
                    part["batches"][k] = self.nb
                    if k != BASE:
                        part["status"][k] = "done"
                    bar.update(self.nb)
            self._record_base(part)
            self._save()

    @property
    def _split_candidates(self) -> bool:
        return self.settings.split == "candidates" and self.comm.world_size > 1

    # ---- the accelerated search
    def _layered_step(self, plan: Plan, cands: list[Unit], part: dict[str, Any], bar: tqdm) -> None:
        rank, nb = self.comm.rank, self.nb
        by_key = {unit_key(u): u for u in cands}
        leader_key = part["leader"]
        # 1) the leader (and, to score it, the current plan itself) on every batch: the bound to beat
        base_with_leader = part.get("base_with_leader", True)  # journals from before the flag: always
        if leader_key is not None:
            items: list[Unit | str] = [by_key[leader_key]]
            if BASE in part["values"] and base_with_leader:
                items = [BASE, *items]
            while part["batches"][leader_key] < nb:
                start = part["batches"][leader_key]
                b = start + rank
                local = self.ev.layered(b, plan, items) if b < nb else None
                for (gb, res), _ in sorted(self._gather((b, local)), key=lambda g: g[0][0]):
                    if gb >= nb:
                        continue
                    for k, vals in res.items():
                        part["values"][k].extend(vals)
                        part["batches"][k] += 1
                        bar.update(1)
                self._record_base(part)
                self._save()
            part["status"][leader_key] = "done"
        current_nll = self._current_nll()
        best = None
        if leader_key is not None:
            best = self._score(_mean(part["values"][leader_key], self.ev.n_valid), plan, by_key[leader_key], current_nll)
        # 2) every other candidate, batch-outer: one cached prefix per batch, one suffix per candidate
        main = [k for k in by_key if k != leader_key]
        race_end = math.ceil(self.settings.race_fraction * nb) if self.settings.race_fraction else None
        while part["main_batches"] < nb:
            active: list[Unit | str] = [by_key[k] for k in main if part["status"][k] == "active"]
            if BASE in part["values"] and part["batches"][BASE] < nb:
                active = [BASE, *active]
            if not active:
                part["main_batches"] = nb
                break
            if self._split_candidates:
                # every process runs the prefix of the same batch and the suffixes of its share of candidates
                b = part["main_batches"]
                mine = active[rank :: self.comm.world_size]
                local = self.ev.layered(b, plan, mine)
                merged: dict[str, list[float | None]] = {}
                for (_, res), _ in self._gather((b, local)):
                    merged.update(res)
                keys = [BASE] + [unit_key(u) for u in by_key.values()]
                results = [(b, {k: merged[k] for k in keys if k in merged})]
            else:
                b = part["main_batches"] + rank
                local = self.ev.layered(b, plan, active) if b < nb else None
                results = [g for g, _ in sorted(self._gather((b, local)), key=lambda g: g[0][0])]
            for gb, res in results:
                if gb >= nb:
                    continue
                # replay in batch order: the same decisions as one process going batch by batch
                for k, vals in res.items():
                    if k != BASE and part["status"][k] != "active":
                        continue
                    part["values"][k].extend(vals)
                    part["batches"][k] += 1
                    bar.update(1)
                    if k != BASE and best is not None and part["batches"][k] < nb:
                        bound = self._score(_mean(part["values"][k], self.ev.n_valid), plan, by_key[k], current_nll)
                        if bound > best:
                            part["status"][k] = "abandoned"
                            bar.update(nb - part["batches"][k])
                if part.get("race") is not None:
                    self._race_paired(gb, main, part, bar, plan, by_key, current_nll)
                if race_end is not None and gb + 1 == race_end:
                    self._race_cut(main, part, bar, plan, by_key, current_nll)
                part["main_batches"] = gb + 1
            self._record_base(part)
            self._save()
        for k in main:
            if part["status"][k] == "active" and part["batches"][k] == nb:
                part["status"][k] = "done"

    def _race_paired(self, gb: int, main: list[str], part: dict[str, Any], bar: tqdm, plan: Plan,
                     by_key: dict[str, Unit], current_nll: float | None) -> None:
        """After batch ``gb``: drop (and journal) every candidate the paired-difference bound rules out."""
        active = [k for k in main if part["status"][k] == "active"]
        if self.settings.normalize is None:
            coef = dict.fromkeys(active, 1.0)
            current: list[float | None] | float = 0.0
        else:
            coef = {k: 1.0 / max(1, self._removed(plan, by_key[k])) for k in active}
            # first step: the base plan runs alongside, per sample; later: the current plan's mean
            current = part["values"][BASE] if current_nll is None else current_nll
        r = part["race"]
        spec = racing.RaceSpec(r["delta"], r["candidates"], r["looks"], r["min_samples"])
        for elim in racing.eliminate(spec, active, part["values"], coef, current, self.ev.n_valid):
            part["status"][elim["unit"]] = "raced_out"
            part["eliminations"].append({"batch": gb, "batches": gb + 1, **elim})
            bar.update(self.nb - part["batches"][elim["unit"]])

    def _race_cut(self, main: list[str], part: dict[str, Any], bar: tqdm, plan: Plan, by_key: dict[str, Unit],
                  current_nll: float | None) -> None:
        """Approximate: keep the ``race_keep`` candidates with the best score so far, drop the rest.

        The score is the step's own (NLL, or NLL increase per removed parameter) on the mean NLL of the
        samples seen so far, which estimates the full mean; with ``normalize=None`` this ranks exactly as
        the partial NLL sums do (every active candidate has seen the same batches).
        """
        def seen_mean(k: str) -> float:
            seen = [v for v in part["values"][k] if v is not None]
            return math.fsum(seen) / len(seen) if seen else 0.0

        if current_nll is None and self.settings.normalize is not None:
            current_nll = seen_mean(BASE)  # first step: the base plan runs alongside, on the same batches

        def estimate(k: str) -> float:
            return self._score(seen_mean(k), plan, by_key[k], current_nll)

        active = [k for k in main if part["status"][k] == "active"]
        ranked = sorted(active, key=lambda k: (estimate(k), main.index(k)))
        for k in ranked[self.settings.race_keep:]:
            part["status"][k] = "raced_out"
            bar.update(self.nb - part["batches"][k])

    def _finish_step(self, n: int, plan: Plan, cands: list[Unit], part: dict[str, Any]) -> dict[str, Any]:
        current_nll = self._current_nll()
        rows, best, best_unit = [], None, None
        elim = {e["unit"]: e for e in part.get("eliminations", [])}
        for unit in cands:
            k = unit_key(unit)
            status = part["status"][k]
            row: dict[str, Any] = {"unit": k, "status": status, "batches": part["batches"][k]}
            if self.settings.normalize == "params":
                row["params_removed"] = self._removed(plan, unit)
            if status == "done":
                mean, ppl = self._mean_ppl(part["values"][k])
                # the reference ranks by the perplexity it computed (prune.py:204)
                score = ppl if self.settings.reference_numerics else self._score(mean, plan, unit, current_nll)
                row.update(mean_nll=mean, ppl=ppl, score=score)
                if best is None or score < best:  # strict: ties keep the first in candidate order
                    best, best_unit = score, unit
            else:
                lower = _mean(part["values"][k], self.ev.n_valid)
                row.update(mean_nll=None, ppl=None, score=None, ppl_lower_bound=_ppl(lower))
                if status == "raced_out" and elim.get(k) is not None:
                    row["eliminated_after_batches"] = elim[k]["batches"]
            rows.append(row)
        if best_unit is None:
            raise SearchError(f"step {n + 1}: no candidate was evaluated on all calibration batches")
        chosen = next(r for r in rows if r["unit"] == unit_key(best_unit))
        new_plan = plan.extended(best_unit)
        self._account()
        now = self.journal["counters"]
        start = part["counters_at_start"]
        return {
            "step": n,
            "unit": best_unit.to_dict(),
            "key": unit_key(best_unit),
            "mean_nll": chosen["mean_nll"],
            "ppl": chosen["ppl"],
            "score": chosen["score"],
            "params": self._params(new_plan),
            "seconds": part["seconds"],
            "leader": part["leader"],
            "race": part.get("race"),
            "eliminations": part.get("eliminations", []),
            "candidates": rows,
            "counters": {k: now[k] - start[k] for k in start},
        }


def search(
    model: nn.Module,
    calibration: CalibrationSet,
    settings: SearchSettings | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
    comm: Comm | None = None,
) -> SearchResult:
    """Run (or resume, from ``out_dir/journal.json``) the greedy search; returns the plan and trajectory.

    With ``out_dir``, the journal is rewritten after every calibration round and the results (plan,
    reference plan file, trajectory CSV/JSON/PNG) are written at the end, by rank 0 only.
    """
    settings = settings or SearchSettings()
    comm = comm or Comm()
    # Fused Mamba forwards (mamba-ssm kernels on a GPU; unchanged elsewhere) for every candidate's forward.
    with torch.no_grad(), fused_forward(model):
        runner = _Search(model, calibration, settings, out_dir, progress, comm)
        result = runner.run()
    if out_dir is not None and comm.is_main:
        from .results import write_results

        write_results(result, Path(out_dir))
        if settings.reference_numerics:  # the reference's per-step files and log.json beside ours
            from .reference_mode import write_reference_files

            write_reference_files(result, Path(out_dir), runner.adapter)
    comm.barrier()
    return result
