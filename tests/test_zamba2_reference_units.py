"""Zamba2 units of the Mamba-Shedder reference (hybrid/Zamba2-Pruning): mamba_block, mha, mlp, mlp_width.

The reference's layer arithmetic is restated here from its patch (patches/zamba2-7593823.patch) and
preprocessing (preprocess.py: each use its own copy, LoRA merged into the weights), with no hf_shedder
code in the restatement; masked search, physical extraction, saved/loaded models, plan files and the
staged exact-mode search are checked against it.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from hf_shedder.arch import get_adapter
from hf_shedder.arch.zamba2_uses import Zamba2UseBlock, untie_message
from hf_shedder.data import CalibrationSet
from hf_shedder.errors import PlanError
from hf_shedder.modeling import PrunedMambaForCausalLM
from hf_shedder.search import SearchSettings
from hf_shedder.search.staged import Stage, staged_search
from hf_shedder.units import Plan, Unit, load_plan_for
from tests.tiny_hybrids import VOCAB, build_tiny_hybrid

SIZE = 48  # tiny_hybrids' Zamba2 intermediate_size; layers 1, 3, 5 are the uses 0, 1, 2 of blocks 0, 1, 0
PLANS = {
    "mamba_block@hybrid": [Unit("mamba_block", 1)],
    "mamba_block@mamba": [Unit("mamba_block", 2)],
    "mha": [Unit("mha", 3)],
    "mlp": [Unit("mlp", 1)],
    "mlp_width": [Unit("mlp_width", 5, tuple(range(40, 48))), Unit("mlp_width", 5, tuple(range(32, 40)))],
    "mha+mlp": [Unit("mha", 1), Unit("mlp", 1)],
    "mixed": [Unit("ssm", 4), Unit("mamba_block", 4), Unit("mha", 5), Unit("mlp_width", 1, tuple(range(40, 48))),
              Unit("mlp", 3), Unit("mamba_block", 3)],
}


def _ids(n: int = 2, length: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- the reference, restated
def _merged(linear: torch.nn.Linear, adapter: torch.nn.Module) -> torch.Tensor:
    """preprocess.py: W + B @ A of this use's adapter."""
    return linear.weight + adapter[1].weight @ adapter[0].weight


def reference_hybrid_layer(layer, use: int, h, emb, rope, mask_mha=False, mask_mlp=False, width=SIZE,
                           mask_mamba_block=False):
    """The patched Zamba2 hybrid layer: block (own copy, merged LoRA), linear, Mamba decoder."""
    st = layer.shared_transformer
    attn, mlp = st.self_attn, st.feed_forward
    x = h
    if not mask_mha:
        x = st.input_layernorm(torch.cat([h, emb], dim=-1))
        b, t, _ = x.shape
        hd = attn.head_dim
        q = F.linear(x, _merged(attn.q_proj, attn.linear_q_adapter_list[use])).view(b, t, -1, hd).transpose(1, 2)
        k = F.linear(x, _merged(attn.k_proj, attn.linear_k_adapter_list[use])).view(b, t, -1, hd).transpose(1, 2)
        v = F.linear(x, _merged(attn.v_proj, attn.linear_v_adapter_list[use])).view(b, t, -1, hd).transpose(1, 2)
        cos, sin = rope
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

        def rot(y):
            y1, y2 = y[..., : y.shape[-1] // 2], y[..., y.shape[-1] // 2:]
            return torch.cat([-y2, y1], dim=-1)

        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        scores = (q @ k.transpose(-1, -2)) * (hd / 2) ** -0.5
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        x = attn.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1))
    if not mask_mlp:
        x = st.pre_ff_layernorm(x)
        w = _merged(mlp.gate_up_proj, mlp.gate_up_proj_adapter_list[use])
        gate = F.linear(x, w[:width])  # the reference's fc1 halves, a prefix of each kept
        up = F.linear(x, w[SIZE: SIZE + width])
        x = F.linear(mlp.act_fn(gate) * up, mlp.down_proj.weight[:, :width])
    decoder = layer.mamba_decoder
    y = h + layer.linear(x)  # transformer_hidden_states added before the mask test
    if mask_mamba_block:
        return y
    return h + decoder.mamba(decoder.input_layernorm(y))


