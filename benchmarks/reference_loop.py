"""The reference's greedy search, in its own stack: the anchor our search is timed against (issue 15).

Mamba-Shedder's ``prune.py`` loads mamba-ssm's ``MambaLMHeadModel`` in fp16 and, at every step, for
every remaining candidate, masks the plan plus the candidate and runs the whole calibration set
through the model at batch 2: full logits, cross-entropy per token, the mean NLL of each row, the
mean over rows, its exp. The candidate with the lowest perplexity (the first on ties: strict ``<``)
joins the plan. Its patch masks by a flag inside mamba-ssm's modules; here the same computation is
done by swapping modules, so stock mamba-ssm runs it:

- block removal: the layer becomes a pass-through (mamba-ssm's ``Block`` returns ``(hidden_states,
  residual)`` untouched, which is what the patch's ``mask_mamba_block`` does);
- SSM removal (Mamba-2): the mixer becomes the same mixer without the scan (``y = x``, then the gated
  norm and the output projection, as the patch's ``mask_ssm`` path).

The loop itself is stack-agnostic (``reference_search`` takes the model and a ``Swapper``), so the CPU
tests run it on a Transformers model (block removal) and check it picks what ``hf_shedder``'s exact
search picks. Written for this project from the reference's description; no code copied.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class SkipMambaSsmBlock(nn.Module):
    """mamba-ssm ``Block`` stand-in: the block is removed, the residual stream passes through."""

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor | None = None, *args: Any,
                **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        return hidden_states, residual


class SkipHFBlock(nn.Module):
    """Transformers Mamba/Mamba-2 block stand-in (the block adds its own residual, so identity)."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


class ScanFreeMamba2(nn.Module):
    """mamba-ssm ``Mamba2`` mixer without its scan: input projection, causal conv, ``y = x``, gated
    norm, output projection (the reference patch's ``mask_ssm`` path, in plain PyTorch)."""

    def __init__(self, mixer: nn.Module) -> None:
        super().__init__()
        self.inner = mixer

    def forward(self, u: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        m = self.inner
        length = u.shape[1]
        zxbcdt = m.in_proj(u)
        d_ssm, groups_state = m.d_ssm, m.ngroups * m.d_state
        d_mlp = (zxbcdt.shape[-1] - 2 * d_ssm - 2 * groups_state - m.nheads) // 2
        z0, x0, z, xbc, _dt = torch.split(zxbcdt, [d_mlp, d_mlp, d_ssm, d_ssm + 2 * groups_state, m.nheads], dim=-1)
        xbc = m.act(m.conv1d(xbc.transpose(1, 2))[..., :length].transpose(1, 2))  # conv pads d_conv - 1 both sides
        x = xbc[..., :d_ssm]
        y = m.norm(x, z) if m.rmsnorm else x * m.act(z)
        if d_mlp > 0:
            y = torch.cat([F.silu(z0) * x0, y], dim=-1)
        return m.out_proj(y)


class Swapper:
    """Masks a set of layer indices by module swap and restores the originals."""

    def __init__(self, layers: nn.ModuleList, kind: str, skip_block: Callable[[], nn.Module],
                 scan_free: Callable[[nn.Module], nn.Module] | None = None) -> None:
        if kind not in ("block", "ssm"):
            raise ValueError(f"kind must be block or ssm, got {kind!r}")
        if kind == "ssm" and scan_free is None:
            raise ValueError("SSM removal needs a scan-free mixer for this stack")
        self.layers, self.kind = layers, kind
        self.skip_block, self.scan_free = skip_block, scan_free
        self.originals = list(layers)
        self.mixers = [getattr(layer, "mixer", None) for layer in self.originals]

    def apply(self, removed: Sequence[int]) -> None:
        removed = set(removed)
        for i, layer in enumerate(self.originals):
            if self.kind == "block":
                self.layers[i] = self.skip_block() if i in removed else layer
            else:
                layer.mixer = self.scan_free(self.mixers[i]) if i in removed else self.mixers[i]

    def restore(self) -> None:
        self.apply([])

    def layers_run(self, removed: Sequence[int]) -> int:
        """Decoder layers one forward runs with ``removed`` masked (a removed SSM still runs its block)."""
        return len(self.originals) - (len(set(removed)) if self.kind == "block" else 0)


@torch.no_grad()
def batch_row_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-row mean next-token NLL, as the reference: CE on the logits' own dtype, then float.

    (The reference ignores ``pad_token_id`` only when it is truthy: GPT-NeoX's eos id is 0, so no
    target is ignored; our calibration rows carry no padding either.)"""
    nll = F.cross_entropy(logits[:, :-1, :].permute(0, 2, 1), input_ids[:, 1:], reduction="none").float()
    return nll.mean(dim=1)


@torch.no_grad()
def reference_ppl(forward: Callable[[torch.Tensor], torch.Tensor], batches: Sequence[torch.Tensor]) -> float:
    """exp(mean over rows of the row's mean NLL) over ``batches`` of input ids; ``forward`` gives logits."""
    rows = []
    for ids in batches:
        logits = forward(ids)
        rows.append(batch_row_nll(logits, ids))
        del logits
    return math.exp(float(torch.cat(rows).double().mean()))


def reference_search(
    forward: Callable[[torch.Tensor], torch.Tensor],
    swapper: Swapper,
    batches: Sequence[torch.Tensor],
    steps: int,
    candidates: Callable[[int, list[int]], list[int]] | None = None,
    sync: Callable[[], None] = lambda: None,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """The reference greedy loop: ``steps`` steps, each over every remaining layer (or ``candidates(step,
    plan)`` of them, e.g. a subset to time), one full-model perplexity per candidate; ``forward(ids)``
    runs the (masked) model and returns its logits.

    Returns one record per step: chosen layer, its perplexity, every candidate's perplexity, seconds,
    forwards and layer evaluations.
    """
    plan: list[int] = []
    out = []
    n = len(swapper.originals)
    try:
        for step in range(steps):
            cands = [i for i in range(n) if i not in plan]
            if candidates is not None:
                cands = candidates(step, plan)
            sync()
            t0 = time.perf_counter()
            best, best_ppl, ppls, layer_evals = None, math.inf, {}, 0
            for c in cands:
                swapper.apply([*plan, c])
                ppl = reference_ppl(forward, batches)
                layer_evals += len(batches) * swapper.layers_run([*plan, c])
                ppls[c] = ppl
                if ppl < best_ppl:  # strict: ties keep the first candidate, as the reference
                    best, best_ppl = c, ppl
            sync()
            seconds = time.perf_counter() - t0
            if best is None:
                raise RuntimeError(f"step {step}: every candidate gave an infinite perplexity")
            plan.append(best)
            out.append({"step": step, "chosen": best, "ppl": best_ppl, "candidates": ppls, "seconds": seconds,
                        "forwards": len(cands) * len(batches), "layer_evals": layer_evals})
            if log is not None:
                log(f"[reference loop] step {step}: layer {best} ppl {best_ppl:.6g}, {len(cands)} candidates, "
                    f"{seconds:.1f} s")
    finally:
        swapper.restore()
    return out
