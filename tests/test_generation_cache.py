"""Cached and uncached greedy generation of a pruned model agree, for every family, masked and physical.

Every plan removes an SSM (the stand-in mixer must carry its convolution state through the cache, whatever
name the installed Transformers passes the cache under) and, for hybrids, attention or experts as well.
A stand-in that misses the cache computes the same full-sequence logits but other decoding steps, so the
test compares the tokens and, stricter, the logits of every generated step (fp32).
"""

from __future__ import annotations

import pytest
import torch

from hf_shedder import Plan, Unit, get_adapter, prune
from tests import tiny_hybrids, tiny_hybrids_more
from tests.test_arch_hymba import build as build_hymba
from tests.tiny_models import build_tiny

NEW_TOKENS = 10

# Layouts: tests/tiny_models.py (4 SSM layers), tests/tiny_hybrids.py (zamba2: mamba/hybrid alternating;
# bamba: attention at 1, 3; nemotron_h: [mamba, mlp, attention, mamba, moe, attention, mlp]),
# tests/tiny_hybrids_more.py (jamba: attention at 1, 4, MoE at 1, 3; granite: attention at 1, 4;
# falcon_h1: attention + Mamba-2 in every layer), tests/test_arch_hymba.py (hymba: 6 layers).
PLANS: dict[str, list[Unit]] = {
    "mamba": [Unit("ssm", 1), Unit("block", 2)],
    "falcon_mamba": [Unit("ssm", 1), Unit("block", 2)],
    "mamba2": [Unit("ssm", 1), Unit("ssm", 3), Unit("block", 2)],
    "zamba2": [Unit("ssm", 2), Unit("hybrid", 3), Unit("attn_heads", 1, (1,))],
    "bamba": [Unit("ssm", 0), Unit("attn_heads", 3, (2, 3)), Unit("block", 1)],
    "nemotron_h": [Unit("ssm", 0), Unit("attn_heads", 5, (2, 3)), Unit("block", 2)],
    "jamba": [Unit("ssm", 3), Unit("attn_heads", 1, (2, 3)), Unit("experts", 3, (1,))],
    "granitemoehybrid": [Unit("ssm", 2), Unit("attn_heads", 1, (0, 1)), Unit("experts", 3, (1,))],
    "falcon_h1": [Unit("ssm", 2), Unit("attn", 0), Unit("ssm_heads", 3, (1, 5))],
    "hymba": [Unit("ssm", 1), Unit("attn_heads", 1, (0, 1)), Unit("block", 2)],
}


def _build(family: str) -> torch.nn.Module:
    if family in ("mamba", "mamba2", "falcon_mamba"):
        return build_tiny(family)
    if family in tiny_hybrids.HYBRID_FAMILIES:
        return tiny_hybrids.build_tiny_hybrid(family)
    if family == "hymba":
        return build_hymba()
    return tiny_hybrids_more.build_tiny_hybrid(family)


def _greedy(model: torch.nn.Module, prompt: torch.Tensor, use_cache: bool) -> tuple[list[int], torch.Tensor]:
    out = model.generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                         use_cache=use_cache, return_dict_in_generate=True, output_logits=True)
    return out.sequences.tolist(), torch.stack(out.logits, 1)


def _assert_cache_agrees(model: torch.nn.Module, prompt: torch.Tensor) -> None:
    tokens, logits = _greedy(model, prompt, use_cache=True)
    tokens_ref, logits_ref = _greedy(model, prompt, use_cache=False)
    assert tokens == tokens_ref
    torch.testing.assert_close(logits, logits_ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["masked", "physical"])
@pytest.mark.parametrize("family", list(PLANS))
def test_cached_greedy_generation_equals_uncached(family, mode):
    model = _build(family).float()
    adapter = get_adapter(model)
    plan = Plan(PLANS[family], adapter.family, adapter.num_layers())
    prompt = torch.randint(1, model.config.vocab_size, (1, 4), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        if mode == "masked":
            with adapter.masked(plan):
                _assert_cache_agrees(model, prompt)
        else:
            _assert_cache_agrees(prune(model, plan), prompt)