@pytest.mark.parametrize("case", [
    dict(layer=1, kw={"mask_mamba_block": True}, units=[Unit("mamba_block", 1)]),
    dict(layer=3, kw={"mask_mha": True}, units=[Unit("mha", 3)]),
    dict(layer=1, kw={"mask_mlp": True}, units=[Unit("mlp", 1)]),
    dict(layer=5, kw={"width": 36}, units=[Unit("mlp_width", 5, tuple(range(36, 48)))]),
    dict(layer=5, kw={"mask_mha": True, "mask_mlp": True, "mask_mamba_block": True},
         units=[Unit("mha", 5), Unit("mlp", 5), Unit("mamba_block", 5)]),
    dict(layer=1, kw={}, units=[]),
], ids=["mamba_block", "mha", "mlp", "mlp_width", "all", "none"])
def test_layer_computes_the_reference_patch(case):
    model = build_tiny_hybrid("zamba2", attn_implementation="eager")
    adapter = get_adapter(model)
    ids = _ids()
    with torch.no_grad():
        h0, ctx = adapter.embed(ids, None)
        h = torch.randn_like(h0)
        layer = adapter.layers()[case["layer"]]
        expected = reference_hybrid_layer(layer, [1, 3, 5].index(case["layer"]), h, ctx["original"], ctx["rope"],
                                          **case["kw"])
        with adapter.masked(Plan(case["units"], "zamba2", 6)):
            got = adapter.run_layer(case["layer"], h, ctx)
        pruned = copy.deepcopy(model)
        get_adapter(pruned).apply_plan(Plan(case["units"], "zamba2", 6))
        physical = get_adapter(pruned).run_layer(case["layer"], h, ctx)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(physical, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", list(PLANS))
def test_masked_equals_physical(name):
    model = build_tiny_hybrid("zamba2")
    adapter, ids = get_adapter(model), _ids()
    plan = Plan(PLANS[name], "zamba2", 6)
    with torch.no_grad():
        base = model(ids).logits
        with adapter.masked(plan):
            masked = model(ids).logits
            layerwise = adapter.layerwise_logits(ids)
        assert torch.equal(model(ids).logits, base)  # the mask is undone
        pruned = copy.deepcopy(model)
        get_adapter(pruned).apply_plan(plan)
        physical = pruned(ids).logits
    assert (masked - base).abs().max() > 1e-4  # the unit matters
    torch.testing.assert_close(physical, masked, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layerwise, masked, atol=1e-5, rtol=1e-5)


def test_touched_uses_get_untied_copies_saved_and_counted(tmp_path, capsys):
    model = build_tiny_hybrid("zamba2")
    ids = _ids()
    shared0 = model.model.layers[1].shared_transformer.feed_forward.gate_up_proj.weight
    assert shared0 is model.model.layers[5].shared_transformer.feed_forward.gate_up_proj.weight  # tied uses
    block1 = sum(p.numel() for p in model.model.layers[3].shared_transformer.parameters())
    plan = Plan([Unit("mha", 3), Unit("mlp_width", 5, tuple(range(24, 48)))], "zamba2", 6)
    with torch.no_grad(), get_adapter(model).masked(plan):
        masked = model(ids).logits
    pruned = PrunedMambaForCausalLM.from_base(copy.deepcopy(model), plan)
    layers = pruned.model.model.layers
    assert isinstance(layers[5].shared_transformer, Zamba2UseBlock) and isinstance(layers[3].shared_transformer,
                                                                                   Zamba2UseBlock)
    assert layers[5].shared_transformer.feed_forward.gate_up_proj.weight.shape[0] == 48
    assert layers[1].shared_transformer.feed_forward.gate_up_proj.weight.shape[0] == 2 * SIZE  # untouched, full
    assert layers[3].shared_transformer.self_attn is None
    copies = {id(p): p.numel() for i in (3, 5) for p in layers[i].shared_transformer.parameters()}
    info = pruned.model.shedder_untied
    assert info == {"uses": 2, "copy_params": sum(copies.values()), "freed_shared_params": block1}
    assert f"{sum(copies.values()) - block1:+,}" in untie_message(pruned)
    assert "layers.3.shared_transformer" not in pruned.model.model._tied_weights_keys
    pruned.save_pretrained(tmp_path)
    loaded = PrunedMambaForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, masked, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loaded(ids).logits, masked, atol=1e-5, rtol=1e-5)
    w5 = loaded.model.model.layers[5].shared_transformer.feed_forward.gate_up_proj.weight
    assert w5 is not loaded.model.model.layers[1].shared_transformer.feed_forward.gate_up_proj.weight


