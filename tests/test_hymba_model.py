"""Tests of the hf_shedder Hymba model (tiny random configs, CPU)."""

from __future__ import annotations

import pytest
import torch

from hf_shedder.compat import CACHE_KWARG
from hf_shedder.models.hymba import HymbaCache, HymbaConfig, HymbaForCausalLM


def tiny_config(**overrides) -> HymbaConfig:
    fields = dict(
        vocab_size=61,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=5,
        num_attention_heads=4,
        num_key_value_heads=2,
        mamba_d_state=4,
        mamba_d_conv=3,
        mamba_dt_rank=4,
        num_memory_tokens=3,
        sliding_window=4,
        global_attn_idx=[0, 4],
        kv_reuse_group=[[1, 2, 3]],
        rope=True,
        rope_type="ntk",
        orig_max_position_embeddings=16,
        max_position_embeddings=64,
        kq_norm="none",
        tie_word_embeddings=True,
        use_cache=True,
    )
    fields.update(overrides)
    return HymbaConfig(**fields)


def tiny_model(**overrides) -> HymbaForCausalLM:
    torch.manual_seed(0)
    model = HymbaForCausalLM(tiny_config(**overrides)).eval()
    with torch.no_grad():  # norms start at one; perturb so every parameter matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def ids(batch: int = 2, length: int = 11, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 61, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_forward_shapes_and_loss():
    model = tiny_model()
    x = ids()
    out = model(input_ids=x, labels=x, use_cache=False, output_hidden_states=True)
    assert out.logits.shape == (2, 11, 61)
    assert torch.isfinite(out.loss)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert all(h.shape == (2, 11, 32) for h in out.hidden_states)


def test_published_config_fields_load():
    cfg = HymbaConfig(
        hidden_size=1600, num_attention_heads=25, num_key_value_heads=5, mamba_expand=2,
        attn_implementation="flex", kq_norm="none", v_head_dim=128, conv_dim={"0": 3200},
        global_attn_idx=[0, 15, 31], kv_reuse_group=[[1, 2], [16, 17, 18]], mlp_hidden_act="silu",
        sliding_window=1024,
    )
    assert cfg.v_head_dim == 128 and cfg.attn_implementation_new == "flex"
    assert cfg.kv_producer_of()[17] == 16 and cfg.kv_producer_of()[15] is None
    # with a sliding window, only the layers of global_attn_idx attend to the whole past
    assert cfg.is_global_layer(15) is True and cfg.is_global_layer(31) is True
    assert cfg.is_global_layer(14) is False and cfg.is_global_layer(16) is False
    cfg.sliding_window = None
    assert cfg.is_global_layer(14) is True


def test_meta_tokens_change_the_output():
    model = tiny_model()
    x = ids()
    base = model(input_ids=x, use_cache=False).logits
    with torch.no_grad():
        model.model.memory_tokens.add_(1.0)
    moved = model(input_ids=x, use_cache=False).logits
    assert not torch.allclose(base, moved)
    # every position sees the meta tokens, even past the sliding window
    assert (base - moved).abs().amax(dim=(0, 2)).min() > 0


def test_kv_sharing_consumers_have_no_own_kv_and_use_producer():
    model = tiny_model()
    blocks = [layer.mamba for layer in model.model.layers]
    assert blocks[1].k_size > 0 and blocks[2].k_size == 0 and blocks[3].k_size == 0
    widths = [b.in_proj.out_features for b in blocks]
    assert widths[2] < widths[1]
    x = ids()
    base = model(input_ids=x, use_cache=False).logits
    # the consumers read the producer's keys/values: changing only the producer's key
    # projection rows changes layer 2 and 3 attention even with layer 1 attention off
    blocks[1].attn_off = True
    before = model(input_ids=x, use_cache=False).logits
    with torch.no_grad():
        q = blocks[1].q_size
        blocks[1].in_proj.weight[q : q + blocks[1].k_size].mul_(-1.0)
    after = model(input_ids=x, use_cache=False).logits
    blocks[1].attn_off = False
    assert not torch.allclose(before, after)
    assert not torch.allclose(base, before)


