"""Mamba mixers with the selective SSM removed, as Mamba-Shedder defines SSM removal.

Mamba-1 (``MambaMixer``, ``FalconMambaMixer``), per token t with x, z = in_proj(h):

    full:        y_t = (SSM(u)_t + D * u_t) * silu(z_t),   u = silu(conv1d(x))
    SSM removed: y_t = u_t * silu(z_t)                      (the scan and its D skip are gone)
    out_t = out_proj(y_t)

Mamba-2 (``Mamba2Mixer``), with z, xBC, dt = in_proj(h) and u = silu(conv1d(xBC))[..., :d_inner]:

    full:        y_t = RMSNormGated(SSD(u, dt, A, B, C)_t + D * u_t, gate=z_t)
    SSM removed: y_t = RMSNormGated(u_t, gate=z_t)
    out_t = out_proj(y_t)

(the reference's ``y = x`` in the scan's place, with ``D`` and ``dt_bias`` deleted). Physical removal
also drops what only the scan used: ``x_proj``, ``dt_proj``, ``A_log``, ``D`` (Mamba-1); ``A_log``,
``D``, ``dt_bias``, the B/C/dt rows of ``in_proj`` and the B/C channels of ``conv1d`` (Mamba-2).

One module serves both the search (``share=True``: its weights are views of the original mixer's,
no copies) and extraction (``share=False``: smaller, independent weights), so masked and physically
pruned models run the same code.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.models.mamba2.modeling_mamba2 import (
    apply_mask_to_padding_states,
    causal_conv1d_fn,
    causal_conv1d_update,
)

from ..compat import pop_cache
from .fused_mixers import fused_kernels_for, gated_rms_norm


def _param(t: torch.Tensor, share: bool) -> nn.Parameter:
    t = t.detach()
    return nn.Parameter(t if share else t.clone(), requires_grad=not share)


class SSMFreeMixer(nn.Module):
    """Gated convolution left of a Mamba mixer whose selective scan was removed.

    ``variant`` is ``"mamba1"`` (in_proj rows = [x, z], y = u * act(z)) or ``"mamba2"``
    (in_proj rows = [z, x], y = norm(u, gate=z)).
    """

    def __init__(
        self,
        variant: str,
        hidden_size: int,
        inner_size: int,
        conv_kernel: int,
        activation: str,
        layer_idx: int,
        use_bias: bool,
        use_conv_bias: bool,
        norm: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if variant not in ("mamba1", "mamba2"):
            raise ValueError(f"unknown SSM-free variant {variant!r}")
        self.variant = variant
        self.hidden_size = hidden_size
        self.intermediate_size = inner_size
        self.conv_kernel_size = conv_kernel
        self.activation = activation
        self.act = ACT2FN[activation]
        self.layer_idx = layer_idx
        self.in_proj = nn.Linear(hidden_size, 2 * inner_size, bias=use_bias)
        self.conv1d = nn.Conv1d(
            inner_size, inner_size, kernel_size=conv_kernel, groups=inner_size,
            padding=conv_kernel - 1, bias=use_conv_bias,
        )
        if variant == "mamba2":
            if norm is None:
                raise ValueError("the mamba2 variant needs the mixer's gated RMSNorm")
            self.norm = norm
        self.out_proj = nn.Linear(inner_size, hidden_size, bias=use_bias)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_mixer(cls, mixer: nn.Module, variant: str, share: bool) -> SSMFreeMixer:
        """Build from a full mixer. ``share=True`` keeps views of its weights (search-time mask)."""
        inner = mixer.intermediate_size
        with torch.device("meta"):
            new = cls(
                variant,
                mixer.hidden_size,
                inner,
                mixer.conv_kernel_size,
                mixer.activation,
                mixer.layer_idx,
                use_bias=mixer.in_proj.bias is not None,
                use_conv_bias=mixer.conv1d.bias is not None,
                norm=nn.Identity() if variant == "mamba2" else None,
            )
        # Rows kept from in_proj: Mamba-1 is [x, z] already; Mamba-2 is [z, x, B, C, dt] -> first 2*inner.
        new.in_proj.weight = _param(mixer.in_proj.weight[: 2 * inner], share)
        if mixer.in_proj.bias is not None:
            new.in_proj.bias = _param(mixer.in_proj.bias[: 2 * inner], share)
        # Conv channels kept: the x channels, which come first in both families.
        new.conv1d.weight = _param(mixer.conv1d.weight[:inner], share)
        if mixer.conv1d.bias is not None:
            new.conv1d.bias = _param(mixer.conv1d.bias[:inner], share)
        # out_proj and the gated norm are kept whole: shared for a mask, copied for extraction.
        new.out_proj = mixer.out_proj if share else copy.deepcopy(mixer.out_proj)
        if variant == "mamba2":
            new.norm = mixer.norm if share else copy.deepcopy(mixer.norm)
            # Head structure survives (z/x channels are still per head): Mamba-2 head pruning uses it.
            for name in ("num_heads", "head_dim", "n_groups", "shedder_heads"):
                if hasattr(mixer, name):
                    setattr(new, name, getattr(mixer, name))
        return new

    @classmethod
    def skeleton_like(cls, mixer: nn.Module, variant: str) -> SSMFreeMixer:
        """An SSM-free mixer with the right shapes and uninitialised weights (weights load afterwards)."""
        return cls.from_mixer(mixer, variant, share=False)

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        hidden_states: torch.Tensor,
        cache: Any = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        # The block hands the cache over as ``cache`` (newer Transformers) or ``cache_params`` (5.17): a mixer
        # that missed it would restart its convolution at every decoding step (same logits, other tokens).
        cache_params = cache if cache is not None else pop_cache(kwargs)
        seq_len = hidden_states.shape[1]
        dtype = hidden_states.dtype
        use_cached = cache_params is not None and cache_params.has_previous_state(self.layer_idx)

        hidden_states = apply_mask_to_padding_states(hidden_states, attention_mask)
        projected = self.in_proj(hidden_states)
        if self.variant == "mamba1":
            x, gate = projected.transpose(1, 2).chunk(2, dim=1)
        else:
            gate, x = projected.split([self.intermediate_size, self.intermediate_size], dim=-1)
            x = x.transpose(1, 2)

        weight = self.conv1d.weight.squeeze(1)
        if use_cached and seq_len == 1 and not getattr(cache_params.layers[self.layer_idx], "record_past", False):
            conv_state = cache_params.layers[self.layer_idx].conv_states[0]
            x = causal_conv1d_update(x, conv_state, weight, self.conv1d.bias, activation=self.activation)
        else:
            if cache_params is not None:
                x = cache_params.update_conv_state(x, self.layer_idx, conv_kernel_size=self.conv_kernel_size)
            x = causal_conv1d_fn(x, weight, self.conv1d.bias, activation=self.activation)
            if cache_params is not None:
                x = x[:, :, -seq_len:]
        u = apply_mask_to_padding_states(x.transpose(1, 2), attention_mask)

        if self.variant == "mamba1":
            y = u * self.act(gate.transpose(1, 2))
        else:
            y = None
            kernels = fused_kernels_for(hidden_states, cache_params)  # the gated norm as one kernel
            if kernels is not None:
                y = gated_rms_norm(self.norm, u, gate, kernels)
            if y is None:
                y = self.norm(u, gate)
        return self.out_proj(y.to(dtype))