def test_rules_and_candidates():
    adapter = get_adapter(build_tiny_hybrid("zamba2"))
    plan = adapter.empty_plan()
    with pytest.raises(PlanError, match="prefix"):
        adapter.validate(Plan([Unit("mlp_width", 1, (0, 1))], "zamba2", 6))
    with pytest.raises(PlanError, match="cannot be mixed"):
        adapter.validate(Plan([Unit("mha", 1), Unit("mlp_channels", 1, (0, 1))], "zamba2", 6))
    with pytest.raises(PlanError, match="mamba_block"):
        adapter.validate(Plan([Unit("mamba_block", 3), Unit("ssm", 3)], "zamba2", 6))
    with pytest.raises(PlanError, match="mha"):
        adapter.validate(Plan([Unit("mha", 2)], "zamba2", 6))  # layer 2 is no use of a shared block
    group = adapter.width_group("mlp_width")
    cands = adapter.candidates(Plan([Unit("mlp", 3)], "zamba2", 6), ("mlp_width",))
    assert cands == [Unit("mlp_width", i, tuple(range(SIZE - group, SIZE))) for i in (1, 5)]
    block = adapter.candidates(plan, ("mamba_block", "mha", "mlp"))
    assert [u.kind for u in block] == ["mamba_block"] * 6 + ["mha"] * 3 + ["mlp"] * 3  # the reference's loop order


# ----------------------------------------------------------------------------- plan files
ZAMBA2_27B_USES = [6, 11, 17, 23, 29, 35, 41, 47, 53]
SHIPPED = {  # hybrid/Zamba2-Pruning/results/zamba2-2.7b/ratio_{10,15}/pruning_config.json
    "ratio_10": {"pruned_mamba_block_idx": [], "pruned_mha_idx": [], "pruned_mlp_idx": [6, 8, 7],
                 "pruned_mlp_channels": {"0": 3072, "1": 4096, "2": 8192, "3": 10240, "4": 6144, "5": 9216,
                                         "6": 10240, "7": 10240, "8": 10240},
                 "pruned_ssm_idx": [47, 42, 48, 43, 45, 37, 51, 40, 44, 46, 38, 41, 53, 49, 33, 31, 34, 50]},
    "ratio_15": {"pruned_mamba_block_idx": [13, 21, 44, 22, 28], "pruned_mha_idx": [], "pruned_mlp_idx": [6, 8, 7],
                 "pruned_mlp_channels": {"0": 3072, "1": 4096, "2": 7168, "3": 10240, "4": 6144, "5": 10240,
                                         "6": 10240, "7": 10240, "8": 10240},
                 "pruned_ssm_idx": [47, 51, 48, 43, 45, 37, 41, 40, 42, 53, 46, 49, 38, 34, 50, 52, 33, 31]},
}


