"""Hymba hybrid-head language model, written for hf_shedder.

Each decoder layer runs one *hybrid-head module* (attribute ``mamba``, as in the
published checkpoints): a single input projection feeds attention heads and a Mamba
selective SSM side by side; both outputs are RMS-normalised, averaged and projected
back.  A gated MLP (``moe.experts.0``) follows.  Learned meta tokens are prepended to
every sequence, most layers use sliding-window attention, and layers in a
``kv_reuse_group`` reuse the keys/values of the group's first layer.

Parameter names match the published remote code, so its checkpoints load without
missing or unexpected keys.  The module also keeps a few plain attributes that the
hf_shedder Hymba adapter uses to switch parts off (reversibly, for the search) and
to describe physically pruned shapes; with their defaults the model is the stock
architecture.

Attention is always computed with ``torch.nn.functional.scaled_dot_product_attention``
and an explicit mask over *slots* (meta tokens first, then tokens), so the same code
serves CPU and GPU, training, prefill and cached decoding.  The SSM uses the
``mamba-ssm`` / ``causal-conv1d`` CUDA kernels when they are importable and the
weights live on a GPU, otherwise a plain PyTorch scan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel

from ...compat import CACHE_KWARG
from .configuration_hymba import HymbaConfig

try:  # optional CUDA kernels
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _kernel_scan
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update as _kernel_scan_step
except ImportError:  # pragma: no cover - depends on the machine
    _kernel_scan = _kernel_scan_step = None
try:
    from causal_conv1d import causal_conv1d_fn as _kernel_conv
    from causal_conv1d import causal_conv1d_update as _kernel_conv_step
except ImportError:  # pragma: no cover - depends on the machine
    _kernel_conv = _kernel_conv_step = None


def kernels_available() -> bool:
    """Whether the mamba-ssm and causal-conv1d CUDA kernels can be used."""
    return None not in (_kernel_scan, _kernel_scan_step, _kernel_conv, _kernel_conv_step)


# --------------------------------------------------------------------------- norms


class HymbaRMSNorm(nn.Module):
    """RMS norm; ``mean_over`` lets a pruned (narrower) norm keep its original divisor."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps
        self.mean_over: int | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        x = hidden_states.float()
        if self.mean_over is None:
            variance = x.pow(2).mean(-1, keepdim=True)
        else:
            variance = x.pow(2).sum(-1, keepdim=True) / self.mean_over
        x = x * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * x.to(dtype)


class HymbaPerHeadRMSNorm(nn.Module):
    """RMS norm over the head dimension with one weight vector per head; input (b, heads, len, dim)."""

    def __init__(self, head_dim: int, num_heads: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1, num_heads, 1, head_dim))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        x = hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


# --------------------------------------------------------------------------- rotary


