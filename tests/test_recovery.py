"""LoRA recovery tuning (PEFT + Trainer) on tiny pruned models, with a small word-level tokenizer so the
vocabulary fits the tiny models (128) and sequences stay short."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

import hf_shedder
from hf_shedder import Plan, Unit
from hf_shedder import recovery as rec
from hf_shedder.errors import DataError
from hf_shedder.modeling import PrunedMambaForCausalLM
from hf_shedder.recovery import RecoveryError, default_training_args, recover
from tests.tiny_models import build_tiny

# fp32 on CPU: merging W + B@A * scale reorders float sums, so allow a few ulps of the logit scale
LOGIT_ATOL = 1e-4
MAXLEN = 96


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the 120 most frequent words of the bundled rows (ids < the tiny models' 128),
    so prompts are ~50 tokens and a training step takes a fraction of a second."""
    import collections
    import re

    from tokenizers import Tokenizer, models, pre_tokenizers

    counts: collections.Counter[str] = collections.Counter()
    for row in rec.load_instruction_rows("bundled"):
        counts.update(re.findall(r"\w+|[^\w\s]", rec.render_alpaca(row)))
    vocab = {"<|endoftext|>": 0, "<unk>": 1, **{w: i + 2 for i, (w, _) in enumerate(counts.most_common(120))}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", unk_token="<unk>",
                                   pad_token="<|endoftext|>")


def pruned_tiny(family: str = "mamba2", plan_units: list[Unit] | None = None) -> PrunedMambaForCausalLM:
    units = plan_units if plan_units is not None else [Unit("ssm", 1), Unit("block", 2)]
    return hf_shedder.prune(build_tiny(family, num_layers=4), Plan(units))


