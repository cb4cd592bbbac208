"""Mamba-2's chunked scan (SSD) in PyTorch with memory that grows linearly with the sequence.

Why: without mamba-ssm (every CPU run), Transformers' reference scan materialises the states of every
chunk against every other chunk, ``[batch, chunks+1, chunks+1, heads, head_dim, state]``, and the
chunk-pair products ``[batch, chunks, chunk, chunk, heads, state]``. For the bundled Mamba-2 reference
model at 2048 tokens (128 chunks of 16) and batch 8 that is 6.5 GB, which made ``hf-shedder eval`` on
CPU peak at 7.5 GB. Here the chunks are visited in order and only the running state is carried:
memory per step is one chunk's ``[batch, chunk, chunk, heads]`` and the ``[batch, heads, head_dim,
state]`` state. Same arguments and result as Transformers' ``mamba2_chunk_scan`` without a cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_scan_bytes(batch: int, length: int, heads: int, head_dim: int, state: int, chunk: int) -> int:
    """The largest intermediate of Transformers' reference scan, in bytes (fp32)."""
    chunks = -(-length // chunk)
    return 4 * batch * heads * max((chunks + 1) ** 2 * head_dim * state, chunks * chunk * chunk * state)


def lean_chunk_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
) -> torch.Tensor:
    """y for x [b, l, h, p], dt [b, l, h], A [h], B/C [b, l, g, n] (softplus on dt + dt_bias, as the mixer)."""
    batch, length, heads, head_dim = x.shape
    per_group = heads // B.shape[2]
    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)
    dt = torch.clamp(F.softplus(dt), min=dt_limit[0], max=dt_limit[1]).float()
    x = x.float()
    B = B.float().repeat_interleave(per_group, dim=2)
    C = C.float().repeat_interleave(per_group, dim=2)
    out = D.float()[:, None] * x if D is not None else torch.zeros_like(x)
    x_dt = x * dt[..., None]
    log_decay = A.float() * dt  # [b, l, h], <= 0
    state = x.new_zeros(batch, heads, head_dim, B.shape[-1])
    for start in range(0, length, chunk_size):
        part = slice(start, start + chunk_size)
        cum = log_decay[:, part].cumsum(dim=1)  # [b, q, h]
        q = cum.shape[1]
        causal = torch.ones(q, q, dtype=torch.bool, device=x.device).tril()[None, :, :, None]
        within = torch.exp((cum[:, :, None] - cum[:, None]).masked_fill(~causal, float("-inf")))  # [b, t, s, h]
        scores = torch.einsum("bthn,bshn->btsh", C[:, part], B[:, part]) * within
        y = torch.einsum("btsh,bshp->bthp", scores, x_dt[:, part])
        y = y + torch.einsum("bthn,bhpn->bthp", C[:, part], state) * torch.exp(cum)[..., None]
        out[:, part] += y
        to_end = torch.exp(cum[:, -1:] - cum)  # decay from each position to the chunk's end
        state = state * torch.exp(cum[:, -1])[:, :, None, None] + torch.einsum(
            "bsh,bshn,bshp->bhpn", to_end, B[:, part], x_dt[:, part])
    return out