@pytest.mark.parametrize("name", list(SHIPPED))
def test_shipped_zamba2_plans_load_with_their_meaning(name, tmp_path):
    types = ["hybrid" if i in ZAMBA2_27B_USES else "mamba" for i in range(54)]
    model = build_tiny_hybrid("zamba2", num_hidden_layers=54, layers_block_type=types, intermediate_size=10240,
                              hidden_size=16, mamba_ngroups=1, n_mamba_heads=2, num_attention_heads=2,
                              num_key_value_heads=2)
    adapter = get_adapter(model)
    data = SHIPPED[name]
    path = tmp_path / "pruning_config.json"
    path.write_text(json.dumps(data))
    plan = load_plan_for(adapter, path)
    assert [u.layer for u in plan.of_kind("mlp")] == [ZAMBA2_27B_USES[u] for u in (6, 8, 7)]
    assert [u.layer for u in plan.of_kind("ssm")] == data["pruned_ssm_idx"]
    assert [u.layer for u in plan.of_kind("mamba_block")] == data["pruned_mamba_block_idx"]
    widths = {u.layer: 10240 - len(u.indices) for u in plan.of_kind("mlp_width")}
    assert widths == {ZAMBA2_27B_USES[int(k)]: w for k, w in data["pruned_mlp_channels"].items() if w < 10240}
    assert adapter.reference_step_file(plan) == data  # written back as the reference writes it


def test_step_files_of_every_key_load_and_bad_ones_are_refused(tmp_path):
    adapter = get_adapter(build_tiny_hybrid("zamba2"))
    ok = {"pruned_mamba_block_idx": [2, 3], "pruned_mha_idx": [1], "pruned_mlp_idx": [0],
          "pruned_mlp_channels": {"0": SIZE, "1": SIZE, "2": 20}, "pruned_ssm_idx": [4]}
    plan = adapter.plan_from_reference(ok)
    assert list(plan) == [Unit("ssm", 4), Unit("mamba_block", 2), Unit("mamba_block", 3), Unit("mha", 3),
                          Unit("mlp_width", 5, tuple(range(20, SIZE))), Unit("mlp", 1)]
    for bad, match in (({"pruned_mha_idx": [3]}, "out of range"), ({"pruned_mlp_channels": {"0": 0}}, "width"),
                       ({"pruned_mlp_channels": {"x": 4}}, "use number"), ({"pruned_heads": [1]}, "unknown")):
        with pytest.raises(PlanError, match=match):
            adapter.plan_from_reference({**ok, **bad})


# ----------------------------------------------------------------------------- the staged exact search
def reference_ppl(model, ids, batch_size, pad_token_id):
    """utils.evaluate_ppl, restated (fp16 logits for the loss, ignore only if pad_token_id is truthy)."""
    loss_fn = torch.nn.CrossEntropyLoss(reduction="none", **({"ignore_index": pad_token_id} if pad_token_id else {}))
    nlls = []
    with torch.no_grad():
        for s in range(0, ids.shape[0], batch_size):
            batch = ids[s: s + batch_size]
            logits = model(input_ids=batch).logits.half()[:, :-1, :]
            labels = batch[:, 1:]
            nll = loss_fn(logits.permute(0, 2, 1), labels).float()
            mask = labels != loss_fn.ignore_index
            nlls.append((nll * mask).sum(dim=1) / mask.sum(dim=1))
    return torch.exp(torch.cat(nlls).mean()).item()


