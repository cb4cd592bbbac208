"""Where the fast Mamba kernels come from: mamba-ssm and causal-conv1d, looked up once.

Transformers calls mamba-ssm's fused kernels only while training (``self.training and cache_params is
None``); in eval it runs the pieces one by one. hf_shedder's fast path (``runtime.fused``) calls the
fused kernels itself, and needs them from one place: this module. Nothing is imported until first
use, so a CPU install never pays for the lookup. Tests can put pure-PyTorch stand-ins here with
:func:`override_kernels` to check the argument plumbing without a GPU.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MambaKernels:
    """The fused entry points the fast path uses (mamba-ssm 2.x signatures)."""

    mamba_inner_fn: Callable  # Mamba-1 mixer after in_proj: conv + x_proj + dt_proj + scan + gate + out_proj
    mamba_split_conv1d_scan_combined: Callable  # Mamba-2 mixer after in_proj, gated norm and out_proj included
    rms_norm_fn: Callable  # RMSNorm (one Triton kernel)
    gated_rms_norm_fn: Callable  # RMSNorm(x * silu(z)) (one Triton kernel)
    causal_conv1d_update: Callable  # one-token conv step, conv window updated in place
    selective_state_update: Callable  # one-token SSM step (Mamba-1 and Mamba-2), state updated in place
    source: str = "mamba-ssm"


_cached: MambaKernels | None = None
_looked_up = False
_override: MambaKernels | None = None
_override_active = False


def _import_kernels() -> MambaKernels | None:
    try:
        from causal_conv1d import causal_conv1d_update
        from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn
        from mamba_ssm.ops.triton.layer_norm import rms_norm_fn
        from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
        from mamba_ssm.ops.triton.ssd_combined import mamba_split_conv1d_scan_combined
    except Exception as e:  # ImportError, or a build for another CUDA / torch (OSError, RuntimeError)
        logger.debug("mamba-ssm / causal-conv1d kernels not usable: %s", e)
        return None
    return MambaKernels(
        mamba_inner_fn=mamba_inner_fn,
        mamba_split_conv1d_scan_combined=mamba_split_conv1d_scan_combined,
        rms_norm_fn=rms_norm_fn,
        gated_rms_norm_fn=rmsnorm_fn,
        causal_conv1d_update=causal_conv1d_update,
        selective_state_update=selective_state_update,
    )


def get_kernels() -> MambaKernels | None:
    """The installed kernels, or None (CPU installs, or mamba-ssm / causal-conv1d missing)."""
    global _cached, _looked_up
    if _override_active:
        return _override
    if not _looked_up:
        _looked_up = True
        _cached = _import_kernels() if torch.cuda.is_available() else None
    return _cached


def kernels_available() -> bool:
    return get_kernels() is not None


def kernels_apply_to(tensor: torch.Tensor) -> MambaKernels | None:
    """The kernels if they can run on ``tensor`` (a CUDA tensor, or any tensor under an override)."""
    kernels = get_kernels()
    if kernels is None:
        return None
    if tensor.device.type != "cuda" and not _override_active:
        return None
    return kernels


@contextlib.contextmanager
def override_kernels(kernels: MambaKernels | None) -> Iterator[None]:
    """Use ``kernels`` (e.g. pure-PyTorch stand-ins in tests, or None to force the eager path)."""
    global _override, _override_active
    previous = (_override, _override_active)
    _override, _override_active = kernels, True
    try:
        yield
    finally:
        _override, _override_active = previous
