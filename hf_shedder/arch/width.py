"""Width pruning primitives: keep a subset of rows/columns/channels of a module's weights.

Every primitive has two modes that run the *same* forward code:

* ``share=True`` (search-time mask): the result reads the original weights and selects the kept
  rows/columns on the fly (``index_select`` at each call, no stored copy of a weight matrix); only
  per-channel vectors (biases, norm weights, ``A_log``...) are gathered once, they are tiny.
* ``share=False`` (extraction): the result owns smaller, independent weights.

A pruned module is a *clone of the original module's class* (same ``forward``), with its submodules and
size attributes replaced, so masked, physically pruned and stock code paths coincide.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import PlanError


def index_tensor(indices: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(list(indices), dtype=torch.long, device=like.device)


def shallow_clone(module: nn.Module) -> nn.Module:
    """A new instance of ``type(module)`` with the same attributes and its own child containers.

    Replacing a parameter or submodule on the clone leaves the original untouched; unreplaced ones are
    shared (same objects), which is what a search-time mask needs.
    """
    new = object.__new__(type(module))
    for key, value in module.__dict__.items():
        new.__dict__[key] = copy.copy(value) if isinstance(value, (dict, set, list)) else value
    return new


class SelectedLinear(nn.Module):
    """``source`` restricted to output rows ``rows`` and/or input columns ``cols`` (weights read on the fly)."""

    def __init__(self, source: nn.Module, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
        super().__init__()
        self.source = source
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        w = source.weight
        self.out_features = len(rows) if rows is not None else w.shape[0]
        self.in_features = len(cols) if cols is not None else w.shape[1]

    @property
    def weight(self) -> torch.Tensor:
        w = self.source.weight
        if self.rows is not None:
            w = w.index_select(0, self.rows)
        if self.cols is not None:
            w = w.index_select(1, self.cols)
        return w

    @property
    def bias(self) -> torch.Tensor | None:
        b = self.source.bias
        if b is None or self.rows is None:
            return b
        return b.index_select(0, self.rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def _take(t: torch.Tensor, dim: int, idx: Sequence[int] | None) -> torch.Tensor:
    return t if idx is None else t.index_select(dim, index_tensor(idx, t))


def select_linear(
    linear: nn.Module, rows: Sequence[int] | None = None, cols: Sequence[int] | None = None, *, share: bool
) -> nn.Module:
    """Keep output ``rows`` and input ``cols`` (None = all) of a linear layer."""
    if share:
        src = linear
        r = None if rows is None else index_tensor(rows, src.weight)
        c = None if cols is None else index_tensor(cols, src.weight)
        return SelectedLinear(src, r, c)
    w = _take(_take(linear.weight.detach(), 0, rows), 1, cols)
    b = linear.bias
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
    new.weight = nn.Parameter(w.clone(), requires_grad=linear.weight.requires_grad)
    if b is not None:
        new.bias = nn.Parameter(_take(b.detach(), 0, rows).clone(), requires_grad=b.requires_grad)
    return new


def select_vector(param: torch.Tensor, idx: Sequence[int], *, share: bool) -> nn.Parameter:
    """Entries ``idx`` of a 1-D parameter (gathered; a mask's copy is frozen)."""
    t = _take(param.detach(), 0, idx).clone()
    return nn.Parameter(t, requires_grad=False if share else param.requires_grad)


def select_depthwise_conv(conv: nn.Conv1d, channels: Sequence[int], *, share: bool) -> nn.Conv1d:
    """Keep ``channels`` of a depthwise (groups == channels) Conv1d. Its weights are per-channel and small."""
    new = shallow_clone(conv)
    n = len(channels)
    new.in_channels = new.out_channels = new.groups = n
    new.weight = select_vector(conv.weight, channels, share=share)
    if conv.bias is not None:
        new.bias = select_vector(conv.bias, channels, share=share)
    return new


def select_module_list(items: nn.ModuleList, positions: Sequence[int]) -> nn.ModuleList:
    return nn.ModuleList([items[p] for p in positions])


# ---------------------------------------------------------------------------- attention heads
def head_channels(heads: Sequence[int], head_dim: int) -> list[int]:
    return [h * head_dim + d for h in heads for d in range(head_dim)]


def removed_per_group(removed: set[int], size: int, n_groups: int) -> list[int]:
    """How many of ``removed`` fall in each of ``n_groups`` equal runs of consecutive ids out of ``size``
    (Mamba-2 head groups, grouped-router expert groups): such groups must shrink evenly."""
    per = size // n_groups
    return [sum(1 for i in removed if i // per == g) for g in range(n_groups)]


def check_attention_heads(removed: set[int], num_heads: int, num_kv_heads: int) -> None:
    """Grouped-query attention stays valid if whole KV groups go, and the remaining groups lose equally many."""
    rep = num_heads // num_kv_heads
    per_group = [sum(1 for h in removed if h // rep == g) for g in range(num_kv_heads)]
    if len({n for n in per_group if n < rep}) > 1:  # groups that stay must stay the same size
        shown = dict(enumerate(per_group))
        raise PlanError(
            f"removing these attention heads would break the grouped-query structure: {num_heads} query heads "
            f"share {num_kv_heads} key/value heads ({rep} per group), and every group that is kept must keep the "
            f"same number of query heads (query heads removed per group: {shown}). Remove whole groups "
            f"(heads g*{rep}..g*{rep}+{rep - 1}) or the same number of heads from each group."
        )


def attention_head_plan(kept: Sequence[int], num_heads: int, num_kv_heads: int) -> tuple[list[int], int]:
    """(kept KV heads, query heads per KV head) once ``kept`` query heads remain."""
    rep = num_heads // num_kv_heads
    kv = sorted({h // rep for h in kept})
    return kv, len(kept) // len(kv)


def prune_attention_heads(
    attn: nn.Module,
    kept: Sequence[int],
    num_heads: int,
    num_kv_heads: int,
    *,
    share: bool,
) -> nn.Module:
    """Clone of a Llama-style attention (q/k/v/o_proj, ``head_dim``) keeping query heads ``kept``.

    KV heads whose whole query group is removed go too. Returns the clone; ``num_key_value_groups`` is
    updated so eager and SDPA attention repeat the right number of times.
    """
    kept = sorted(kept)
    head_dim = attn.head_dim
    kv, groups = attention_head_plan(kept, num_heads, num_kv_heads)
    q_rows, kv_rows = head_channels(kept, head_dim), head_channels(kv, head_dim)
    new = shallow_clone(attn)
    new.q_proj = select_linear(attn.q_proj, rows=q_rows, share=share)
    new.k_proj = select_linear(attn.k_proj, rows=kv_rows, share=share)
    new.v_proj = select_linear(attn.v_proj, rows=kv_rows, share=share)
    new.o_proj = select_linear(attn.o_proj, cols=q_rows, share=share)
    new.num_key_value_groups = groups
    for name in ("num_heads", "num_attention_heads"):
        if isinstance(getattr(attn, name, None), int):
            setattr(new, name, len(kept))
    for name in ("num_key_value_heads",):
        if isinstance(getattr(attn, name, None), int):
            setattr(new, name, len(kv))
    return new


def held_heads(attn: nn.Module) -> tuple[int, ...]:
    """Original indices of the query heads a (possibly pruned) attention module still holds."""
    held = getattr(attn, "shedder_heads", None)
    return tuple(held) if held is not None else tuple(range(attn.q_proj.out_features // attn.head_dim))


def edit_attention_heads(attn: nn.Module, removed: Sequence[int], *, share: bool) -> nn.Module:
    """Clone of a Llama-style attention without the query heads ``removed`` (original numbering).

    Works on an already pruned (or masked) module too: it remembers the original heads it holds in
    ``shedder_heads``. KV heads left without queries go as well.
    """
    hd = attn.head_dim
    held = held_heads(attn)
    kept = kept_positions(held, removed)
    new = prune_attention_heads(attn, kept, len(held), attn.k_proj.out_features // hd, share=share)
    new.shedder_heads = tuple(held[k] for k in kept)
    return new


# ---------------------------------------------------------------------------- MLP channels
def prune_mlp_channels(
    mlp: nn.Module, kept: Sequence[int], *, share: bool, in_names: Sequence[str], out_name: str = "down_proj"
) -> nn.Module:
    """Clone of an MLP keeping hidden channels ``kept`` (rows of ``in_names``, columns of ``out_name``)."""
    new = shallow_clone(mlp)
    for name in in_names:
        setattr(new, name, select_linear(getattr(mlp, name), rows=kept, share=share))
    setattr(new, out_name, select_linear(getattr(mlp, out_name), cols=kept, share=share))
    if isinstance(getattr(mlp, "intermediate_size", None), int):
        new.intermediate_size = len(kept)
    return new


def edit_mlp_channels(mlp: nn.Module, removed: Sequence[int], *, share: bool,
                      in_names: Sequence[str] = ("gate_proj", "up_proj"), out_name: str = "down_proj") -> nn.Module:
    """Clone of an MLP without the hidden channels ``removed`` (original numbering; works on pruned ones too)."""
    held = getattr(mlp, "shedder_channels", None)
    held = tuple(held) if held is not None else tuple(range(getattr(mlp, out_name).in_features))
    kept = kept_positions(held, removed)
    new = prune_mlp_channels(mlp, kept, share=share, in_names=in_names, out_name=out_name)
    new.shedder_channels = tuple(held[k] for k in kept)
    return new


def kept_positions(current: Sequence[int], removed_original: Sequence[int]) -> list[int]:
    """Positions (in the current, possibly already pruned, module) of the entries not removed.

    ``current`` lists the original indices a module still holds, in order.
    """
    gone = set(removed_original)
    return [pos for pos, orig in enumerate(current) if orig not in gone]
