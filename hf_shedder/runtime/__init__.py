"""The fast inference path: fused Mamba forwards and CUDA-graph decode.

Three pieces: ``fused`` (module classes with mamba-ssm's fused kernels), ``graph_decode`` (the one-token
step replayed inside Transformers' ``generate``) and ``greedy_decode`` (plain greedy ``generate`` with the
step and the token choice replayed as one graph, the host checking the end only every few tokens).

Modeling, loading, the search and the benchmarks call :func:`enable_fast_path`; it learns a family's
layout only through its adapter (``recurrent_cache_only``) and the fused module classes in
``hf_shedder.arch.fused_mixers``. On CPU, or without mamba-ssm / causal-conv1d, everything falls back to
Transformers' own forward and eager decode, with identical outputs (large Mamba-2 forwards excepted: they take
the linear-memory scan of ``lean_scan``, equal within 1e-5).
"""

from __future__ import annotations

from torch import nn

from .fused import disable_fused_forward, enable_fused_forward, fused_forward, fused_forward_enabled
from .graph_decode import (
    GraphDecodeForward,
    cache_tensor_slots,
    disable_graph_decode,
    enable_graph_decode,
    graph_decoder_of,
)
from .greedy_decode import GreedyGraphGenerate, disable_greedy_graph_generate, enable_greedy_graph_generate
from .kernels import MambaKernels, get_kernels, kernels_available, override_kernels


def enable_fast_path(model: nn.Module, graph_decode: bool = True) -> nn.Module:
    """Fused forwards for ``model``'s Mamba modules and, if ``graph_decode``, CUDA-graph decode steps.

    ``model`` is the module whose ``generate`` runs (a base causal LM, or a pruned model's inner one).
    Returns ``model``.
    """
    from ..arch import get_adapter
    from ..errors import UnsupportedModelError

    enable_fused_forward(model)
    if graph_decode:
        try:
            recurrent_only = get_adapter(model).recurrent_cache_only
        except UnsupportedModelError:
            recurrent_only = False
        enable_graph_decode(model, cache_grows=not recurrent_only)
        enable_greedy_graph_generate(model)
    return model


def disable_fast_path(model: nn.Module) -> nn.Module:
    disable_greedy_graph_generate(model)
    disable_graph_decode(model)
    disable_fused_forward(model)
    return model


__all__ = [
    "GraphDecodeForward", "GreedyGraphGenerate", "MambaKernels", "cache_tensor_slots", "disable_fast_path", "disable_fused_forward",
    "disable_graph_decode", "disable_greedy_graph_generate", "enable_fast_path", "enable_fused_forward", "enable_graph_decode", "enable_greedy_graph_generate", "fused_forward",
    "fused_forward_enabled", "get_kernels", "graph_decoder_of", "kernels_available", "override_kernels",
]
