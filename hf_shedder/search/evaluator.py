"""Per-batch NLL of candidate plans: the plain reference forward and the layer-wise cached forward.

Both return, for every sample of a calibration batch, its mean next-token NLL over counted targets
(``None`` for a sample without any), which is what the reference perplexity averages.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..arch.base import ArchAdapter
from ..data import CalibrationSet
from ..evaluation.perplexity import _target_mask, head_nll, token_nll
from ..units import Plan, Unit
from .reference_mode import reference_sample_means

BASE = "base"  # item key of the current plan itself (no candidate removed on top)


def unit_key(unit: Unit) -> str:
    key = f"{unit.kind}@{unit.layer}"
    return key + (":" + ",".join(map(str, unit.indices)) if unit.indices else "")


def _first_param_device(module: nn.Module, default: torch.device) -> torch.device:
    for p in module.parameters():
        return p.device
    return default


class LayerCounter:
    """Counts forward calls of the model's (unmasked) decoder layers with forward pre-hooks.

    A block masked by the search is swapped for a pass-through module, so it is not counted; an SSM
    masked inside a block is (the rest of the block still runs).
    """

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        self.count = 0
        self._handles = [layer.register_forward_pre_hook(self._hook) for layer in layers]

    def _hook(self, module: nn.Module, args: Any) -> None:
        self.count += 1

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class Evaluator:
    """Evaluates plans batch by batch; ``counters`` holds the work done (local to this process)."""

    def __init__(
        self,
        model: nn.Module,
        adapter: ArchAdapter,
        calibration: CalibrationSet,
        batch_size: int,
        ignore_token_id: int | None = None,
        cache_device: str | None = None,
        reference_numerics: bool = False,
    ) -> None:
        self.model = model
        self.reference_numerics = reference_numerics  # plain(): the reference's fp16 CE (reference_mode)
        self.adapter = adapter
        self.ignore_token_id = ignore_token_id
        self.cache_device = torch.device(cache_device) if cache_device else None
        self.batches = [
            (b["input_ids"], b["attention_mask"]) for b in calibration.batches(batch_size)
        ]
        _, tmask = _target_mask(calibration.input_ids, calibration.attention_mask, ignore_token_id)
        self.n_valid = int((tmask.sum(dim=1) > 0).sum())
        self.num_layers = adapter.num_layers()
        self._layers = list(adapter.layers())  # the unmasked modules, for devices and counting
        self.input_device = model.get_input_embeddings().weight.device
        self._layer_devices = [_first_param_device(m, self.input_device) for m in self._layers]
        self.layer_counter = LayerCounter(self._layers)
        self.head_evals = 0
        self.candidate_batches = 0
        self._plan: Plan | None = None

    @property
    def n_batches(self) -> int:
        return len(self.batches)

    def close(self) -> None:
        self.layer_counter.close()

    def snapshot(self) -> dict[str, int]:
        return {
            "layer_evals": self.layer_counter.count,
            "head_evals": self.head_evals,
            "candidate_batches": self.candidate_batches,
        }

    # ---------------------------------------------------------------- helpers
    def _set_plan(self, plan: Plan) -> None:
        # Re-masking the whole plan costs module swaps; only do it when the plan changes.
        if self._plan is None or self._plan.units != plan.units:
            self.adapter.set_mask(plan)
            self._plan = plan

    @contextlib.contextmanager
    def _plus(self, plan: Plan, unit: Unit | None) -> Iterator[None]:
        """Mask ``plan`` (kept between calls) and ``unit`` on top of it (undone on exit)."""
        self._set_plan(plan)
        undo = self.adapter.mask_unit(unit) if unit is not None else None
        try:
            yield
        finally:
            if undo is not None:
                undo()

    def release(self) -> None:
        """Undo every mask (end of search)."""
        self.adapter.clear_mask()
        self._plan = None

    def _inputs(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids, am = self.batches[b]
        return ids.to(self.input_device), am.to(self.input_device)

    @staticmethod
    def _per_sample(nll_sum: torch.Tensor, count: torch.Tensor) -> list[float | None]:
        sums, counts = nll_sum.double().cpu().tolist(), count.cpu().tolist()
        return [s / c if c > 0 else None for s, c in zip(sums, counts)]

    def _run_layer(self, i: int, hidden: torch.Tensor, ctx: Any) -> torch.Tensor:
        dev = self._layer_devices[i]
        if hidden.device != dev:  # device_map="auto": layers live on several devices
            hidden = hidden.to(dev)
            ctx = ctx.to(dev) if isinstance(ctx, torch.Tensor) else ctx
        return self.adapter.run_layer(i, hidden, ctx)

    def _head(self, hidden: torch.Tensor, ids: torch.Tensor, am: torch.Tensor) -> list[float | None]:
        head = self.adapter.lm_head()
        dev = head.weight.device
        hidden = hidden.to(dev)

        def head_fn(x: torch.Tensor) -> torch.Tensor:
            return head(self.adapter.final_norm(x).to(head.weight.dtype))

        self.head_evals += 1
        return self._per_sample(*head_nll(hidden, head_fn, ids.to(dev), am.to(dev), ignore_token_id=self.ignore_token_id))

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def plain(self, b: int, plan: Plan, unit: Unit | None = None) -> list[float | None]:
        """The reference way: mask ``plan`` (+ ``unit``) and run the whole model on batch ``b``."""
        ids, am = self._inputs(b)
        with self._plus(plan, unit):
            logits = self.model(input_ids=ids, attention_mask=am, use_cache=False).logits
        self.head_evals += 1
        self.candidate_batches += 1
        if self.reference_numerics:
            out: list[float | None] = reference_sample_means(logits, ids, self.ignore_token_id)
        else:
            out = self._per_sample(*token_nll(logits, ids, am, ignore_token_id=self.ignore_token_id))
        del logits
        return out

    @torch.no_grad()
    def layered(self, b: int, plan: Plan, items: Sequence[Unit | str]) -> dict[str, list[float | None]]:
        """Evaluate ``plan`` + each candidate in ``items`` (``BASE``: ``plan`` alone) on batch ``b``.

        The current plan runs once, caching the hidden state entering every layer that holds a
        candidate (it does not depend on candidates at that layer or later); each candidate then runs
        only the layers from its own onwards.
        """
        ids, am = self._inputs(b)
        cands = [u for u in items if isinstance(u, Unit)]
        need_base = BASE in items
        starts = {u.layer for u in cands}
        stop = self.num_layers if need_base else (max(starts) if starts else 0)
        out: dict[str, list[float | None]] = {}
        self._set_plan(plan)
        hidden, ctx = self.adapter.embed(ids, am)
        cache: dict[int, torch.Tensor] = {}
        for i in range(stop):
            if i in starts:
                cache[i] = hidden if self.cache_device is None else hidden.to(self.cache_device)
            hidden = self._run_layer(i, hidden, ctx)
        if stop in starts:
            cache[stop] = hidden if self.cache_device is None else hidden.to(self.cache_device)
        if need_base:
            out[BASE] = self._head(hidden, ids, am)
        del hidden
        for unit in cands:
            with self._plus(plan, unit):
                h = cache[unit.layer]
                for i in range(unit.layer, self.num_layers):
                    h = self._run_layer(i, h, ctx)
                out[unit_key(unit)] = self._head(h, ids, am)
            self.candidate_batches += 1
        return out