def args_for(out: str, steps: int, ckpt_dir: str | None = None, **kw):  # noqa: ANN003, ANN201
    settings = dict(max_steps=steps, per_device_train_batch_size=4, learning_rate=5e-3, warmup_steps=0,
                    logging_steps=1, save_steps=steps, disable_tqdm=True, dataloader_pin_memory=False)
    settings.update(kw)
    return default_training_args(ckpt_dir or os.path.join(out, "checkpoints"), **settings)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):  # noqa: ANN001, ANN201
    """One recovery run; the PEFT model's logits are captured just before merging."""
    out = str(tmp_path_factory.mktemp("recovered"))
    torch.manual_seed(0)
    model = pruned_tiny()
    probe = torch.randint(2, 122, (2, 40))
    with torch.no_grad():
        before = model(input_ids=probe).logits.clone()
    captured = {}
    original_merge = rec.merge_and_save

    def spy(peft_model, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        peft_model.eval()
        with torch.no_grad():
            captured["peft"] = peft_model(input_ids=probe).logits.clone()
        return original_merge(peft_model, *a, **k)

    rec.merge_and_save = spy
    try:
        result = recover(model, word_tokenizer(), "bundled", out, training_args=args_for(out, 8), max_length=MAXLEN,
                         val_size=8)
    finally:
        rec.merge_and_save = original_merge
    return {"out": out, "result": result, "probe": probe, "before": before, "peft": captured["peft"], "model": model}


def test_recovery_lowers_the_loss(trained) -> None:  # noqa: ANN001
    res = trained["result"]
    losses = [v for _, v in res.losses]
    assert len(losses) == 8
    first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    assert last < first, losses
    assert res.eval_loss_after < res.eval_loss_before


def test_merged_model_loads_back_with_the_peft_logits(trained) -> None:  # noqa: ANN001
    out, probe = trained["out"], trained["probe"]
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(loaded, PrunedMambaForCausalLM)
    assert loaded.plan == trained["model"].plan  # same pruned architecture
    with torch.no_grad():
        logits = loaded(input_ids=probe).logits
    # the adapter changed the model (else the comparison below would prove nothing) ...
    assert (trained["peft"] - trained["before"]).abs().max() > 100 * LOGIT_ATOL
    # ... and merging + saving + loading keeps exactly what the PEFT model computed
    torch.testing.assert_close(logits, trained["peft"], atol=LOGIT_ATOL, rtol=0)
    assert not any("lora" in k for k in loaded.state_dict())


def test_settings_are_recorded(trained) -> None:  # noqa: ANN001
    out = trained["out"]
    config = json.load(open(os.path.join(out, "config.json")))
    recovery = config["provenance"]["recovery"]
    assert recovery["lora_r"] == 8 and recovery["steps"] == 8 and recovery["learning_rate"] == 5e-3
    assert recovery["target_modules"] == sorted(rec.default_lora_targets(trained["model"]))
    on_disk = json.load(open(os.path.join(out, rec.RECOVERY_FILE)))
    assert on_disk["rows_used"] + on_disk["val_rows"] <= on_disk["rows_read"]
    assert on_disk["loss_curve"]["loss"] == [v for _, v in trained["result"].losses]
    assert Plan.load(os.path.join(out, rec.PLAN_FILE)) == trained["model"].plan


class _Crash(Exception):
    pass


def _crashing_at(monkeypatch, step: int) -> None:  # noqa: ANN001
    """Make the next recover() die when training reaches ``step`` (after the checkpoints before it)."""
    from transformers import TrainerCallback

    class Crash(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001, ANN003, ANN201
            if state.global_step + 1 == step:
                raise _Crash(f"simulated crash at step {step}")

    original = rec.build_trainer

    def build(*a, **k):  # noqa: ANN002, ANN003, ANN202
        trainer = original(*a, **k)
        trainer.add_callback(Crash())
        monkeypatch.setattr(rec, "build_trainer", original)  # only this run crashes
        return trainer

    monkeypatch.setattr(rec, "build_trainer", build)


def test_resume_matches_an_uninterrupted_run(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    tok = word_tokenizer()
    straight = recover(pruned_tiny(), tok, "bundled", str(tmp_path / "a"), max_length=MAXLEN,
                       training_args=args_for(str(tmp_path / "a"), 4, save_steps=2))
    # the same run, killed at step 3 (checkpoint-2 is on disk), then started again with the same settings
    out = str(tmp_path / "b")
    _crashing_at(monkeypatch, 3)
    with pytest.raises(_Crash):
        recover(pruned_tiny(), tok, "bundled", out, max_length=MAXLEN, training_args=args_for(out, 4, save_steps=2))
    assert os.path.isdir(os.path.join(out, "checkpoints", "checkpoint-2"))  # a failure keeps what was trained
    resumed = recover(pruned_tiny(), tok, "bundled", out, max_length=MAXLEN,
                      training_args=args_for(out, 4, save_steps=2))
    assert resumed.resumed_from.endswith("checkpoint-2")
    assert resumed.settings["steps"] == 4
    sd_a, sd_c = straight.model.state_dict(), resumed.model.state_dict()
    for k in sd_a:
        torch.testing.assert_close(sd_c[k], sd_a[k], atol=1e-5, rtol=1e-4, msg=k)
    # the mean loss covers all 4 steps (2 before the crash, 2 after), not this process's 2 divided by 4
    per_step = [v for _, v in resumed.losses]
    assert len(per_step) == 4 and resumed.settings["train_loss_mean_steps"] == 4
    assert resumed.settings["train_loss_mean"] == pytest.approx(sum(per_step) / 4)
    assert resumed.settings["train_loss_mean"] == pytest.approx(straight.settings["train_loss_mean"], rel=1e-4)


def test_mean_logged_loss_weights_each_log_by_its_steps() -> None:
    history = [{"loss": 4.0, "step": 10}, {"loss": 2.0, "step": 20}, {"loss": 1.0, "step": 25},
               {"train_loss": 9.0, "step": 25}]
    assert rec.mean_logged_loss(history) == (pytest.approx((40 + 20 + 5) / 25), 25)
    # resumed at step 22 (steps 21-22 were never logged): the last log covers steps 23-25 only
    assert rec.mean_logged_loss(history, resumed_step=22) == (pytest.approx((40 + 20 + 3) / 23), 23)


def test_changed_settings_do_not_resume_old_checkpoints(tmp_path) -> None:  # noqa: ANN001
    from peft import LoraConfig

    tok, ckpt = word_tokenizer(), str(tmp_path / "checkpoints")
    recover(pruned_tiny(), tok, "bundled", str(tmp_path / "a"), max_length=MAXLEN,
            training_args=args_for(str(tmp_path / "a"), 2, ckpt))
    before = sorted(os.listdir(ckpt))
    assert "checkpoint-2" in before and rec.RUN_FILE in before
    cases = [
        ({"lora": LoraConfig(r=4, target_modules=["in_proj"], task_type="CAUSAL_LM")}, {}, "lora_r: 8 there, 4 now"),
        ({}, {"learning_rate": 1e-3}, "learning_rate: 0.005 there, 0.001 now"),
        ({}, {"max_steps": 3}, "max_steps: 2 there, 3 now"),
        ({"max_length": MAXLEN - 8}, {}, "data_fingerprint"),
    ]
    for i, (kw, targs, message) in enumerate(cases):
        out = tmp_path / f"b{i}"
        kw = {"max_length": MAXLEN, **kw}
        with pytest.raises(RecoveryError, match="--overwrite") as err:
            recover(pruned_tiny(), tok, "bundled", str(out), training_args=args_for(str(out), 2, ckpt, **targs), **kw)
        assert message in str(err.value)
        assert not out.exists() and sorted(os.listdir(ckpt)) == before  # nothing written, nothing deleted
    # another model (other weights, same shapes) is refused too
    other = hf_shedder.prune(build_tiny("mamba2", num_layers=4, seed=1), Plan([Unit("ssm", 1), Unit("block", 2)]))
    with pytest.raises(RecoveryError, match="weights_checksum"):
        recover(other, tok, "bundled", str(tmp_path / "c"), max_length=MAXLEN,
                training_args=args_for(str(tmp_path / "c"), 2, ckpt))
    # resume=False refuses to train beside the old checkpoints (a later run would resume them)
    with pytest.raises(RecoveryError, match="earlier run"):
        recover(pruned_tiny(), tok, "bundled", str(tmp_path / "d"), max_length=MAXLEN,
                training_args=args_for(str(tmp_path / "d"), 2, ckpt), resume=False)
    # checkpoints without a record of their settings are not resumed blindly
    os.remove(os.path.join(ckpt, rec.RUN_FILE))
    with pytest.raises(RecoveryError, match="no recovery_run.json"):
        recover(pruned_tiny(), tok, "bundled", str(tmp_path / "e"), max_length=MAXLEN,
                training_args=args_for(str(tmp_path / "e"), 2, ckpt))


def test_overwrite_starts_afresh(tmp_path) -> None:  # noqa: ANN001
    from peft import LoraConfig

    tok, ckpt = word_tokenizer(), str(tmp_path / "checkpoints")
    recover(pruned_tiny(), tok, "bundled", str(tmp_path / "a"), max_length=MAXLEN,
            training_args=args_for(str(tmp_path / "a"), 4, ckpt, save_steps=4))
    assert "checkpoint-4" in os.listdir(ckpt)
    lora = LoraConfig(r=4, target_modules=["in_proj"], task_type="CAUSAL_LM")
    res = recover(pruned_tiny(), tok, "bundled", str(tmp_path / "a"), max_length=MAXLEN, lora=lora, overwrite=True,
                  training_args=args_for(str(tmp_path / "a"), 2, ckpt))
    assert res.resumed_from is None and res.settings["steps"] == 2 and res.settings["lora_r"] == 4
    assert sorted(n for n in os.listdir(ckpt) if n.startswith("checkpoint")) == ["checkpoint-2"]
    assert len(res.losses) == 2
    with pytest.raises(RecoveryError, match="cannot be combined"):
        recover(pruned_tiny(), tok, "bundled", str(tmp_path / "a"), overwrite=True, resume=True,
                training_args=args_for(str(tmp_path / "a"), 2, ckpt))


def test_failure_before_the_first_checkpoint_leaves_nothing(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    out = tmp_path / "out"
    _crashing_at(monkeypatch, 1)
    with pytest.raises(_Crash):
        recover(pruned_tiny(), word_tokenizer(), "bundled", str(out), max_length=MAXLEN,
                training_args=args_for(str(out), 2))
    assert not out.exists()


def test_tokenizer_without_eos_or_pad_is_refused_before_anything_is_written(tmp_path) -> None:  # noqa: ANN001
    from tokenizers import Tokenizer, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    out = tmp_path / "out"
    with pytest.raises(DataError, match="defines no eos or pad token, which recovery tuning"):
        recover(pruned_tiny(), PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>"), "bundled", str(out),
                training_args=args_for(str(out), 2))
    assert not out.exists()


def test_no_usable_rows(tmp_path) -> None:  # noqa: ANN001
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "say hi", "output": ""}) + "\n" + json.dumps({"text": "x"}) + "\n")
    out = tmp_path / "out"
    with pytest.raises(DataError, match="no usable rows"):
        recover(pruned_tiny(), word_tokenizer(), str(bad), str(out), training_args=args_for(str(out), 2))
    assert not out.exists()


def test_offline_hub_name_says_how_to_pass_a_file(tmp_path) -> None:  # noqa: ANN001
    out = tmp_path / "out"
    with pytest.raises(DataError, match="local JSON/JSONL file"):
        recover(pruned_tiny(), word_tokenizer(), "yahma/alpaca-cleaned", str(out), training_args=args_for(str(out), 2))
    assert not out.exists()


def test_lora_target_removed_by_pruning(tmp_path) -> None:  # noqa: ANN001
    from peft import LoraConfig

    # every SSM of a Mamba-1 model removed: x_proj / dt_proj exist nowhere any more
    model = pruned_tiny("mamba", [Unit("ssm", i) for i in range(4)])
    out = tmp_path / "out"
    lora = LoraConfig(r=4, target_modules=["in_proj", "x_proj"], task_type="CAUSAL_LM")
    with pytest.raises(RecoveryError, match="x_proj") as err:
        recover(model, word_tokenizer(), "bundled", str(out), training_args=args_for(str(out), 2), lora=lora)
    assert "in_proj" in str(err.value) and "out_proj" in str(err.value)  # lists what is available
    assert not out.exists()


def test_refuses_to_overwrite_a_model(trained, tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(RecoveryError, match="already holds a saved model"):
        recover(pruned_tiny(), word_tokenizer(), "bundled", trained["out"],
                training_args=args_for(str(tmp_path), 2))


def test_cli_recover(tmp_path) -> None:  # noqa: ANN001
    from hf_shedder.cli import main

    src, out = tmp_path / "pruned", tmp_path / "recovered"
    pruned_tiny().save_pretrained(src)
    word_tokenizer().save_pretrained(src)
    rc = main(["recover", str(src), "--data", "bundled", "--out", str(out), "--max-steps", "2", "--batch-size", "4",
               "--seqlen", str(MAXLEN), "--lora-r", "4", "--lr", "1e-3"])
    assert rc == 0
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(loaded, PrunedMambaForCausalLM)
    assert loaded.config.provenance["recovery"]["lora_r"] == 4
    assert main(["recover", str(src), "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "x")]) == 2


@pytest.mark.parametrize("family", ["zamba2", "nemotron_h"])
def test_recovery_of_a_pruned_hybrid(tmp_path, family) -> None:  # noqa: ANN001
    from tests.test_arch_hybrids import PLANS
    from tests.tiny_hybrids import build_tiny_hybrid

    model = hf_shedder.prune(build_tiny_hybrid(family), Plan(PLANS[family]["mixed"]))
    probe = torch.randint(2, 122, (2, 12))
    with torch.no_grad():
        before = model(input_ids=probe).logits.clone()
    out = str(tmp_path / "out")
    result = recover(model, word_tokenizer(), "bundled", out, training_args=args_for(out, 2), max_length=32)
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert loaded.plan == model.plan and not any("lora" in k for k in loaded.state_dict())
    with torch.no_grad():
        merged, reloaded = result.model(input_ids=probe).logits, loaded(input_ids=probe).logits
    assert (merged - before).abs().max() > 100 * LOGIT_ATOL  # the adapters were trained and merged
    torch.testing.assert_close(reloaded, merged, atol=LOGIT_ATOL, rtol=0)


def test_full_fine_tune_trains_every_weight_and_resumes(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """``full=True``: no LoRA, all weights move (not only in_proj), the loss goes down, the settings say so,
    and a crashed run resumes from its checkpoint to the same weights as a straight run."""
    tok = word_tokenizer()
    start = pruned_tiny()
    before = {k: v.clone() for k, v in start.state_dict().items()}
    straight = recover(start, tok, "bundled", str(tmp_path / "a"), max_length=MAXLEN, full=True,
                       training_args=args_for(str(tmp_path / "a"), 4, save_steps=2, learning_rate=1e-3))
    s = straight.settings
    assert s["method"] == "full fine-tune" and "lora_r" not in s
    assert s["trainable_params"] == sum(p.numel() for p in straight.model.parameters())
    moved = {k.split(".")[-2] for k, v in straight.model.state_dict().items() if not torch.equal(v, before[k])}
    assert {"in_proj", "out_proj", "conv1d"} <= moved, moved
    assert straight.last_loss < straight.first_loss
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    assert isinstance(loaded, PrunedMambaForCausalLM) and loaded.config.provenance["recovery"]["method"] == "full fine-tune"

    out = str(tmp_path / "b")
    _crashing_at(monkeypatch, 3)
    with pytest.raises(_Crash):
        recover(pruned_tiny(), tok, "bundled", out, max_length=MAXLEN, full=True,
                training_args=args_for(out, 4, save_steps=2, learning_rate=1e-3))
    resumed = recover(pruned_tiny(), tok, "bundled", out, max_length=MAXLEN, full=True,
                      training_args=args_for(out, 4, save_steps=2, learning_rate=1e-3))
    assert resumed.resumed_from.endswith("checkpoint-2") and resumed.settings["steps"] == 4
    for k, v in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[k], v, atol=1e-5, rtol=1e-4, msg=k)
    # a LoRA run does not resume the full run's checkpoints
    with pytest.raises(RecoveryError, match="method|lora"):
        recover(pruned_tiny(), tok, "bundled", str(tmp_path / "c"), max_length=MAXLEN,
                training_args=args_for(out, 4, ckpt_dir=os.path.join(out, "checkpoints"), save_steps=2,
                                       learning_rate=1e-3))


def test_cli_recover_full_uses_the_reference_learning_rate(tmp_path) -> None:  # noqa: ANN001
    from hf_shedder.cli import main

    src, out = tmp_path / "pruned", tmp_path / "recovered"
    pruned_tiny().save_pretrained(src)
    word_tokenizer().save_pretrained(src)
    assert main(["recover", str(src), "--data", "bundled", "--out", str(out), "--max-steps", "1", "--batch-size", "4",
                 "--seqlen", str(MAXLEN), "--full"]) == 0
    recovery = json.loads((out / "recovery.json").read_text())
    assert recovery["method"] == "full fine-tune" and recovery["learning_rate"] == 5e-5
    assert recovery["effective_batch_size"] == 4
    assert main(["recover", str(src), "--data", "bundled", "--out", str(tmp_path / "x"), "--full",
                 "--target-modules", "in_proj"]) == 2


def test_mamba2_full_recovery_recipe_runs_the_reference_settings(tmp_path) -> None:  # noqa: ANN001
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes",
                        "mamba2_2.7b_full_recovery.py")
    spec = importlib.util.spec_from_file_location("recipe_full", path)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    argv = recipe.reference_argv("M", "O", batch_size=8)
    opts = dict(zip(argv[3::2], argv[4::2]))
    assert argv[:3] == ["recover", "M", "--full"] and opts["--data"] == "yahma/alpaca-cleaned"
    assert (opts["--lr"], opts["--epochs"], opts["--batch-size"], opts["--grad-accum"]) == ("5e-05", "1", "8", "4")
    with pytest.raises(SystemExit):
        recipe.reference_argv("M", "O", batch_size=8, grad_accum=2)
    src = tmp_path / "pruned"
    pruned_tiny().save_pretrained(src)
    word_tokenizer().save_pretrained(src)
    assert recipe.main(["--model", str(src), "--out", str(tmp_path / "ft"), "--data", "bundled", "--max-steps", "1",
                        "--batch-size", "4", "--val-size", "0", "--seqlen", str(MAXLEN)]) == 0
    assert json.loads((tmp_path / "ft" / "recovery.json").read_text())["method"] == "full fine-tune"
