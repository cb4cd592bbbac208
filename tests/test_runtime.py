"""The fast path (hf_shedder.runtime): fused-forward dispatch and the CUDA-graph decode runner.

On CPU the kernels are absent, so the dispatch must fall back and give the same outputs. The argument
plumbing of the fused calls is checked against pure-PyTorch stand-ins of mamba-ssm's kernels, written
here from the kernels' documented contracts (sequential scans, no chunking). The graph runner's
bookkeeping is checked without CUDA; capture and replay are checked on a GPU (skipped elsewhere).
"""

from __future__ import annotations

import copy
import inspect
import logging

import pytest
import torch
import torch.nn.functional as F

import hf_shedder
from hf_shedder import Plan, Unit
from hf_shedder.runtime import (
    MambaKernels,
    cache_tensor_slots,
    disable_fast_path,
    enable_fast_path,
    fused_forward,
    fused_forward_enabled,
    graph_decoder_of,
    override_kernels,
)
from hf_shedder.runtime.graph_decode import _StepGraph

from .tiny_hybrids import build_tiny_hybrid
from .tiny_models import VOCAB, build_tiny


# ----------------------------------------------------------------------------- kernel stand-ins
def _causal_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x: (b, d, l); weight: (d, w) or (d, 1, w). Depthwise causal conv + SiLU."""
    w = weight.reshape(weight.shape[0], 1, -1)
    return F.silu(F.conv1d(x, w, bias, padding=w.shape[-1] - 1, groups=x.shape[1])[..., : x.shape[-1]])


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


class Calls:
    def __init__(self) -> None:
        self.count: dict[str, int] = {}

    def hit(self, name: str) -> None:
        self.count[name] = self.count.get(name, 0) + 1


def stand_in_kernels(calls: Calls) -> MambaKernels:
    def mamba_inner_fn(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                       out_proj_bias, A, B=None, C=None, D=None, delta_bias=None, delta_softplus=True, **kw):
        calls.hit("mamba_inner_fn")
        x, z = xz.float().chunk(2, dim=1)
        u = _causal_conv(x, conv1d_weight.float(), None if conv1d_bias is None else conv1d_bias.float())
        rank, n = delta_proj_weight.shape[1], A.shape[1]
        dt, b_in, c_in = F.linear(u.transpose(1, 2), x_proj_weight.float()).split([rank, n, n], dim=-1)
        delta = F.linear(dt, delta_proj_weight.float()).transpose(1, 2) + delta_bias[None, :, None]
        delta = F.softplus(delta) if delta_softplus else delta
        h = u.new_zeros(u.shape[0], u.shape[1], n)
        ys = []
        for t in range(u.shape[-1]):
            h = torch.exp(delta[:, :, t, None] * A) * h + delta[:, :, t, None] * b_in[:, t, None, :] * u[:, :, t, None]
            ys.append((h * c_in[:, t, None, :]).sum(-1))
        y = (torch.stack(ys, -1) + u * D[None, :, None]) * F.silu(z)
        return F.linear(y.transpose(1, 2), out_proj_weight.float(), out_proj_bias).to(xz.dtype)

    def mamba_split_conv1d_scan_combined(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size,
                                         dt_limit=(0.0, float("inf")), activation="silu", rmsnorm_weight=None,
                                         rmsnorm_eps=1e-6, outproj_weight=None, outproj_bias=None, headdim=None,
                                         ngroups=1, norm_before_gate=True, return_final_states=False, **kw):
        calls.hit("mamba_split_conv1d_scan_combined")
        assert not norm_before_gate and not return_final_states
        b, length, _ = zxbcdt.shape
        heads = A.shape[0]
        dim = heads * headdim
        dstate = (conv1d_weight.shape[0] - dim) // (2 * ngroups)
        z, xbc, dt = zxbcdt.float().split([dim, dim + 2 * ngroups * dstate, heads], dim=-1)
        xbc = _causal_conv(xbc.transpose(1, 2), conv1d_weight.float(), conv1d_bias.float()).transpose(1, 2)
        x, b_in, c_in = xbc.split([dim, ngroups * dstate, ngroups * dstate], dim=-1)
        x = x.view(b, length, heads, headdim)
        per_group = heads // ngroups
        b_in = b_in.view(b, length, ngroups, dstate).repeat_interleave(per_group, dim=2)
        c_in = c_in.view(b, length, ngroups, dstate).repeat_interleave(per_group, dim=2)
        dt = F.softplus(dt + dt_bias.float()).clamp(*dt_limit)
        h = x.new_zeros(b, heads, headdim, dstate)
        ys = []
        for t in range(length):
            decay = torch.exp(dt[:, t] * A)[:, :, None, None]
            h = decay * h + (dt[:, t, :, None] * x[:, t])[..., None] * b_in[:, t, :, None, :]
            ys.append((h * c_in[:, t, :, None, :]).sum(-1) + D.float()[:, None] * x[:, t])
        y = torch.stack(ys, 1).reshape(b, length, dim)
        y = _rms(y * F.silu(z), rmsnorm_weight, rmsnorm_eps)
        return F.linear(y, outproj_weight.float(), None if outproj_bias is None else outproj_bias.float()).to(zxbcdt.dtype)

    def rms_norm_fn(x, weight, bias, eps=1e-6, **kw):
        calls.hit("rms_norm_fn")
        return _rms(x, weight, eps).to(x.dtype)

    def gated_rms_norm_fn(x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True):
        calls.hit("gated_rms_norm_fn")
        assert not norm_before_gate and group_size is None
        return _rms(x.float() * F.silu(z.float()), weight, eps).to(x.dtype)

    def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None):
        calls.hit("causal_conv1d_update")
        conv_state.copy_(torch.cat([conv_state[:, :, 1:], x[:, :, None].to(conv_state.dtype)], dim=-1))
        out = (conv_state * weight[None]).sum(-1) + (0 if bias is None else bias)
        return F.silu(out).to(x.dtype)

    def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
        calls.hit("selective_state_update")
        has_heads = state.dim() > 3
        if not has_heads:  # Mamba-1: one "head" of width d_inner
            state, x, dt, A, B, C = state[:, None], x[:, None], dt[:, None], A[None], B[:, None], C[:, None]
            D = None if D is None else D[None]
            z = None if z is None else z[:, None]
            dt_bias = None if dt_bias is None else dt_bias[None]
        dt = dt + dt_bias if dt_bias is not None else dt
        dt = F.softplus(dt) if dt_softplus else dt
        per_group = state.shape[1] // B.shape[1]
        B, C = B.repeat_interleave(per_group, dim=1), C.repeat_interleave(per_group, dim=1)
        state.copy_(state * torch.exp(dt[..., None] * A) + (dt * x)[..., None] * B[:, :, None, :])
        out = (state * C[:, :, None, :]).sum(-1) + (0 if D is None else x * D)
        out = out * F.silu(z) if z is not None else out
        return out if has_heads else out[:, 0]

    return MambaKernels(mamba_inner_fn, mamba_split_conv1d_scan_combined, rms_norm_fn, gated_rms_norm_fn,
                        causal_conv1d_update, selective_state_update, source="test stand-ins")


def _model(family: str) -> torch.nn.Module:
    if family == "mamba2":  # one group: the fused Mamba-2 kernel normalises per group, as Transformers only then
        from transformers import Mamba2Config, Mamba2ForCausalLM

        torch.manual_seed(0)
        cfg = Mamba2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_heads=8, head_dim=8,
                           state_size=16, n_groups=1, expand=2, chunk_size=8)
        model = Mamba2ForCausalLM(cfg)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("D", "dt_bias", "norm.weight")):
                    p.add_(0.3 * torch.randn_like(p))
        return model.eval()
    return build_tiny(family, num_layers=3)


# ----------------------------------------------------------------------------- fused dispatch
@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_fused_dispatch_without_kernels_is_the_stock_forward(family: str) -> None:
    model = _model(family)
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        keys = list(model.state_dict())
        enable_fast_path(model)
        assert fused_forward_enabled(model)
        with override_kernels(None):  # as on a CPU or a GPU without mamba-ssm
            out = model(ids, use_cache=False).logits
    assert torch.equal(out, ref)
    assert list(model.state_dict()) == keys
    disable_fast_path(model)
    assert not fused_forward_enabled(model) and graph_decoder_of(model) is None


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_fused_calls_reach_the_kernels_with_the_right_arguments(family: str) -> None:
    model = _model(family)
    ids = torch.randint(0, VOCAB, (2, 10))
    calls = Calls()
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        with fused_forward(model), override_kernels(stand_in_kernels(calls)):
            out = model(ids, use_cache=False).logits
            # A cache or a padding mask goes back to the stock forward.
            padded = torch.ones_like(ids)
            padded[0, :3] = 0
            before = dict(calls.count)
            model(ids, attention_mask=padded, use_cache=False)
            cached = model(ids, use_cache=True)
    mixer_kernel = "mamba_inner_fn" if family == "mamba" else "mamba_split_conv1d_scan_combined"
    assert calls.count[mixer_kernel] == 3 and calls.count["rms_norm_fn"] >= 4
    assert calls.count[mixer_kernel] == before[mixer_kernel] + 0  # padding: stock path
    assert cached.logits.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert not fused_forward_enabled(model)  # the context restored the stock classes


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_fused_decode_step_gives_the_stock_tokens(family: str) -> None:
    model = _model(family)
    prompt = torch.randint(0, VOCAB, (2, 6))
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None,
                  attention_mask=torch.ones_like(prompt), output_logits=True, return_dict_in_generate=True)
    ref = model.generate(prompt, **kwargs)
    calls = Calls()
    with fused_forward(model), override_kernels(stand_in_kernels(calls)):
        out = model.generate(prompt, **kwargs)
    assert calls.count["selective_state_update"] == 3 * 7 and calls.count["causal_conv1d_update"] == 3 * 7
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), atol=1e-4, rtol=1e-4)


def test_ssm_free_mixer_uses_the_fused_gated_norm() -> None:
    model = _model("mamba2")
    pruned = hf_shedder.prune(model, Plan([Unit("ssm", 1)]))
    ids = torch.randint(0, VOCAB, (2, 9))
    calls = Calls()
    with torch.no_grad():
        ref = pruned(ids, use_cache=False).logits
        with override_kernels(stand_in_kernels(calls)):
            out = pruned(ids, use_cache=False).logits
    assert calls.count.get("gated_rms_norm_fn") == 1 and calls.count["mamba_split_conv1d_scan_combined"] == 2
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_search_runs_with_fused_forward_and_leaves_the_model_stock() -> None:
    from hf_shedder.data import CalibrationSet
    from hf_shedder.search import SearchSettings, search

    model = _model("mamba")
    ids = torch.randint(0, VOCAB, (4, 16))
    calib = CalibrationSet(ids, torch.ones_like(ids), source="random")
    calls = Calls()
    with override_kernels(stand_in_kernels(calls)):
        fused = search(model, calib, SearchSettings(units=("ssm",), steps=1, batch_size=2), progress=False)
    assert calls.count["mamba_inner_fn"] > 0
    assert not fused_forward_enabled(model)
    with override_kernels(None):
        plain = search(model, calib, SearchSettings(units=("ssm",), steps=1, batch_size=2), progress=False)
    assert fused.plan == plain.plan


# ----------------------------------------------------------------------------- graph runner bookkeeping
def _cache_of(model: torch.nn.Module, batch: int = 2) -> object:
    from hf_shedder.runtime.graph_decode import output_cache

    return output_cache(model(torch.randint(0, VOCAB, (batch, 5)), use_cache=True))


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_cache_slots_and_adoption(family: str) -> None:
    model = _model(family)
    with torch.no_grad():
        cache = _cache_of(model)
    slots = cache_tensor_slots(cache)
    assert len(slots) == 2 * 3  # conv window + SSM state per layer
    values = [s.get().clone() for s in slots]
    step = _StepGraph(batch_size=2, device=torch.device("cpu"))
    step.adopt(cache)
    assert step.owner is cache
    assert all(s.get() is t for s, t in zip(cache_tensor_slots(cache), step.states))
    assert all(torch.equal(v, t) for v, t in zip(values, step.states))
    # A later generate call's cache: its values are copied into the same static buffers.
    with torch.no_grad():
        other = _cache_of(model)
    new_values = [s.get().clone() for s in cache_tensor_slots(other)]
    buffers = list(step.states)
    step.adopt(other)
    assert step.owner is other and all(a is b for a, b in zip(step.states, buffers))
    assert all(s.get() is t for s, t in zip(cache_tensor_slots(other), step.states))
    assert all(torch.equal(v, t) for v, t in zip(new_values, step.states))


def test_graph_decode_on_cpu_falls_back_says_so_once_and_keeps_tokens(caplog: pytest.LogCaptureFixture) -> None:
    model = _model("mamba")
    prompt = torch.randint(0, VOCAB, (2, 6))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(prompt))
    ref = model.generate(prompt, **kwargs)
    wrapper = hf_shedder.runtime.enable_graph_decode(model)
    # generate() reads forward's parameters to name the cache argument: the wrapper shows the real ones.
    from hf_shedder.runtime.graph_decode import forward_cache_kwarg

    assert forward_cache_kwarg(model) in inspect.signature(model.forward).parameters
    with caplog.at_level(logging.INFO, logger="hf_shedder.runtime.graph_decode"):
        out1 = model.generate(prompt, **kwargs)
        out2 = model.generate(prompt, **kwargs)
    assert torch.equal(out1, ref) and torch.equal(out2, ref)
    said = [r for r in caplog.records if "CUDA-graph decode needs a CUDA device" in r.getMessage()]
    assert len(said) == 1
    assert wrapper.captures == 0 and wrapper.graphs == {}


def test_graph_wrapper_follows_copies_and_pruning() -> None:
    model = _model("mamba2")
    enable_fast_path(model)
    copied = copy.deepcopy(model)
    assert graph_decoder_of(copied).model is copied and graph_decoder_of(model).model is model
    pruned = hf_shedder.prune(model, Plan([Unit("block", 0)]))
    assert graph_decoder_of(pruned.model).model is pruned.model
    assert not graph_decoder_of(pruned.model).cache_grows


def test_hybrid_with_attention_cache_is_not_captured() -> None:
    model = build_tiny_hybrid("zamba2")
    wrapper = enable_fast_path(model) and graph_decoder_of(model)
    assert wrapper is not None and wrapper.cache_grows


# ----------------------------------------------------------------------------- greedy decode bookkeeping
def test_greedy_request_takes_plain_greedy_only() -> None:
    from hf_shedder.runtime.greedy_decode import greedy_request

    model = _model("mamba")
    ids = torch.randint(0, VOCAB, (2, 5))
    req = greedy_request(model, (ids,), {"max_new_tokens": 7, "min_new_tokens": 3, "eos_token_id": [4, 9],
                                          "pad_token_id": 1, "attention_mask": torch.ones_like(ids)})
    assert (req.new_tokens, req.min_new, req.eos, req.pad) == (7, 3, [4, 9], 1)
    assert greedy_request(model, (ids,), {"max_length": 9, "min_length": 7, "eos_token_id": 4}).new_tokens == 4
    assert greedy_request(model, (ids,), {"max_length": 9, "min_length": 7, "eos_token_id": 4}).min_new == 2
    padded = torch.ones_like(ids)
    padded[0, 0] = 0
    for kwargs in ({"do_sample": True}, {"num_beams": 2}, {"return_dict_in_generate": True},
                   {"repetition_penalty": 1.2}, {"attention_mask": padded}, {"streamer": object()}):
        assert greedy_request(model, (ids,), {"max_new_tokens": 4, **kwargs}) is None, kwargs
    assert greedy_request(model, (ids,), {"max_length": 3}) is None  # nothing left to generate: Transformers' rules


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_greedy_loop_matches_transformers_greedy(family: str) -> None:
    from hf_shedder.runtime.greedy_decode import GreedyGraphGenerate, greedy_request

    model = _model(family)
    prompt = torch.randint(0, VOCAB, (3, 5))
    base = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None,
                          attention_mask=torch.ones_like(prompt))
    runner = GreedyGraphGenerate(model)
    cases = [{"max_new_tokens": 12, "eos_token_id": None}]
    # End-of-sequence ids the model really produces: rows end at different steps, some never.
    eos = int(base[0, 5 + 2])
    cases += [{"max_new_tokens": 12, "eos_token_id": eos}, {"max_new_tokens": 12, "eos_token_id": [eos, int(base[1, 9])]},
              {"max_new_tokens": 12, "min_new_tokens": 6, "eos_token_id": eos}, {"max_length": 14, "min_length": 9,
                                                                                  "eos_token_id": eos}]
    for kwargs in cases:
        kwargs = {"pad_token_id": 0, "do_sample": False, **kwargs}
        ref = model.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs)
        ours = runner.greedy(greedy_request(model, (prompt,), kwargs), capture=False)
        assert torch.equal(ours, ref), kwargs


# ----------------------------------------------------------------------------- on a GPU
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph capture needs a GPU")


@gpu
@pytest.mark.parametrize("family", ["mamba", "mamba2"])
@pytest.mark.parametrize("plan", [None, "ssm", "block"])
def test_graph_decode_gives_eager_tokens_fp32(family: str, plan: str | None) -> None:
    model = _model(family).cuda()
    if plan:
        model = hf_shedder.prune(model, Plan([Unit(plan, 1)])).model
    prompt = torch.randint(0, VOCAB, (3, 7), device="cuda")
    kwargs = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=None,
                  attention_mask=torch.ones_like(prompt))
    disable_fast_path(model)
    eager = model.generate(prompt, **kwargs)
    wrapper = enable_fast_path(model) and graph_decoder_of(model)
    graphed = model.generate(prompt, **kwargs)
    again = model.generate(prompt, **kwargs)  # the batch size's graph is reused, buffers adopted anew
    single = model.generate(prompt[:1], **{**kwargs, "attention_mask": kwargs["attention_mask"][:1]})
    assert torch.equal(graphed, eager) and torch.equal(again, eager)
    assert torch.equal(single, eager[:1])
    # Plain greedy calls take the one-graph greedy loop; a sampling call takes generate with replayed steps.
    greedy = model.__dict__["generate"]
    assert greedy.calls == 3 and sorted(greedy.graphs) == [1, 3]
    eos = int(eager[0, 7 + 4])
    eos_kwargs = {**kwargs, "eos_token_id": eos, "min_new_tokens": 2}
    disable_fast_path(model)
    eager_eos = model.generate(prompt, **eos_kwargs)
    enable_fast_path(model)
    assert torch.equal(model.generate(prompt, **eos_kwargs), eager_eos)
    torch.manual_seed(0)
    sampled = model.generate(prompt, **{**kwargs, "do_sample": True, "top_k": 5})
    assert sampled.shape == eager.shape and wrapper.replays == 19 and wrapper.captures == 1


def test_bench_table_shows_decode_without_graphs_when_measured() -> None:
    from hf_shedder.evaluation.speed import SpeedComparison, SpeedResult, _eager_decode_extra

    times = {"decode_1_1": 0.01, "decode_n_1": 0.11, "decode_1_1_eager": 0.02, "decode_n_1_eager": 0.52}
    extra = _eager_decode_extra(times, decode_tokens=11, decode_batch_sizes=(1,))
    assert extra == {"decode_tokens_per_s_eager": {"1": pytest.approx(10 / 0.5)}}
    assert _eager_decode_extra({"decode_1_1": 0.01, "decode_n_1": 0.11}, 11, (1,)) == {}

    def result(rate: float, eager: float) -> SpeedResult:
        return SpeedResult(device="gpu", dtype="bfloat16", n_params=10, batch_size=1, prefill_len=8, prefill_seconds=1.0,
                           prefill_tokens_per_s=8.0, decode_tokens=11, decode_tokens_per_s={1: rate},
                           peak_memory_bytes=None, memory_kind="cuda_max_allocated", warmup=1, repeats=3,
                           decode_batch_sizes=(1,), extra={"decode_tokens_per_s_eager": {"1": eager}})

    table = SpeedComparison(result(100.0, 20.0), result(125.0, 24.0)).to_markdown()
    assert "eager: CUDA graphs off" in table and "| 20.0 | 24.0 | 1.20x |" in table


@pytest.mark.parametrize("groups, length", [(2, 21), (1, 16)])
def test_lean_scan_gives_transformers_outputs(monkeypatch: pytest.MonkeyPatch, groups: int, length: int) -> None:
    import hf_shedder.arch.fused_mixers as fused_mixers
    from hf_shedder.runtime.lean_scan import reference_scan_bytes

    model = build_tiny("mamba2", num_layers=3) if groups == 2 else _model("mamba2")
    ids = torch.randint(0, VOCAB, (2, length))
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        with fused_forward(model):
            monkeypatch.setattr(fused_mixers, "LEAN_SCAN_MIN_BYTES", 0)  # every forward takes the lean scan
            calls = []
            mixer = type(model.backbone.layers[0].mixer)
            original = mixer._lean_forward
            monkeypatch.setattr(mixer, "_lean_forward", lambda self, h: calls.append(1) or original(self, h))
            out = model(ids, use_cache=False).logits
    assert len(calls) == 3
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # What it avoids: the reference scan's largest intermediate at the bundled model's eval shape.
    assert reference_scan_bytes(8, 2048, heads=8, head_dim=24, state=64, chunk=16) > 6 * 2**30