def test_sliding_window_limits_context_and_global_layers_do_not():
    torch.manual_seed(0)
    swa_only = tiny_model(global_attn_idx=[], kv_reuse_group=None, num_hidden_layers=1)
    swa_only.model.layers[0].mamba.ssm_off = True  # only attention carries context
    x = ids(1, 12)
    y = x.clone()
    y[0, 0] = (y[0, 0] + 1) % 61
    a = swa_only(input_ids=x, use_cache=False).logits
    b = swa_only(input_ids=y, use_cache=False).logits
    # token 0 is outside the last position's window (3 meta + window 4): no influence
    assert torch.allclose(a[0, -1], b[0, -1], atol=1e-6)
    assert not torch.allclose(a[0, 1], b[0, 1])
    swa_only.model.layers[0].mamba.self_attn.is_global = True
    c = swa_only(input_ids=x, use_cache=False).logits
    d = swa_only(input_ids=y, use_cache=False).logits
    assert not torch.allclose(c[0, -1], d[0, -1])


def test_save_and_reload_round_trip(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    loaded, info = HymbaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    x = ids()
    torch.testing.assert_close(loaded.eval()(input_ids=x).logits, model(input_ids=x).logits)
    assert set(loaded.state_dict()) == set(model.state_dict())


@pytest.mark.parametrize("overrides", [{}, {"kq_norm": "perhead-rms", "rope_type": "dynamic_ntk"}])
def test_cached_greedy_generation_equals_uncached(overrides):
    model = tiny_model(**overrides)
    prompt = ids(1, 3, seed=3)
    new = 9  # runs past the sliding window, so the window-trimmed cache is exercised
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=new, do_sample=False, use_cache=True)
        uncached = model.generate(prompt, max_new_tokens=new, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    # and token-by-token logits through the cache match full-sequence logits
    with torch.no_grad():
        full = model(input_ids=cached, use_cache=False).logits
        out = model(input_ids=cached[:, :3], use_cache=True)
        cache = getattr(out, CACHE_KWARG)
        assert isinstance(cache, HymbaCache)
        steps = [out.logits[:, -1]]
        for t in range(3, cached.shape[1]):
            out = model(input_ids=cached[:, t : t + 1], cache=cache, use_cache=True)
            steps.append(out.logits[:, -1])
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 2:], atol=1e-5, rtol=1e-4)
    assert cache.keys[1].shape[2] <= model.config.num_memory_tokens + model.config.sliding_window


