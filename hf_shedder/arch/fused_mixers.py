"""Fused forwards for the Mamba-1 / Mamba-2 modules of Transformers, used when mamba-ssm is installed.

Transformers runs mamba-ssm's fused kernels only while training (``self.training and cache_params is
None``); in eval it runs conv, scan, gate, norm and projection one kernel at a time. The subclasses here
add the fused call for every no-cache forward (eval included) and otherwise run the stock forward, so
outputs match it within the kernels' rounding. ``hf_shedder.runtime.fused`` swaps a module's class to
its fused subclass and back (same parameters, same state-dict keys); this file is the only place that
knows the attribute names the kernels read.

Covered: ``MambaMixer`` (Mamba-1), ``Mamba2Mixer`` with one group (mamba-ssm's fused kernel normalises
per group, Transformers' eager norm over the whole width: they agree only for ``n_groups == 1``), and
the blocks' RMSNorms. FalconMamba's mixer (extra B/C/dt norms) and the hybrids' mixers keep their path.
Without kernels, a large no-cache Mamba-2 forward runs the stock steps with a linear-memory scan
(``runtime.lean_scan``) in place of Transformers' reference scan, whose memory is quadratic in the chunks.
"""

from __future__ import annotations

import inspect
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.mamba.modeling_mamba import MambaMixer, MambaRMSNorm
from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer, Mamba2RMSNorm, MambaRMSNormGated
from transformers.models.mamba2.modeling_mamba2 import causal_conv1d_fn as stock_causal_conv1d_fn

from ..compat import pop_cache
from ..runtime.kernels import MambaKernels, kernels_apply_to
from ..runtime.lean_scan import lean_chunk_scan, reference_scan_bytes

_FUSABLE_ACTIVATIONS = ("silu", "swish")
# Without kernels, Mamba-2 no-cache forwards whose reference scan would need more than this take the
# linear-memory scan (runtime.lean_scan); smaller ones keep Transformers' own code, bit for bit.
LEAN_SCAN_MIN_BYTES = 256 * 2**20

# The last padding mask seen and whether it was all ones: one forward passes the same mask to every
# layer, so the check (a host sync) runs once per forward, not once per layer.
_last_mask: tuple[weakref.ref[torch.Tensor], int, bool] | None = None


def _mask_is_trivial(mask: torch.Tensor | None) -> bool:
    global _last_mask
    if mask is None:
        return True
    if _last_mask is not None:
        ref, version, trivial = _last_mask
        if ref() is mask and version == mask._version:
            return trivial
    trivial = bool(torch.all(mask == 1))
    _last_mask = (weakref.ref(mask), mask._version, trivial)
    return trivial


def fused_kernels_for(
    hidden: torch.Tensor, cache_params: Any = None, attention_mask: torch.Tensor | None = None
) -> MambaKernels | None:
    """The kernels when a mixer call can take the fused path: no cache, no padding, kernels usable here."""
    if cache_params is not None:
        return None
    kernels = kernels_apply_to(hidden)
    if kernels is None or not _mask_is_trivial(attention_mask):
        return None
    return kernels


