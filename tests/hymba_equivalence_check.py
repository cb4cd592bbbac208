"""Check hf_shedder's Hymba against the public Hymba remote code (not part of the suite).

Exit status: 0 only when every comparison passed; 1 on a mismatch; 2 when the check
could not run at all (public files or a dependency missing, bad arguments, public
code that no longer accepts the in-memory edits below) -- a run that prints SKIP is
never a pass.  Results of past runs: docs/hymba_equivalence.md.

How to run (CPU is enough; nothing is downloaded, ~2 minutes on 2 cores):

  1. Get ``modeling_hymba.py`` and ``configuration_hymba.py`` of the Hugging Face repo
     ``nvidia/Hymba-1.5B-Base`` into one folder, e.g. /tmp/hymba_public (from the Hub,
     or from a verbatim public copy of that repo; the copy used so far is GitHub
     ``BharadwajYR/hackathon_mlops`` at commit 6d3b76ffaa106d124f1701cd96d27a5d1025b7fd,
     files at the repo root).  Keep them outside this repository.
  2. Make ``einops`` importable, e.g.
     ``pip install --target /tmp/hymba_extra einops`` (the public code imports it).
     torch >= 2.5 (for ``torch.nn.attention.flex_attention``) and the project's own
     requirements (transformers 5) are assumed; flash-attn, mamba-ssm and
     causal-conv1d are NOT needed.
  3. From the repository root::

         PYTHONPATH=.:/tmp/hymba_extra HF_HUB_OFFLINE=1 \
             python tests/hymba_equivalence_check.py /tmp/hymba_public

     (the argument may be the folder or its ``modeling_hymba.py``).

The public code hard-requires flash-attn and the mamba-ssm / causal-conv1d CUDA
kernels.  To run it on CPU this script, in memory only, (a) registers stand-in
modules for those packages (plain PyTorch: SDPA with flash-attn's window/causal
rules, a sequential selective scan, a depthwise causal conv) and (b) makes four
textual edits to the public file so it imports and runs under Transformers 5 on CPU
(listed in ``PUBLIC_CODE_EDITS``).  Nothing of the public code is stored in this repo.

Checks, for three tiny random configurations (one shaped like the published config,
two with the optional features switched on), with identical weights in both models:
  1. the state-dict keys are identical (strict load both ways), and a checkpoint the
     public model writes with save_pretrained loads into ours with no missing or
     unexpected keys and the same logits;
  2. full-sequence logits agree (flex-attention path of the public code; the
     sequence is longer than the sliding window, with meta tokens and KV sharing),
     also when that long prompt is run as a cached prefill;
  3. token-by-token greedy decoding with the cache agrees, logits and tokens,
     while the context stays inside the sliding window;
  4. (informative) beyond the window: ours stays equal to its own uncached
     forward; the public cached decoding keeps one past token fewer than its own
     uncached (flex) forward, so there the two implementations differ -- the script
     shows this by also decoding with our sliding windows narrowed by one, which
     then reproduces the public cached logits.  Not so in "variant-2", where a
     sliding-window layer reuses the keys/values of a global layer (no published
     config does): there the public cached path applies flash-attn's plain window
     to the producer's untrimmed cache, which also drops the meta tokens.
Exit status 0 when 1-3 pass for every configuration.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
import tempfile
import types
from pathlib import Path

import torch
import torch.nn.functional as F

ATOL = 2e-5

# (old, new) pairs applied to the public modeling file before import.
PUBLIC_CODE_EDITS = [
    # Transformers 5 dropped this helper.
    (
        "from transformers.utils.import_utils import is_torch_fx_available",
        "is_torch_fx_available = lambda: False",
    ),
    # Rotary frequencies are created on "cuda" unconditionally.
    ('device=torch.device("cuda")', "device=None"),
    # The SSM refuses to run unless its weights are on a GPU.
    ('or "cuda" not in self.x_proj[0].weight.device.type', ""),
    # torch.compile of flex attention is not needed for a correctness check.
    ("self.flex_attention = torch.compile(flex_attention)", "self.flex_attention = flex_attention"),
]


# ----------------------------------------------------------------------------- stand-in kernels


def _flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), **_):
    """flash-attn semantics: (b, len, heads, dim); causal aligned to the bottom right."""
    lq, lk = q.shape[1], k.shape[1]
    i = torch.arange(lq)[:, None] + (lk - lq)
    j = torch.arange(lk)[None, :]
    allowed = torch.ones(lq, lk, dtype=torch.bool)
    if causal:
        allowed &= j <= i
    left, right = window_size
    if left >= 0:
        allowed &= j >= i - left
    if right >= 0:
        allowed &= j <= i + right
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=allowed, scale=softmax_scale
    )
    return out.transpose(1, 2)


def _unsupported(*_, **__):
    raise NotImplementedError("padding-aware flash-attn paths are not exercised by this check")


def _selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    dtype = u.dtype
    u, delta = u.float(), delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].float()
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, length = u.shape
    state = u.new_zeros(batch, dim, A.shape[1])
    outs = []
    for t in range(length):
        d_t = delta[:, :, t, None]
        state = torch.exp(d_t * A) * state + d_t * B[:, None, :, t].float() * u[:, :, t, None]
        outs.append((state * C[:, None, :, t].float()).sum(-1))
    y = torch.stack(outs, dim=-1)
    if D is not None:
        y = y + u * D[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(dtype)
    return (y, state) if return_last_state else y


def _selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    dt = dt.float() + (dt_bias.float() if dt_bias is not None else 0.0)
    if dt_softplus:
        dt = F.softplus(dt)
    new_state = torch.exp(dt[..., None] * A) * state.float() + dt[..., None] * B[:, None, :].float() * x.float()[..., None]
    state.copy_(new_state)
    y = (new_state * C[:, None, :].float()).sum(-1)
    if D is not None:
        y = y + x.float() * D.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(x.dtype)


def _causal_conv1d_fn(x, weight, bias=None, activation=None, **_):
    k = weight.shape[-1]
    out = F.conv1d(F.pad(x, (k - 1, 0)), weight[:, None, :], bias, groups=x.shape[1])
    return F.silu(out) if activation in ("silu", "swish") else out


def _causal_conv1d_update(x, conv_state, weight, bias=None, activation=None):
    conv_state.copy_(torch.cat([conv_state[..., 1:], x[..., None].to(conv_state.dtype)], dim=-1))
    out = (conv_state * weight).sum(-1)
    if bias is not None:
        out = out + bias
    out = out.to(x.dtype)
    return F.silu(out) if activation in ("silu", "swish") else out


def _install_stand_ins() -> None:
    def module(name: str, **attrs) -> None:
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        sys.modules[name] = mod

    module("flash_attn", flash_attn_func=_flash_attn_func, flash_attn_varlen_func=_unsupported)
    module("flash_attn.bert_padding", index_first_axis=_unsupported, pad_input=_unsupported, unpad_input=_unsupported)
    module("mamba_ssm")
    module("mamba_ssm.ops")
    module("mamba_ssm.ops.selective_scan_interface", mamba_inner_fn=_unsupported, selective_scan_fn=_selective_scan_fn)
    module("mamba_ssm.ops.triton")
    module("mamba_ssm.ops.triton.selective_state_update", selective_state_update=_selective_state_update)
    module("causal_conv1d", causal_conv1d_fn=_causal_conv1d_fn, causal_conv1d_update=_causal_conv1d_update)


def load_public(modeling_path: Path) -> types.ModuleType:
    """Import the (edited) public modeling file as package ``hymba_public``."""
    # Let Transformers probe for flash-attn before the stand-in (which has no spec) exists.
    import transformers.generation  # noqa: F401
    import transformers.modeling_utils  # noqa: F401

    _install_stand_ins()
    source = modeling_path.read_text()
    for old, new in PUBLIC_CODE_EDITS:
        if old not in source:
            raise RuntimeError(f"public code changed; cannot apply edit {old!r}")
        source = source.replace(old, new)
    pkg = Path(tempfile.mkdtemp(prefix="hymba_public_")) / "hymba_public"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "configuration_hymba.py").write_text((modeling_path.parent / "configuration_hymba.py").read_text())
    (pkg / "modeling_hymba.py").write_text(source)
    sys.path.insert(0, str(pkg.parent))
    mod = importlib.import_module("hymba_public.modeling_hymba")
    # The stand-in flash-attn behaves like flash-attn >= 2.1 (bottom-right causal alignment).
    mod.is_flash_attn_greater_or_equal_2_10 = lambda: True
    # Transformers 5 wants the tied-weights declaration as a mapping.
    mod.HymbaForCausalLM._tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    cache_cls = mod.HybridMambaAttentionDynamicCache
    # Transformers 5 DynamicCache lost these; the public cache never calls DynamicCache.__init__.
    cache_cls.get_usable_length = lambda self, new_len, layer_idx=0: self.get_seq_length(layer_idx)
    cache_cls.__getitem__ = lambda self, i: (self.key_cache[i], self.value_cache[i])
    cache_cls.__bool__ = lambda self: True
    return mod


# ----------------------------------------------------------------------------- configurations

CONFIGS = {
    "published-like": dict(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=8,
        num_memory_tokens=4, sliding_window=6, global_attn_idx=[0, 3, 5], kv_reuse_group=[[1, 2], [4]],
        rope=True, rope_type="ntk", orig_max_position_embeddings=32, max_position_embeddings=64,
        seq_length=256, kq_norm="none", attn_implementation_new="flex", mamba_inner_layernorms=True,
        tie_word_embeddings=True, num_experts=1, num_experts_per_tok=1, mlp_hidden_act="silu",
    ),
    "variant": dict(
        vocab_size=97, hidden_size=64, intermediate_size=80, num_hidden_layers=5, num_attention_heads=4,
        num_key_value_heads=1, mamba_d_state=4, mamba_d_conv=3, mamba_expand=2, mamba_dt_rank=6,
        num_memory_tokens=3, sliding_window=5, global_attn_idx=[0], kv_reuse_group=[[1, 2, 3]],
        rope=True, rope_type="default", max_position_embeddings=64, seq_length=256, kq_norm="perhead-rms",
        attn_implementation_new="flex", mamba_inner_layernorms=False, mamba_proj_bias=True,
        tie_word_embeddings=False, num_experts=1, num_experts_per_tok=1, mlp_hidden_act="silu",
    ),
    # five query heads per key/value head as in the published model, periodic KV reuse,
    # rms kq-norm, dynamic NTK rope (grows past orig_max_position_embeddings), relu2 MLP
    "variant-2": dict(
        vocab_size=97, hidden_size=80, intermediate_size=64, num_hidden_layers=5, num_attention_heads=5,
        num_key_value_heads=1, mamba_d_state=4, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=5,
        num_memory_tokens=3, sliding_window=4, global_attn_idx=[0, 4], kv_reuse_every_i_layer=2,
        rope=True, rope_type="dynamic_ntk", orig_max_position_embeddings=16, max_position_embeddings=64,
        seq_length=256, kq_norm="rms", attn_implementation_new="flex", mamba_inner_layernorms=True,
        mamba_conv_bias=False, tie_word_embeddings=False, num_experts=1, num_experts_per_tok=1,
        mlp_hidden_act="relu2",
    ),
}


def build_pair(public, fields: dict):
    from hf_shedder.models.hymba import HymbaConfig, HymbaForCausalLM

    torch.manual_seed(0)
    ref_config = public.HymbaConfig(**fields)
    # The public attention casts float32 inputs to this dtype (it was only run in bf16).
    ref_config._pre_quantization_dtype = torch.float32
    ref = public.HymbaForCausalLM(ref_config).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move every parameter off its neat initial value
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    ours = HymbaForCausalLM(HymbaConfig(**fields)).eval()
    ours_keys, ref_keys = set(ours.state_dict()), set(ref.state_dict())
    if ours_keys != ref_keys:
        raise AssertionError(f"state-dict keys differ: only ours {ours_keys - ref_keys}, only public {ref_keys - ours_keys}")
    ours.load_state_dict(ref.state_dict(), strict=True)
    if fields.get("tie_word_embeddings"):
        assert torch.equal(ours.lm_head.weight, ours.model.embed_tokens.weight)
    return ref, ours


def public_prefill(public, ref, prompt: torch.Tensor):
    """First forward with a fresh public cache; positions as the public generate() makes them."""
    mem = ref.config.num_memory_tokens
    cache = public.HybridMambaAttentionDynamicCache(
        ref.config, prompt.shape[0], torch.float32, device="cpu", layer_type=ref.config.layer_type
    )
    positions = torch.arange(mem + prompt.shape[1])[None].expand(prompt.shape[0], -1)
    return ref(input_ids=prompt, position_ids=positions, past_key_values=cache, use_cache=True), cache


def public_decode(public, ref, prompt: torch.Tensor, steps: int):
    """Greedy decoding with the public cache, driven by hand (its generate() predates Transformers 5)."""
    mem = ref.config.num_memory_tokens
    out, cache = public_prefill(public, ref, prompt)
    logits, tokens = [out.logits[:, -1]], []
    for _ in range(steps):
        nxt = logits[-1].argmax(-1, keepdim=True)
        tokens.append(nxt)
        pos = torch.tensor([[mem + prompt.shape[1] + len(tokens) - 1]])
        out = ref(input_ids=nxt, position_ids=pos, past_key_values=cache, use_cache=True)
        logits.append(out.logits[:, -1])
    return torch.cat(tokens, 1), torch.stack(logits, 1)


def ours_decode(ours, prompt: torch.Tensor, steps: int):
    out = ours(input_ids=prompt, use_cache=True)
    cache = out.past_key_values
    logits, tokens = [out.logits[:, -1]], []
    for _ in range(steps):
        nxt = logits[-1].argmax(-1, keepdim=True)
        tokens.append(nxt)
        out = ours(input_ids=nxt, past_key_values=cache, use_cache=True)
        logits.append(out.logits[:, -1])
    return torch.cat(tokens, 1), torch.stack(logits, 1)


class narrowed_windows:
    """Context manager: our sliding-window layers see one past token fewer (window - 1)."""

    def __init__(self, model) -> None:
        self.attns = [layer.mamba.self_attn for layer in model.model.layers if not layer.mamba.self_attn.is_global]

    def __enter__(self) -> None:
        for attn in self.attns:
            attn.sliding_window -= 1

    def __exit__(self, *exc) -> None:
        for attn in self.attns:
            attn.sliding_window += 1


def uncached_logits(model, prompt: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    full = torch.cat([prompt, tokens], 1)
    return model(input_ids=full, use_cache=False).logits[:, prompt.shape[1] - 1 :].float()


def _verdict(good: bool) -> str:
    return "OK" if good else "FAIL"


def check(public, name: str, fields: dict) -> bool:
    ref, ours = build_pair(public, fields)
    ok = True
    window = fields["sliding_window"]
    with torch.no_grad():
        ids = torch.randint(0, fields["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(2))
        a = ref(input_ids=ids, use_cache=False).logits.float()
        b = ours(input_ids=ids, use_cache=False).logits.float()
        diff = (a - b).abs().max().item()
        ok &= diff < ATOL
        print(f"[{name}] full-sequence logits, {ids.shape[1]} tokens (> window {window}), "
              f"max |logit| {a.abs().max().item():.2f}: max |diff| = {diff:.2e} {_verdict(diff < ATOL)}")

        a_pre = public_prefill(public, ref, ids)[0].logits.float()
        b_pre = ours(input_ids=ids, use_cache=True).logits.float()
        # With a cache, the public model strips the meta-token positions only when the cache
        # is still empty *after* the forward, i.e. never: its prefill logits start with one
        # row per meta token.  Ours returns token positions only; compare those.
        extra = a_pre.shape[1] - b_pre.shape[1]
        diff = (a_pre[:, extra:] - b_pre).abs().max().item()
        ok &= diff < ATOL and extra in (0, fields["num_memory_tokens"])
        print(f"[{name}] same prompt as a cached prefill (flex path with cache; public output has {extra} "
              f"leading meta-token rows, dropped): max |diff| = {diff:.2e} {_verdict(diff < ATOL)}")

        with tempfile.TemporaryDirectory() as tmp:  # a checkpoint saved by the public code loads into ours
            del ref.config._pre_quantization_dtype  # not JSON-serialisable; only our CPU run needs it
            ref.save_pretrained(tmp)
            ref.config._pre_quantization_dtype = torch.float32
            from hf_shedder.models.hymba import HymbaForCausalLM

            loaded, info = HymbaForCausalLM.from_pretrained(tmp, output_loading_info=True)
            c = loaded.eval()(input_ids=ids, use_cache=False).logits.float()
        clean = not info["missing_keys"] and not info["unexpected_keys"]
        diff = (a - c).abs().max().item()
        ok &= clean and diff < ATOL
        print(f"[{name}] public save_pretrained -> our from_pretrained: missing={list(info['missing_keys'])} "
              f"unexpected={list(info['unexpected_keys'])}, max |diff| = {diff:.2e} "
              f"{_verdict(clean and diff < ATOL)}")

        prompt = ids[:1, :2]
        steps = window - prompt.shape[1]  # context stays inside the window
        t_ref, l_ref = public_decode(public, ref, prompt, steps)
        t_our, l_our = ours_decode(ours, prompt, steps)
        diff = (l_ref - l_our).abs().max().item()
        same = torch.equal(t_ref, t_our)
        ok &= same and diff < ATOL
        print(f"[{name}] cached greedy decoding inside the window ({steps} new tokens): tokens equal={same}, "
              f"max |diff| = {diff:.2e} {_verdict(same and diff < ATOL)}")

        steps = window + 6
        t_our, l_our = ours_decode(ours, prompt, steps)
        self_diff = (l_our - uncached_logits(ours, prompt, t_our)).abs().max().item()
        t_ref, l_ref = public_decode(public, ref, prompt, steps)
        ref_self = (l_ref - uncached_logits(ref, prompt, t_ref)).abs().max().item()
        with narrowed_windows(ours):
            t_nar, l_nar = ours_decode(ours, prompt, steps)
        nar_diff = (l_ref - l_nar).abs().max().item()
        print(f"[{name}] beyond the window ({steps} new tokens), informative: ours cached vs ours uncached "
              f"{self_diff:.2e}; public cached vs public uncached {ref_self:.2e}; tokens equal="
              f"{torch.equal(t_ref, t_our)}; public cached vs ours with windows narrowed by one {nar_diff:.2e}, "
              f"tokens equal={torch.equal(t_ref, t_nar)}")
    return ok


def main(argv: list[str]) -> int:
    """0: all comparisons passed; 1: a mismatch; 2: the comparison could not be run."""
    if len(argv) != 1:
        print(__doc__)
        print("CANNOT RUN: expected one argument, the folder holding the public modeling_hymba.py")
        return 2
    path = Path(argv[0])
    if path.is_dir():
        path = path / "modeling_hymba.py"
    if not path.is_file() or not (path.parent / "configuration_hymba.py").is_file():
        print(f"SKIP (exit 2, nothing compared): public Hymba code not found at {path} "
              "(needs modeling_hymba.py and configuration_hymba.py side by side; see the docstring)")
        return 2
    for module, why in (("einops", "the public Hymba code imports it"),
                        ("torch.nn.attention.flex_attention", "the public Hymba code needs torch >= 2.5")):
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            print(f"SKIP (exit 2, nothing compared): {module} is not importable ({why})")
            return 2
    try:
        public = load_public(path)
    except (ImportError, RuntimeError) as err:
        print(f"SKIP (exit 2, nothing compared): the public code could not be loaded: {err!r}")
        return 2
    assert "window_size" in inspect.signature(sys.modules["flash_attn"].flash_attn_func).parameters
    results = [check(public, name, fields) for name, fields in CONFIGS.items()]
    print("EQUIVALENT" if all(results) else "MISMATCH")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
