"""The search measurably beats chance on a trained model: on the bundled Mamba-2 reference model, the
first unit the greedy search removes (chosen on calibration text) raises the perplexity of held-out
validation text less than more than half of the other units of the same kind do, i.e. it beats their
median (a single catastrophic unit such as ``block@0``, +6,000 ppl, cannot carry the comparison as it
could a mean).

Random weights carry no unit importance, so this is only meaningful on the trained reference model.
Everything is computed here (nothing hard-coded but the sizes); the pure-PyTorch SSD path runs with
``chunk_size=16`` (the same computation as the checkpoint's 128, cheaper on CPU). The other units are
measured in a seeded random order and the measuring stops as soon as the verdict is settled, so the
test costs about as many validation passes as it needs (at least half the units) and the verdict is
the one all units would give.
"""

from __future__ import annotations

import os
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_shedder
from hf_shedder.arch import get_adapter
from hf_shedder.data import CalibrationSet, load_calibration, load_eval_text, load_tokenizer
from hf_shedder.evaluation.perplexity import evaluate_perplexity
from hf_shedder.search import SearchSettings, search

REFERENCE = os.path.join(os.path.dirname(hf_shedder.__file__), "assets", "reference")
CAL_SAMPLES, CAL_SEQLEN = 4, 128  # calibration: bundled tinyshakespeare slice (disjoint from validation)
VAL_WINDOWS, VAL_SEQLEN = 3, 128  # validation: windows spread over the held-out file's three texts


@pytest.fixture(scope="module")
def reference_mamba2():  # noqa: ANN201
    model = AutoModelForCausalLM.from_pretrained(
        os.path.join(REFERENCE, "mamba2"), dtype=torch.float32, chunk_size=16
    ).eval()
    tok = load_tokenizer()
    cal = load_calibration("bundled", tok, n_samples=CAL_SAMPLES, seqlen=CAL_SEQLEN, seed=42)
    full = load_eval_text(os.path.join(REFERENCE, "validation.txt"), tok, seqlen=VAL_SEQLEN)
    idx = [round(i * (len(full) - 1) / (VAL_WINDOWS - 1)) for i in range(VAL_WINDOWS)]
    val = CalibrationSet(full.input_ids[idx].contiguous(), full.attention_mask[idx].contiguous(), source="validation")
    return model, cal, val


@pytest.mark.parametrize("kind", ["block", "ssm"])
def test_first_searched_unit_beats_the_median_unit(reference_mamba2, kind: str) -> None:  # noqa: ANN001
    model, cal, val = reference_mamba2
    settings = SearchSettings(units=(kind,), steps=1, calibration="bundled", samples=CAL_SAMPLES,
                              seqlen=CAL_SEQLEN, seed=42, batch_size=CAL_SAMPLES)
    chosen = search(model, cal, settings, progress=False).plan.units[0]
    assert chosen.kind == kind

    adapter = get_adapter(model)
    empty = adapter.empty_plan()

    def val_ppl(*units) -> float:  # noqa: ANN002
        with adapter.masked(empty.extended(*units)):
            return evaluate_perplexity(model, val, batch_size=VAL_WINDOWS, progress=False).ppl

    base = val_ppl()
    searched = val_ppl(chosen) - base
    others = [u for u in adapter.all_units([kind]) if u != chosen]
    random.Random(0).shuffle(others)
    need = len(others) // 2 + 1  # others worse than the pick: more than half of them
    worse, measured = 0, {}
    for unit in others:
        measured[str(unit)] = round(val_ppl(unit) - base, 2)
        worse += measured[str(unit)] > searched
        if worse >= need or len(measured) - worse > len(others) - need:
            break  # settled: the remaining units cannot change the verdict
    assert worse >= need, (
        f"search removed {chosen} (+{searched:.2f} validation ppl from {base:.2f}); only {worse} of the "
        f"{len(others)} other {kind} units did worse (need {need}): {measured}"
    )