def test_right_padding_does_not_change_real_positions():
    model = tiny_model()
    a, b = ids(1, 9, seed=5), ids(1, 6, seed=6)
    batch = torch.cat([a, torch.cat([b, torch.zeros(1, 3, dtype=torch.long)], 1)])
    mask = torch.ones_like(batch)
    mask[1, 6:] = 0
    with torch.no_grad():
        padded = model(input_ids=batch, attention_mask=mask, use_cache=False).logits
        alone = model(input_ids=b, use_cache=False).logits
        first = model(input_ids=a, use_cache=False).logits
    torch.testing.assert_close(padded[1, :6], alone[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(padded[0], first[0], atol=1e-5, rtol=1e-4)


# The config.json published with nvidia/Hymba-1.5B-Base (every field, as shipped;
# conv_dim and layer_type written as comprehensions instead of 32 literal entries).
PUBLISHED_1_5B_CONFIG = {
    "architectures": ["HymbaForCausalLM"], "attention_dropout": 0.0, "attn_hidden_size": -1,
    "attn_implementation": "flex", "attn_implementation_new": "flex",
    "auto_map": {"AutoConfig": "configuration_hymba.HymbaConfig", "AutoModelForCausalLM": "modeling_hymba.HymbaForCausalLM"},
    "bos_token_id": 1, "calc_logits_for_entire_prompt": False, "conv_dim": {str(i): 3200 for i in range(32)},
    "eos_token_id": 2, "global_attn_idx": [0, 15, 31], "hidden_act": "silu", "hidden_size": 1600,
    "initializer_range": 0.02, "intermediate_size": 5504, "kq_head_dim": -1, "kq_norm": "none",
    "kv_reuse_every_i_layer": -1,
    "kv_reuse_group": [[1, 2], [3, 4], [5, 6], [7, 8], [9, 10], [11, 12], [13, 14], [16, 17, 18], [19, 20],
                       [21, 22], [23, 24], [25, 26], [27, 28], [29, 30]],
    "kv_weight_reuse": False, "layer_type": ["h"] * 32, "mamba_conv_bias": True, "mamba_d_conv": 4,
    "mamba_d_state": 16, "mamba_dt_rank": 100, "mamba_expand": 2, "mamba_inner_layernorms": True,
    "mamba_proj_bias": False, "max_position_embeddings": 8192, "memory_tokens_interspersed_every": 0,
    "mlp_hidden_act": "silu", "model_type": "hymba", "num_attention_heads": 25, "num_experts": 1,
    "num_experts_per_tok": 1, "num_hidden_layers": 32, "num_key_value_heads": 5, "num_mamba": 1,
    "num_memory_tokens": 128, "orig_max_position_embeddings": 2048, "output_router_logits": False,
    "pad_token_id": 0, "rms_norm_eps": 1e-06, "rope": True, "rope_theta": 10000.0, "rope_type": "ntk",
    "router_aux_loss_coef": 0.001, "seq_length": 8192, "sliding_window": 1024, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "transformers_version": "4.44.0", "use_cache": False, "use_mamba_kernels": True,
    "v_head_dim": 128, "vocab_size": 32001,
}

# State-dict keys and shapes of the public remote code (modeling_hymba.py of
# nvidia/Hymba-1.5B-Base) for that config, recorded by building it on the meta device
# (2026-12-01, see docs/hymba_equivalence.md).  No key list of the checkpoint file
# itself was found in a public source; the total, 1,522,797,824 parameters with the
# tied embedding counted once, agrees with the "1.52B params" published for it.
PUBLISHED_TOP_LEVEL = {
    "model.embed_tokens.weight": (32001, 1600),
    "model.memory_tokens": (128, 1600),
    "model.final_layernorm.weight": (1600,),
    "lm_head.weight": (32001, 1600),
}
PUBLISHED_PER_LAYER = {
    "input_layernorm.weight": (1600,),
    "mamba.A_log.0": (3200, 16),
    "mamba.B_layernorm.weight": (16,),
    "mamba.C_layernorm.weight": (16,),
    "mamba.D.0": (3200,),
    "mamba.conv1d.bias": (3200,),
    "mamba.conv1d.weight": (3200, 1, 4),
    "mamba.dt_layernorm.weight": (100,),
    "mamba.dt_proj.0.bias": (3200,),
    "mamba.dt_proj.0.weight": (3200, 100),
    "mamba.in_proj.weight": None,  # (8960, 1600) with own keys/values, (8000, 1600) when reusing them
    "mamba.out_proj.weight": (1600, 3200),
    "mamba.pre_avg_layernorm1.weight": (3200,),
    "mamba.pre_avg_layernorm2.weight": (3200,),
    "mamba.x_proj.0.weight": (132, 3200),
    "moe.experts.0.down_proj.weight": (1600, 5504),
    "moe.experts.0.gate_proj.weight": (5504, 1600),
    "moe.experts.0.up_proj.weight": (5504, 1600),
    "pre_moe_layernorm.weight": (1600,),
}
PUBLISHED_KV_CONSUMERS = {2, 4, 6, 8, 10, 12, 14, 17, 18, 20, 22, 24, 26, 28, 30}


def test_published_1_5b_state_dict_keys_and_shapes():
    config = HymbaConfig.from_dict(dict(PUBLISHED_1_5B_CONFIG))
    with torch.device("meta"):  # no memory, no init cost
        model = HymbaForCausalLM(config)
    expected = dict(PUBLISHED_TOP_LEVEL)
    for i in range(32):
        for suffix, shape in PUBLISHED_PER_LAYER.items():
            if shape is None:
                shape = (8000, 1600) if i in PUBLISHED_KV_CONSUMERS else (8960, 1600)
            expected[f"model.layers.{i}.{suffix}"] = shape
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert set(got) == set(expected), (sorted(set(got) - set(expected)), sorted(set(expected) - set(got)))
    assert {k: v for k, v in got.items() if expected[k] != v} == {}
    assert len(got) == 612
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == 1_522_797_824  # parameters() counts the tie once
    assert config.v_head_dim == 128 and config.attn_implementation_new == "flex"