def test_staged_exact_search_matches_the_reference_loop(tmp_path):
    model = build_tiny_hybrid("zamba2")
    calibs = [CalibrationSet(_ids(4, 16, seed), torch.ones(4, 16, dtype=torch.long), f"s{seed}") for seed in (3, 4, 5)]
    stages = [Stage("block_pruning", ("mamba_block", "mha", "mlp"), 2), Stage("mlp_width", ("mlp_width",), 2),
              Stage("ssm", ("ssm",), 1)]
    settings = SearchSettings(units=("block",), steps=1, batch_size=2, exact_reference=True, reference_numerics=True,
                              early_abandon=False, ignore_token_id=None, extra={"mlp_width_group": 8})
    results = staged_search(model, calibs, settings, stages, out_dir=tmp_path, progress=False)

    # prune_hybrid.py's loops, restated: candidates of each stage, the strictly lowest ppl on the stage's sample
    adapter = get_adapter(model)
    config = {"mamba_block": [], "mha": [], "mlp": [], "width": {1: SIZE, 3: SIZE, 5: SIZE}, "ssm": []}

    def plan_of(cfg):
        units = [Unit("ssm", i) for i in cfg["ssm"]] + [Unit("mamba_block", i) for i in cfg["mamba_block"]]
        units += [Unit("mha", i) for i in cfg["mha"]]
        units += [Unit("mlp_width", i, tuple(range(w, SIZE))) for i, w in cfg["width"].items() if w < SIZE]
        return Plan(units + [Unit("mlp", i) for i in cfg["mlp"]], "zamba2", 6)

    def measure(cfg, ids):
        with adapter.masked(plan_of(cfg)):
            return reference_ppl(model, ids, 2, None)

    expected_steps = []
    for stage, calib in zip(stages, calibs):
        for _ in range(stage.steps):
            best, lowest, ppls = None, float("inf"), {}
            if stage.name == "block_pruning":
                cands = [(k, i) for k, ids_ in (("mamba_block", range(6)), ("mha", (1, 3, 5)), ("mlp", (1, 3, 5)))
                         for i in ids_ if i not in config[k]]
            elif stage.name == "mlp_width":
                cands = [("width", i) for i, w in config["width"].items() if w - 8 > 0 and i not in config["mlp"]]
            else:
                cands = [("ssm", i) for i in range(6) if i not in config["ssm"] and i not in config["mamba_block"]]
            for k, i in cands:
                trial = copy.deepcopy(config)
                if k == "width":
                    trial["width"][i] -= 8
                else:
                    trial[k].append(i)
                ppls[(k, i)] = ppl = measure(trial, calib.input_ids)
                if ppl < lowest:
                    best, lowest = (k, i), ppl
            k, i = best
            if k == "width":
                config["width"][i] -= 8
            else:
                config[k].append(i)
            expected_steps.append((best, lowest, ppls))

    got = [st for r in results for st in r.steps]
    assert len(got) == len(expected_steps) == 5
    for st, (best, lowest, ppls) in zip(got, expected_steps):
        kind = "mlp_width" if best[0] == "width" else best[0]
        assert (st["unit"]["kind"], st["unit"]["layer"]) == (kind, best[1])
        assert st["ppl"] == pytest.approx(lowest, rel=1e-6)
        assert len(st["candidates"]) == len(ppls)
    files = sorted((tmp_path / "pruned_model_configs").iterdir(), key=lambda p: int(p.name.split(".")[-2]))
    assert [p.name.split(".")[1] for p in files] == ["block_pruning"] * 2 + ["mlp_width"] * 2 + ["ssm"]
    last = json.loads(files[-1].read_text())
    assert load_plan_for(adapter, files[-1]) == adapter.plan_from_reference(last)
    assert last == {"pruned_mamba_block_idx": config["mamba_block"], "pruned_mha_idx": [[1, 3, 5].index(i) for i in config["mha"]],
                    "pruned_mlp_idx": [[1, 3, 5].index(i) for i in config["mlp"]], "pruned_ssm_idx": config["ssm"],
                    "pruned_mlp_channels": {str(k): config["width"][i] for k, i in enumerate((1, 3, 5))}}
    assert last == adapter.reference_step_file(results[-1].plan)
    log = json.loads((tmp_path / "log.json").read_text())
    assert [r["step"] for r in log["pruning_results"]] == list(range(5))
    assert [r["pruning_target"] for r in log["pruning_results"]] == [
        ("mlp_width" if b[0] == "width" else b[0]) for b, _, _ in expected_steps]