def decode_states(cache_params: Any, layer_idx: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(conv window, SSM state) of ``layer_idx`` for a one-token step that can update them in place, else None.

    Reads Transformers' recurrent cache layout (``layers[i].conv_states[0]`` / ``recurrent_states[0]``); a
    release that lays it out otherwise simply gets the stock forward.
    """
    if cache_params is None or hidden.shape[1] != 1:
        return None
    try:
        if not cache_params.has_previous_state(layer_idx):
            return None
        layer = cache_params.layers[layer_idx]
        if getattr(layer, "record_past", False):
            return None
        conv, state = layer.conv_states[0], layer.recurrent_states[0]
    except (AttributeError, IndexError, KeyError, TypeError):
        return None
    batch = hidden.shape[0]
    # Shapes a one-token step can update in place: (batch, channels, window) and (batch, [heads,] dim, state).
    if not isinstance(conv, torch.Tensor) or not isinstance(state, torch.Tensor) or conv.dim() != 3 \
            or state.dim() not in (3, 4) or conv.shape[0] != batch or state.shape[0] != batch:
        return None
    return conv, state


def decode_kernels_for(hidden: torch.Tensor, cache_params: Any, layer_idx: int) -> tuple[MambaKernels, Any] | None:
    kernels = kernels_apply_to(hidden)
    if kernels is None:
        return None
    states = decode_states(cache_params, layer_idx, hidden)
    return None if states is None else (kernels, states)


def _stock_cache_kwarg(cls: type[nn.Module]) -> str:
    """The name the installed release's stock mixer takes its cache under (``cache`` after 5.17)."""
    params = inspect.signature(cls.forward).parameters
    return "cache" if "cache" in params else "cache_params"


class FusedMambaMixer(MambaMixer):
    """``MambaMixer`` whose no-cache forward is mamba-ssm's ``mamba_inner_fn`` (as its training path) and whose
    one-token cached step calls the conv-update and state-update kernels directly (mamba-ssm's ``step``)."""

    _cache_kw = _stock_cache_kwarg(MambaMixer)

    def forward(self, hidden_states: torch.Tensor, cache: Any = None, attention_mask: Any = None, **kwargs: Any):
        # The block passes the cache as ``cache`` or ``cache_params`` depending on the release: take either.
        cache_params = cache if cache is not None else pop_cache(kwargs)
        found = decode_kernels_for(hidden_states, cache_params, self.layer_idx)
        if found is not None and self.activation in _FUSABLE_ACTIVATIONS:
            return self._decode_step(hidden_states, *found)
        kernels = fused_kernels_for(hidden_states, cache_params, attention_mask)
        if kernels is None or self.activation not in _FUSABLE_ACTIVATIONS:
            return super().forward(hidden_states, attention_mask=attention_mask, **{self._cache_kw: cache_params},
                                   **kwargs)
        return kernels.mamba_inner_fn(
            self._in_proj_channels_first(hidden_states),
            self.conv1d.weight,
            self.conv1d.bias if self.use_conv_bias else None,
            self.x_proj.weight,
            self.dt_proj.weight,
            self.out_proj.weight,
            self.out_proj.bias.float() if self.use_bias else None,
            -torch.exp(self.A_log.float()),
            None,  # B and C are input-dependent (from x_proj)
            None,
            self.D.float(),
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
        )

    def _in_proj_channels_first(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``in_proj(h)`` as (batch, channels, length) with the length contiguous, what the conv and scan kernels
        read. ``in_proj(h).transpose(1, 2)`` has the channels contiguous and costs the kernel a transposing
        copy per layer; ``W @ h^T`` (as mamba-ssm computes it) lands in the right layout directly."""
        if type(self.in_proj) is not nn.Linear:  # a LoRA or quantized wrapper: call it as a module
            return self.in_proj(hidden_states).transpose(1, 2)
        batch, length, _ = hidden_states.shape
        xz = self.in_proj.weight @ hidden_states.reshape(batch * length, -1).t()
        if self.in_proj.bias is not None:
            xz = xz + self.in_proj.bias[:, None].to(xz.dtype)
        return xz.view(-1, batch, length).transpose(0, 1)

    def _decode_step(self, hidden_states: torch.Tensor, kernels: MambaKernels, states: Any) -> torch.Tensor:
        conv_state, ssm_state = states
        x, z = self.in_proj(hidden_states.squeeze(1)).chunk(2, dim=-1)
        x = kernels.causal_conv1d_update(x, conv_state, self.conv1d.weight.squeeze(1), self.conv1d.bias, self.activation)
        dt, b, c = self.x_proj(x).split([self.time_step_rank, self.ssm_state_size, self.ssm_state_size], dim=-1)
        y = kernels.selective_state_update(
            ssm_state, x, F.linear(dt, self.dt_proj.weight), -torch.exp(self.A_log.float()), b, c, self.D, z=z,
            dt_bias=self.dt_proj.bias, dt_softplus=True,
        )
        return self.out_proj(y.to(hidden_states.dtype)).unsqueeze(1)


class FusedMamba2Mixer(Mamba2Mixer):
    """``Mamba2Mixer`` whose no-cache forward is mamba-ssm's ``mamba_split_conv1d_scan_combined`` and whose
    one-token cached step runs the conv-update, state-update and gated-norm kernels directly."""

    _cache_kw = _stock_cache_kwarg(Mamba2Mixer)

    def forward(self, hidden_states: torch.Tensor, cache: Any = None, attention_mask: Any = None, **kwargs: Any):
        # The block passes the cache as ``cache`` or ``cache_params`` depending on the release: take either.
        cache_params = cache if cache is not None else pop_cache(kwargs)
        found = decode_kernels_for(hidden_states, cache_params, self.layer_idx)
        if found is not None and self._fusable():
            return self._decode_step(hidden_states, *found)
        if self._needs_lean_scan(hidden_states, cache_params, attention_mask):
            return self._lean_forward(hidden_states)
        kernels = fused_kernels_for(hidden_states, cache_params, attention_mask)
        if kernels is None or not self._fusable() or kwargs.get("seq_idx") is not None:
            return super().forward(hidden_states, attention_mask=attention_mask, **{self._cache_kw: cache_params},
                                   **kwargs)
        return kernels.mamba_split_conv1d_scan_combined(
            self.in_proj(hidden_states),
            self.conv1d.weight.squeeze(1),
            self.conv1d.bias,
            self.dt_bias,
            -torch.exp(self.A_log.float()),
            D=self.D,
            chunk_size=self.chunk_size,
            dt_limit=tuple(self.time_step_limit),
            activation=self.activation,
            rmsnorm_weight=self.norm.weight,
            rmsnorm_eps=self.norm.variance_epsilon,
            outproj_weight=self.out_proj.weight,
            outproj_bias=self.out_proj.bias,
            headdim=self.head_dim,
            ngroups=self.n_groups,
            norm_before_gate=False,  # Transformers' gated norm: RMSNorm(x * silu(z))
            return_final_states=False,
        )

    def _needs_lean_scan(self, hidden_states: torch.Tensor, cache_params: Any, attention_mask: Any) -> bool:
        """No kernels here and Transformers' reference scan would need more than LEAN_SCAN_MIN_BYTES."""
        if cache_params is not None or kernels_apply_to(hidden_states) is not None or not _mask_is_trivial(attention_mask):
            return False
        batch, length, _ = hidden_states.shape
        need = reference_scan_bytes(batch, length, self.num_heads, self.head_dim, self.ssm_state_size, self.chunk_size)
        return need > LEAN_SCAN_MIN_BYTES

    def _lean_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The stock no-cache forward with the scan of :func:`lean_chunk_scan` (same steps, same modules)."""
        batch, length, _ = hidden_states.shape
        gate, xbc, dt = self.in_proj(hidden_states).split(
            [self.intermediate_size, self.conv_dim, self.num_heads], dim=-1)
        xbc = stock_causal_conv1d_fn(xbc.transpose(1, 2), self.conv1d.weight.squeeze(1), self.conv1d.bias,
                                     activation=self.activation).transpose(1, 2)
        groups_state = self.n_groups * self.ssm_state_size
        x, b, c = xbc.split([self.intermediate_size, groups_state, groups_state], dim=-1)
        y = lean_chunk_scan(
            x.view(batch, length, self.num_heads, self.head_dim), dt, -torch.exp(self.A_log.float()),
            b.view(batch, length, self.n_groups, -1), c.view(batch, length, self.n_groups, -1), self.chunk_size,
            D=self.D, dt_bias=self.dt_bias, dt_limit=tuple(self.time_step_limit),
        )
        y = self.norm(y.reshape(batch, length, -1), gate)
        return self.out_proj(y.to(hidden_states.dtype))

    def _fusable(self) -> bool:
        return (self.n_groups == 1 and self.activation in _FUSABLE_ACTIVATIONS
                and type(self.norm) is MambaRMSNormGated)

    def _decode_step(self, hidden_states: torch.Tensor, kernels: MambaKernels, states: Any) -> torch.Tensor:
        conv_state, ssm_state = states
        batch = hidden_states.shape[0]
        gate, xbc, dt = self.in_proj(hidden_states.squeeze(1)).split(
            [self.intermediate_size, self.conv_dim, self.num_heads], dim=-1)
        xbc = kernels.causal_conv1d_update(xbc, conv_state, self.conv1d.weight.squeeze(1), self.conv1d.bias,
                                           self.activation)
        groups_state = self.n_groups * self.ssm_state_size
        x, b, c = xbc.split([self.intermediate_size, groups_state, groups_state], dim=-1)
        heads, head_dim, n = self.num_heads, self.head_dim, self.ssm_state_size
        y = kernels.selective_state_update(
            ssm_state,
            x.view(batch, heads, head_dim),
            dt[:, :, None].expand(-1, -1, head_dim),
            (-torch.exp(self.A_log.float()))[:, None, None].expand(-1, head_dim, n),
            b.view(batch, self.n_groups, n),
            c.view(batch, self.n_groups, n),
            self.D[:, None].expand(-1, head_dim),
            z=None,
            dt_bias=self.dt_bias[:, None].expand(-1, head_dim),
            dt_softplus=True,
        ).view(batch, -1)
        y = kernels.gated_rms_norm_fn(y, self.norm.weight, None, z=gate, eps=self.norm.variance_epsilon,
                                      norm_before_gate=False)
        return self.out_proj(y.to(hidden_states.dtype)).unsqueeze(1)


class _FusedRMSNormMixin:
    """RMSNorm as one Triton kernel (the stock one is ~6 elementwise kernels); any cache state."""

    weight: nn.Parameter
    variance_epsilon: float

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        kernels = kernels_apply_to(hidden_states)
        if kernels is None:
            return super().forward(hidden_states)  # type: ignore[misc]
        return kernels.rms_norm_fn(hidden_states, self.weight, None, eps=self.variance_epsilon)


class FusedMambaRMSNorm(_FusedRMSNormMixin, MambaRMSNorm):
    pass


class FusedMamba2RMSNorm(_FusedRMSNormMixin, Mamba2RMSNorm):
    pass


# stock class -> fused subclass; the runtime swaps exactly these classes (never a subclass of them).
FUSED_CLASSES: dict[type[nn.Module], type[nn.Module]] = {
    MambaMixer: FusedMambaMixer,
    Mamba2Mixer: FusedMamba2Mixer,
    MambaRMSNorm: FusedMambaRMSNorm,
    Mamba2RMSNorm: FusedMamba2RMSNorm,
}


def gated_rms_norm(norm: nn.Module, x: torch.Tensor, gate: torch.Tensor, kernels: MambaKernels) -> torch.Tensor | None:
    """``norm(x, gate)`` as one kernel when ``norm`` is Transformers' whole-width gated RMSNorm, else None."""
    if type(norm) is not MambaRMSNormGated:
        return None
    return kernels.gated_rms_norm_fn(x, norm.weight, None, z=gate, eps=norm.variance_epsilon, norm_before_gate=False)