class HymbaRotary(nn.Module):
    """Rotary position embedding with Hymba's "default", "ntk" and "dynamic_ntk" variants.

    No buffers: the frequencies are a few numbers, recomputed per call, which keeps
    meta-device construction and pruning simple.
    """

    _NTK_FACTOR = 2

    def __init__(self, config: HymbaConfig, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.base = float(config.rope_theta)
        self.rope_type = config.rope_type or "default"
        self.max_positions = config.max_position_embeddings
        self.orig_max_positions = config.orig_max_position_embeddings
        # dynamic NTK widens the base once positions exceed what it has seen so far
        self._dynamic_len = self.orig_max_positions

    def _frequencies(self, base: float, device: torch.device) -> torch.Tensor:
        exponents = torch.arange(0, self.dim, 2, dtype=torch.int64, device=device).float() / self.dim
        return 1.0 / (base**exponents)

    def _scaled_base(self, length: float) -> float:
        growth = self._NTK_FACTOR * length / self.orig_max_positions - (self._NTK_FACTOR - 1)
        return self.base * growth ** (self.dim / (self.dim - 2))

    def inv_freq(self, positions: torch.Tensor) -> torch.Tensor:
        device = positions.device
        if self.rope_type == "ntk":
            return self._frequencies(self._scaled_base(self.max_positions), device)
        if self.rope_type == "dynamic_ntk":
            seen = int(positions.max()) + 1
            if seen > self._dynamic_len:
                self._dynamic_len = seen
            elif seen < self.orig_max_positions:
                self._dynamic_len = self.orig_max_positions
            if self._dynamic_len > self.orig_max_positions:
                return self._frequencies(self._scaled_base(self._dynamic_len), device)
        return self._frequencies(self.base, device)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[..., None] * self.inv_freq(positions)  # (b, len, dim/2)
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


# --------------------------------------------------------------------------- cache


class HymbaCache:
    """Generation state: per layer keys/values (with their slot numbers) and SSM states.

    Sliding-window layers keep only the meta tokens and the last ``sliding_window``
    slots.  ``get_seq_length`` counts real tokens (meta tokens excluded), which is
    what ``generate`` expects.
    """

    is_compileable = False

    def __init__(self, num_layers: int, num_meta_tokens: int) -> None:
        self.num_meta_tokens = num_meta_tokens
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.key_slots: list[torch.Tensor | None] = [None] * num_layers
        self.conv_states: list[torch.Tensor | None] = [None] * num_layers
        self.ssm_states: list[torch.Tensor | None] = [None] * num_layers
        self.seen_slots = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(self.seen_slots - self.num_meta_tokens, 0)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for store in (self.keys, self.values, self.conv_states, self.ssm_states):
            for i, t in enumerate(store):
                if t is not None:
                    store[i] = t.index_select(0, beam_idx.to(t.device))

    def __len__(self) -> int:
        return len(self.keys)


@dataclass
class HymbaForwardContext:
    """What every layer of one forward pass shares (positions, masks, reused keys/values)."""

    positions: torch.Tensor  # (b, len) rotary positions of the current slots
    query_slots: torch.Tensor  # (len,) slot numbers of the current slots
    slot_valid: torch.Tensor | None  # (b, total slots) False on padding, None: no padding
    token_mask: torch.Tensor | None  # (b, len) 1/0 padding mask of the current slots
    num_meta_tokens: int
    cache: HymbaCache | None = None
    shared_kv: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    strip_meta: bool = False


# --------------------------------------------------------------------------- attention


class HymbaAttention(nn.Module):
    """Attention heads of a hybrid-head module.  Projections live in the block's ``in_proj``."""

    def __init__(self, config: HymbaConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.v_head_dim = config.v_head_dim
        self.is_global = config.is_global_layer(layer_idx)
        self.sliding_window = config.sliding_window
        self.dropout = config.attention_dropout
        # which stored key/value head each query head reads; None: the usual GQA grouping
        self.kv_map: tuple[int, ...] | None = None
        self.q_norm: nn.Module | None = None
        self.k_norm: nn.Module | None = None
        if config.kq_norm == "rms":
            self.q_norm = HymbaRMSNorm(self.head_dim)
            self.k_norm = HymbaRMSNorm(self.head_dim)
        elif config.kq_norm == "perhead-rms":
            self.k_norm = HymbaPerHeadRMSNorm(self.head_dim, self.num_kv_heads)
            self.q_norm = HymbaPerHeadRMSNorm(self.head_dim, self.num_heads)
        self.rotary_emb = HymbaRotary(config, self.head_dim) if config.rope else None

    def project_kv(
        self, key: torch.Tensor, value: torch.Tensor, ctx: HymbaForwardContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, _ = key.shape
        key = key.view(b, n, -1, self.head_dim).transpose(1, 2)
        value = value.view(b, n, -1, self.v_head_dim).transpose(1, 2)
        if self.k_norm is not None:
            key = self.k_norm(key)
        if self.rotary_emb is not None:
            cos, sin = self.rotary_emb(ctx.positions, key.dtype)
            key = _rotate(key, cos, sin)
        return key, value

    def attend(
        self,
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        key_slots: torch.Tensor,
        ctx: HymbaForwardContext,
    ) -> torch.Tensor:
        """query (b, len, heads*head_dim) -> (b, len, heads*v_head_dim)."""
        b, n, _ = query.shape
        query = query.view(b, n, -1, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            query = self.q_norm(query)
        if self.rotary_emb is not None:
            cos, sin = self.rotary_emb(ctx.positions, query.dtype)
            query = _rotate(query, cos, sin)
        heads = query.shape[1]
        if self.kv_map is not None:
            index = torch.tensor(self.kv_map, device=keys.device)
            keys, values = keys.index_select(1, index), values.index_select(1, index)
        elif heads != keys.shape[1]:
            keys = keys.repeat_interleave(heads // keys.shape[1], dim=1)
            values = values.repeat_interleave(heads // values.shape[1], dim=1)
        mask = self._mask(key_slots, ctx)
        out = F.scaled_dot_product_attention(
            query, keys, values, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        return out.transpose(1, 2).reshape(b, n, heads * self.v_head_dim)

    def _mask(self, key_slots: torch.Tensor, ctx: HymbaForwardContext) -> torch.Tensor | None:
        q = ctx.query_slots[:, None]
        k = key_slots[None, :]
        allowed = k <= q
        if not self.is_global:
            allowed = allowed & ((q - k <= self.sliding_window) | (k < ctx.num_meta_tokens))
        allowed = allowed[None, None]  # (1, 1, q, k)
        if ctx.slot_valid is not None:
            allowed = allowed & ctx.slot_valid[:, key_slots][:, None, None, :]
        if ctx.slot_valid is None and bool(allowed.all()):
            return None
        return allowed


# --------------------------------------------------------------------------- SSM maths


def _conv_plain(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: torch.Tensor | None, act
) -> torch.Tensor:
    """Depthwise causal conv of x (b, d, len); ``state`` holds the previous inputs (b, d, k)."""
    k, n = weight.shape[-1], x.shape[-1]
    if state is None:
        padded = F.pad(x, (k - 1, 0))
    else:
        padded = torch.cat([state[..., 1:].to(x.dtype), x], dim=-1)
    # k shifted multiply-adds: same result as a grouped conv1d, and far faster than
    # oneDNN's depthwise conv for these shapes on CPU
    out = sum(padded[..., j : j + n] * weight[:, j, None] for j in range(k))
    if bias is not None:
        out = out + bias[:, None]
    return act(out)


def _next_conv_state(x: torch.Tensor, state: torch.Tensor | None, k: int) -> torch.Tensor:
    history = x if state is None else torch.cat([state.to(x.dtype), x], dim=-1)
    if history.shape[-1] < k:
        history = F.pad(history, (k - history.shape[-1], 0))
    return history[..., -k:].contiguous()


def selective_scan_plain(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    z: torch.Tensor,
    delta_bias: torch.Tensor | None,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba-1 selective scan in float32.

    u, delta, z: (b, d, len); A: (d, n); B, C: (b, n, len); D, delta_bias: (d,).
    Returns y (b, d, len) in u's dtype and the last state (b, d, n) in float32.
    """
    dtype = u.dtype
    u, delta = u.float(), delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[None, :, None]
    delta = F.softplus(delta)
    B, C = B.float(), C.float()
    decay = torch.exp(delta.unsqueeze(-1) * A.float()[None, :, None, :])  # (b, d, len, n)
    drive = (delta * u).unsqueeze(-1) * B.transpose(1, 2)[:, None]  # (b, d, len, n)
    h = torch.zeros_like(decay[:, :, 0]) if state is None else state.float()
    ys = []
    for t in range(u.shape[-1]):
        h = decay[:, :, t] * h + drive[:, :, t]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, t]))
    y = torch.stack(ys, dim=-1) + u * D.float()[None, :, None]
    y = y * F.silu(z.float())
    return y.to(dtype), h


# --------------------------------------------------------------------------- hybrid-head module


class HymbaBlock(nn.Module):
    """Hybrid-head module: attention heads and a Mamba SSM over the same input.

    ``in_proj`` output layout: [query | key | value | ssm input | ssm gate]; layers that
    reuse another layer's keys/values have no key/value part.  Attention output
    (heads * v_head_dim) and SSM output share one ``fused_size``-wide space; each is
    RMS-normalised there and the two are averaged before ``out_proj``.
    """

    def __init__(self, config: HymbaConfig, layer_idx: int, reuse_kv: bool) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.reuse_kv = reuse_kv
        hidden = config.hidden_size
        inner = config.ssm_intermediate_size
        kv_heads = config.num_key_value_heads
        self.fused_size = inner
        self.q_size = hidden
        self.k_size = 0 if reuse_kv else kv_heads * config.head_dim
        self.v_size = 0 if reuse_kv else kv_heads * config.v_head_dim
        self.ssm_size = inner
        self.ssm_state_size = config.mamba_d_state
        self.conv_kernel_size = config.mamba_d_conv
        self.time_step_rank = config.mamba_dt_rank
        self.activation = config.hidden_act
        self.act = ACT2FN[config.hidden_act]
        self.use_kernels = config.use_mamba_kernels

        # fused-space positions of each branch's output; None: all of them, in order
        self.attn_out_index: tuple[int, ...] | None = None
        self.ssm_out_index: tuple[int, ...] | None = None
        # reversible switches used by the pruning search (see hf_shedder.arch.hymba)
        self.attn_off = False
        self.ssm_off = False
        self.conv_passthrough = False  # physically pruned both branches (see forward)
        self.attn_head_mask: torch.Tensor | None = None
        self.ssm_channel_mask: torch.Tensor | None = None
        # set by HymbaModel once all layers exist
        self._producer: int | None = None
        self._may_trim_cache = False

        self.self_attn = HymbaAttention(config, layer_idx)
        self.in_proj = nn.Linear(hidden, self.q_size + self.k_size + self.v_size + 2 * inner, bias=config.mamba_proj_bias)
        self.out_proj = nn.Linear(inner, hidden, bias=config.mamba_proj_bias)
        self.pre_avg_layernorm1 = HymbaRMSNorm(inner, eps=config.rms_norm_eps)
        self.pre_avg_layernorm2 = HymbaRMSNorm(inner, eps=config.rms_norm_eps)
        self.conv1d = nn.Conv1d(
            inner,
            inner,
            kernel_size=self.conv_kernel_size,
            groups=inner,
            padding=self.conv_kernel_size - 1,
            bias=config.mamba_conv_bias,
        )
        # single-entry lists: the published checkpoints name these "x_proj.0", "A_log.0", ...
        self.x_proj = nn.ModuleList([nn.Linear(inner, self.time_step_rank + 2 * self.ssm_state_size, bias=False)])
        self.dt_proj = nn.ModuleList([nn.Linear(self.time_step_rank, inner, bias=True)])
        A = torch.arange(1, self.ssm_state_size + 1, dtype=torch.float32).expand(inner, -1)
        self.A_log = nn.ParameterList([nn.Parameter(torch.log(A).contiguous())])
        self.D = nn.ParameterList([nn.Parameter(torch.ones(inner))])
        if config.mamba_inner_layernorms:
            self.dt_layernorm = HymbaRMSNorm(self.time_step_rank, eps=config.rms_norm_eps)
            self.B_layernorm = HymbaRMSNorm(self.ssm_state_size, eps=config.rms_norm_eps)
            self.C_layernorm = HymbaRMSNorm(self.ssm_state_size, eps=config.rms_norm_eps)
        else:
            self.dt_layernorm = self.B_layernorm = self.C_layernorm = None

    # -- helpers -------------------------------------------------------------

    @property
    def has_attn(self) -> bool:
        return self.q_size > 0

    @property
    def has_ssm(self) -> bool:
        return self.ssm_size > 0

    def _split(self, projected: torch.Tensor) -> list[torch.Tensor]:
        sizes = [self.q_size, self.k_size, self.v_size, self.ssm_size, self.ssm_size]
        return list(torch.split(projected, sizes, dim=-1))

    def _place(self, branch: torch.Tensor, index: tuple[int, ...] | None) -> torch.Tensor:
        if index is None:
            return branch
        full = branch.new_zeros(*branch.shape[:-1], self.fused_size)
        return full.index_copy(-1, torch.tensor(index, device=branch.device), branch)

    def _kernels_usable(self, x: torch.Tensor) -> bool:
        return self.use_kernels and x.is_cuda and kernels_available() and self.activation in ("silu", "swish")

    # -- branches ------------------------------------------------------------

    def _attention(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, ctx: HymbaForwardContext, need_out: bool
    ) -> torch.Tensor | None:
        attn = self.self_attn
        if self.k_size:
            k_new, v_new = attn.project_kv(key, value, ctx)
            cache = ctx.cache
            if cache is not None and cache.keys[self.layer_idx] is not None:
                keys = torch.cat([cache.keys[self.layer_idx], k_new], dim=2)
                values = torch.cat([cache.values[self.layer_idx], v_new], dim=2)
                slots = torch.cat([cache.key_slots[self.layer_idx], ctx.query_slots])
            else:
                keys, values, slots = k_new, v_new, ctx.query_slots
            ctx.shared_kv[self.layer_idx] = (keys, values, slots)
            if cache is not None:
                self._store_kv(cache, keys, values, slots, ctx)
        if not need_out:
            return None
        if not self.k_size:
            if not self.reuse_kv:
                return None
            keys, values, slots = ctx.shared_kv[self._producer]
        out = attn.attend(query, keys, values, slots, ctx)
        if self.attn_head_mask is not None:
            b, n, _ = out.shape
            mask = self.attn_head_mask.to(out.dtype)[None, None, :, None]
            out = (out.view(b, n, -1, attn.v_head_dim) * mask).view(b, n, -1)
        return out

    def _store_kv(
        self, cache: HymbaCache, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor, ctx: HymbaForwardContext
    ) -> None:
        if self._may_trim_cache:
            horizon = int(ctx.query_slots[-1]) + 1 - self.self_attn.sliding_window
            keep = (slots >= horizon) | (slots < ctx.num_meta_tokens)
            if not bool(keep.all()):
                keys, values, slots = keys[:, :, keep], values[:, :, keep], slots[keep]
        cache.keys[self.layer_idx], cache.values[self.layer_idx] = keys, values
        cache.key_slots[self.layer_idx] = slots

    def _ssm(self, x: torch.Tensor, gate: torch.Tensor, ctx: HymbaForwardContext, conv_only: bool = False) -> torch.Tensor:
        """x, gate: (b, len, ssm_size) -> (b, len, ssm_size); ``conv_only``: the convolved input, no scan."""
        cache = ctx.cache
        x, gate = x.transpose(1, 2), gate.transpose(1, 2)
        if ctx.token_mask is not None:
            x = x * ctx.token_mask[:, None, :].to(x.dtype)
        conv_state = cache.conv_states[self.layer_idx] if cache is not None else None
        weight = self.conv1d.weight.view(self.conv1d.weight.shape[0], -1)
        fast = self._kernels_usable(x)
        n = x.shape[-1]
        if fast and conv_state is not None and n == 1:
            x = _kernel_conv_step(x[..., 0], conv_state, weight, self.conv1d.bias, self.activation).unsqueeze(-1)
        else:
            if cache is not None:
                cache.conv_states[self.layer_idx] = _next_conv_state(x, conv_state, self.conv_kernel_size)
            if fast and conv_state is None:
                x = _kernel_conv(x, weight, self.conv1d.bias, activation=self.activation)
            else:
                x = _conv_plain(x, weight, self.conv1d.bias, conv_state, self.act)
        if ctx.token_mask is not None:
            x = x * ctx.token_mask[:, None, :].to(x.dtype)
        if self.ssm_channel_mask is not None:
            # a switched-off channel must not feed x_proj either: zero its input
            x = x * self.ssm_channel_mask.to(x.dtype)[None, :, None]
        if conv_only:
            return x.transpose(1, 2)

        params = self.x_proj[0](x.transpose(1, 2))
        time_step, B, C = torch.split(params, [self.time_step_rank, self.ssm_state_size, self.ssm_state_size], -1)
        if self.dt_layernorm is not None:
            time_step, B, C = self.dt_layernorm(time_step), self.B_layernorm(B), self.C_layernorm(C)
        dt_lin = self.dt_proj[0]
        if isinstance(dt_lin, nn.Linear):
            delta, dt_bias = F.linear(time_step, dt_lin.weight), dt_lin.bias
        else:  # wrapped (e.g. by PEFT): the wrapper adds the base bias, which the scan adds itself
            dt_bias = dt_lin.base_layer.bias
            delta = dt_lin(time_step) - dt_bias
        delta = delta.transpose(1, 2)
        A = -torch.exp(self.A_log[0].float())
        D = self.D[0]
        ssm_state = cache.ssm_states[self.layer_idx] if cache is not None else None
        bias32 = dt_bias.float() if dt_bias is not None else None
        if fast and ssm_state is not None and n == 1:
            y = _kernel_scan_step(
                ssm_state, x[..., 0], delta[..., 0], A, B[:, 0], C[:, 0], D, z=gate[..., 0],
                dt_bias=bias32, dt_softplus=True,
            ).unsqueeze(-1)
        elif fast and ssm_state is None:
            y, last = _kernel_scan(
                x, delta, A, B.transpose(1, 2), C.transpose(1, 2), D.float(), z=gate,
                delta_bias=bias32, delta_softplus=True, return_last_state=True,
            )
            if cache is not None:
                cache.ssm_states[self.layer_idx] = last
        else:
            y, last = selective_scan_plain(x, delta, A, B.transpose(1, 2), C.transpose(1, 2), D, gate, bias32, ssm_state)
            if cache is not None:
                cache.ssm_states[self.layer_idx] = last
        return y.transpose(1, 2)

    # -- forward -------------------------------------------------------------

    def forward(self, hidden_states: torch.Tensor, ctx: HymbaForwardContext) -> torch.Tensor:
        query, key, value, x, gate = self._split(self.in_proj(hidden_states))
        use_attn = self.has_attn and not self.attn_off
        use_ssm = self.has_ssm and not self.ssm_off
        if self.conv_passthrough or (self.attn_off and self.ssm_off and self.has_ssm):
            # both branches removed: Mamba-Shedder's Hymba patch then feeds the convolved SSM input
            # straight to out_proj (attention still runs for the layers reusing its keys/values)
            self._attention(query, key, value, ctx, need_out=False)
            return self.out_proj(self._ssm(x, gate, ctx, conv_only=True))
        attn_out = self._attention(query, key, value, ctx, need_out=use_attn)
        ssm_out = self._ssm(x, gate, ctx) if use_ssm else None
        parts = []
        if attn_out is not None:
            parts.append(self._place(self.pre_avg_layernorm1(attn_out), self.attn_out_index))
        if ssm_out is not None:
            parts.append(self._place(self.pre_avg_layernorm2(ssm_out), self.ssm_out_index))
        if not parts:
            return hidden_states.new_zeros(hidden_states.shape)
        fused = parts[0] if len(parts) == 1 else (parts[0] + parts[1]) / 2
        return self.out_proj(fused)



# --------------------------------------------------------------------------- MLP and layer


class HymbaMLP(nn.Module):
    def __init__(self, config: HymbaConfig) -> None:
        super().__init__()
        self.act_name = config.mlp_hidden_act
        self.act_fn = ACT2FN[self.act_name]
        hidden, inter = config.hidden_size, config.intermediate_size
        if self.act_name == "silu":
            self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.channel_mask: torch.Tensor | None = None  # reversible switch for the pruning search

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_name == "silu":
            h = self.act_fn(self.gate_proj(x)) * self.up_proj(x)
        else:
            h = self.act_fn(self.up_proj(x))
        if self.channel_mask is not None:
            h = h * self.channel_mask.to(h.dtype)
        return self.down_proj(h)


class HymbaMoE(nn.Module):
    """Holder for the single MLP ("experts.0"), named as in the published checkpoints."""

    def __init__(self, config: HymbaConfig) -> None:
        super().__init__()
        self.experts = nn.ModuleList([HymbaMLP(config)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.experts[0](x)


class HymbaDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: HymbaConfig, layer_idx: int, reuse_kv: bool) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm: HymbaRMSNorm | None = HymbaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mamba: HymbaBlock | None = HymbaBlock(config, layer_idx, reuse_kv)
        self.moe: HymbaMoE | None = None
        self.pre_moe_layernorm: HymbaRMSNorm | None = None
        if config.intermediate_size > 0:
            self.moe = HymbaMoE(config)
            self.pre_moe_layernorm = HymbaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        # reversible switches used by the pruning search
        self.mixer_off = False
        self.mlp_off = False

    def forward(self, hidden_states: torch.Tensor, ctx: HymbaForwardContext) -> torch.Tensor:
        if self.mamba is not None and not self.mixer_off:
            hidden_states = hidden_states + self.mamba(self.input_layernorm(hidden_states), ctx)
        if self.moe is not None and not self.mlp_off:
            hidden_states = hidden_states + self.moe(self.pre_moe_layernorm(hidden_states))
        return hidden_states


# --------------------------------------------------------------------------- models


class HymbaPreTrainedModel(PreTrainedModel):
    config_class = HymbaConfig
    config: HymbaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HymbaDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_sdpa = True
    _is_stateful = True

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # Hymba needs its own cache (SSM states, meta tokens); the model creates it
        return False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, HymbaBlock):
            A = torch.arange(1, module.ssm_state_size + 1, dtype=torch.float32).expand(module.A_log[0].shape[0], -1)
            init.copy_(module.A_log[0], torch.log(A))
            init.ones_(module.D[0])
        elif isinstance(module, HymbaPerHeadRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, HymbaModel) and module.memory_tokens is not None:
            init.normal_(module.memory_tokens, mean=0.0, std=std)


class HymbaModel(HymbaPreTrainedModel):
    def __init__(self, config: HymbaConfig) -> None:
        super().__init__(config)
        config.validate_architecture()
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        producers = config.kv_producer_of()
        self.layers = nn.ModuleList(
            HymbaDecoderLayer(config, i, reuse_kv=producers[i] is not None) for i in range(config.num_hidden_layers)
        )
        self.final_layernorm = HymbaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.num_meta_tokens = config.num_memory_tokens
        self.memory_tokens: nn.Parameter | None = None
        if self.num_meta_tokens > 0:
            self.memory_tokens = nn.Parameter(torch.randn(self.num_meta_tokens, config.hidden_size))
        self._wire_kv_sharing(producers)
        self.gradient_checkpointing = False
        self.post_init()

    def _wire_kv_sharing(self, producers: Sequence[int | None]) -> None:
        consumers: dict[int, list[int]] = {}
        for layer, producer in enumerate(producers):
            if producer is not None:
                consumers.setdefault(producer, []).append(layer)
        for i, layer in enumerate(self.layers):
            block = layer.mamba
            block._producer = producers[i]
            users = [i, *consumers.get(i, [])]
            # a window-trimmed cache is only safe if every reader of it is a window layer
            block._may_trim_cache = not any(self.config.is_global_layer(u) for u in users)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    # The three steps below are public so that layer-wise callers (the pruning search)
    # can run the model one layer at a time.

    def prepare(
        self,
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: HymbaCache | None = None,
    ) -> tuple[torch.Tensor, HymbaForwardContext]:
        """Embed tokens, prepend meta tokens on a first pass, and build the shared context."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        b, n = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        first_pass = cache is None or cache.seen_slots == 0
        meta = self.num_meta_tokens if first_pass else 0
        hidden = inputs_embeds
        if meta:
            memory = self.memory_tokens.to(inputs_embeds.dtype)[None].expand(b, -1, -1)
            hidden = torch.cat([memory, inputs_embeds], dim=1)
        start = 0 if cache is None else cache.seen_slots
        query_slots = torch.arange(start, start + meta + n, device=device)
        if position_ids is None:
            positions = query_slots[None].expand(b, -1)
        else:
            positions = position_ids.to(device).view(-1, n).expand(b, -1) + self.num_meta_tokens
            if meta:
                meta_pos = torch.arange(meta, device=device)[None].expand(b, -1)
                positions = torch.cat([meta_pos, positions], dim=1)
        slot_valid = token_mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            if attention_mask.dim() != 2:
                raise ValueError("attention_mask must be a 2-D (batch, tokens) padding mask")
            total_tokens = start + meta + n - self.num_meta_tokens
            if attention_mask.shape[1] != total_tokens:
                raise ValueError(
                    f"attention_mask covers {attention_mask.shape[1]} tokens but {total_tokens} tokens "
                    "(cached + new) are in play; pass the mask for the whole sequence"
                )
            ones = attention_mask.new_ones(b, self.num_meta_tokens)
            slot_valid = torch.cat([ones, attention_mask], dim=1).to(device=device, dtype=torch.bool)
            token_mask = slot_valid[:, start : start + meta + n]
        ctx = HymbaForwardContext(
            positions=positions,
            query_slots=query_slots,
            slot_valid=slot_valid,
            token_mask=token_mask,
            num_meta_tokens=self.num_meta_tokens,
            cache=cache,
            strip_meta=bool(meta),
        )
        return hidden, ctx

    def finish(self, hidden_states: torch.Tensor, ctx: HymbaForwardContext) -> torch.Tensor:
        """Final norm; drop the meta-token positions; advance the cache."""
        hidden_states = self.final_layernorm(hidden_states)
        if ctx.cache is not None:
            ctx.cache.seen_slots += int(ctx.query_slots.numel())
        if ctx.strip_meta:
            hidden_states = hidden_states[:, self.num_meta_tokens :]
        return hidden_states

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: HymbaCache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: HymbaCache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        # ``generate`` hands the cache back as ``cache`` (newer Transformers) or ``past_key_values`` (5.17).
        past_key_values = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        if use_cache and past_key_values is None:
            past_key_values = HymbaCache(len(self.layers), self.num_meta_tokens)
        cache = past_key_values if use_cache else None
        hidden, ctx = self.prepare(input_ids, inputs_embeds, attention_mask, position_ids, cache)
        skip = self.num_meta_tokens if ctx.strip_meta else 0
        all_hidden = [] if output_hidden_states else None
        for layer in self.layers:
            if all_hidden is not None:
                all_hidden.append(hidden[:, skip:])
            hidden = layer(hidden, ctx)
        hidden = self.finish(hidden, ctx)
        if all_hidden is not None:
            all_hidden.append(hidden)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            **{CACHE_KWARG: cache},
        )


class HymbaForCausalLM(HymbaPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: HymbaConfig) -> None:
        super().__init__(config)
        self.model = HymbaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: HymbaCache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: HymbaCache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        hidden = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            **{CACHE_KWARG: getattr(outputs, CACHE_KWARG)},
        )


__all__ = [
    "HymbaBlock",
    "HymbaCache",
    "HymbaDecoderLayer",
    "HymbaForCausalLM",
    "HymbaForwardContext",
    "HymbaMLP",
    "HymbaModel",
    "HymbaPreTrainedModel",
    "kernels_available",
    "selective_scan_plain",
]
