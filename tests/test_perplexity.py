"""The perplexity evaluator against direct computations (HF loss), padding and batch-size invariance."""

from __future__ import annotations

import math

import pytest
import torch

from hf_shedder.data import CalibrationSet
from hf_shedder.errors import DataError
from hf_shedder.evaluation.perplexity import NLLAccumulator, evaluate_perplexity, head_nll, token_nll
from tests._helpers_eval import random_calib
from tests.tiny_models import build_tiny


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_matches_hf_loss_without_padding(family: str) -> None:
    model = build_tiny(family, num_layers=2)
    calib = random_calib(n=4, seqlen=24)
    with torch.no_grad():
        loss = model(input_ids=calib.input_ids, labels=calib.input_ids).loss
    res = evaluate_perplexity(model, calib, batch_size=3, progress=False)
    # equal target counts per sample: the mean of per-sample means is HF's token mean
    assert res.ppl == pytest.approx(math.exp(loss.item()), rel=1e-5)
    assert res.n_samples == 4 and res.n_tokens == 4 * 23


def test_padding_is_ignored_per_sample() -> None:
    model = build_tiny("mamba", num_layers=2)
    g = torch.Generator().manual_seed(1)
    lengths = [20, 13, 7]
    ids = torch.randint(1, 128, (3, 20), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    ids = ids * mask  # pad id 0 after each sequence (right padding)
    calib = CalibrationSet(ids, mask, source="padded")
    expected = []
    with torch.no_grad():
        for i, n in enumerate(lengths):  # each sequence alone, unpadded, through HF's own loss
            one = ids[i : i + 1, :n]
            expected.append(model(input_ids=one, labels=one).loss.item())
        logits = model(input_ids=ids, attention_mask=mask).logits
    acc = NLLAccumulator()
    acc.add(*token_nll(logits, ids, mask))
    assert acc.per_sample_mean.tolist() == pytest.approx(expected, rel=1e-5)
    assert acc.n_tokens == sum(n - 1 for n in lengths)
    res = evaluate_perplexity(model, calib, batch_size=2, progress=False)
    assert res.ppl == pytest.approx(math.exp(sum(expected) / 3), rel=1e-5)
    # mean of per-sample means differs from a token-weighted mean with unequal lengths
    token_mean = sum(e * (n - 1) for e, n in zip(expected, lengths)) / sum(n - 1 for n in lengths)
    assert res.mean_nll != pytest.approx(token_mean, rel=1e-7)


def test_batch_size_and_chunk_invariance() -> None:
    model = build_tiny("mamba2", num_layers=2)
    calib = random_calib(n=7, seqlen=32, seed=3)
    ppls = [evaluate_perplexity(model, calib, batch_size=bs, progress=False).ppl for bs in (1, 3, 8)]
    assert ppls[0] == pytest.approx(ppls[1], rel=1e-6) and ppls[0] == pytest.approx(ppls[2], rel=1e-6)
    with torch.no_grad():
        logits = model(input_ids=calib.input_ids).logits
    s1, c1 = token_nll(logits, calib.input_ids, chunk=5)
    s2, c2 = token_nll(logits, calib.input_ids, chunk=1000)
    assert torch.allclose(s1, s2, rtol=1e-10, atol=1e-9) and torch.equal(c1, c2)
    assert s1.dtype == torch.float64


def test_head_nll_equals_token_nll_from_logits() -> None:
    model = build_tiny("mamba", num_layers=2)
    calib = random_calib(n=3, seqlen=30, seed=5)
    with torch.no_grad():
        hidden = model.backbone(input_ids=calib.input_ids).last_hidden_state  # after the final norm
        logits = model.lm_head(hidden)
        calls = []

        def head(h: torch.Tensor) -> torch.Tensor:
            calls.append(h.shape[1])
            return model.lm_head(h)

        a = token_nll(logits, calib.input_ids, calib.attention_mask)
        b = head_nll(hidden, head, calib.input_ids, calib.attention_mask, chunk=8)
    assert torch.allclose(a[0], b[0], rtol=1e-6) and torch.equal(a[1], b[1])
    assert max(calls) == 8 and sum(calls) == 29  # the head only ever saw chunks of positions


def test_reference_ignore_token_id_drops_those_targets() -> None:
    ids = torch.tensor([[5, 0, 7, 0, 9]])
    logits = torch.randn(1, 5, 12)
    _, count = token_nll(logits, ids)
    _, count_ref = token_nll(logits, ids, ignore_token_id=0)
    assert count.item() == 4 and count_ref.item() == 2


def test_no_targets_is_an_error() -> None:
    acc = NLLAccumulator()
    acc.add(torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.long))
    with pytest.raises(DataError, match="no targets"):
        acc.perplexity()


def _full_logit_ppl(model: torch.nn.Module, calib: CalibrationSet, batch_size: int) -> float:
    """The perplexity from the model's full [B, L, V] logits (what evaluate_perplexity computed before)."""
    acc = NLLAccumulator()
    with torch.no_grad():
        for batch in calib.batches(batch_size, torch.device("cpu")):
            logits = model(**batch, use_cache=False).logits
            acc.add(*token_nll(logits, batch["input_ids"], batch["attention_mask"]))
    return acc.perplexity()


def _tiny(family: str) -> torch.nn.Module:
    if family in ("mamba", "mamba2"):
        return build_tiny(family, num_layers=2)
    if family == "zamba2":
        from tests.tiny_hybrids import build_tiny_hybrid
    else:
        from tests.tiny_hybrids_more import build_tiny_hybrid
    return build_tiny_hybrid(family).eval()


@pytest.mark.parametrize("family", ["mamba", "mamba2", "zamba2", "falcon_h1", "granitemoehybrid"])
def test_chunked_head_gives_the_full_logit_numbers_and_never_projects_a_whole_window(family: str) -> None:
    """The LM head runs on at most DEFAULT_CHUNK positions at a time (no [B, L, V] logits: that was 7.5 GB
    at seqlen 2048 on CPU), and the perplexity is the one from the full logits. Falcon-H1 and
    GraniteMoeHybrid scale their logits after the head (the adapter's scale_logits repeats it)."""
    from hf_shedder.evaluation.perplexity import DEFAULT_CHUNK

    model = _tiny(family)
    calib = random_calib(n=3, seqlen=DEFAULT_CHUNK + 40, vocab=model.config.vocab_size, seed=5)
    expected = _full_logit_ppl(model, calib, batch_size=2)
    widths: list[int] = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, o: widths.append(i[0].shape[1]))
    try:
        res = evaluate_perplexity(model, calib, batch_size=2, progress=False)
    finally:
        hook.remove()
    assert widths and max(widths) <= DEFAULT_CHUNK, widths
    assert res.ppl == pytest.approx(expected, rel=1e-12)


def test_chunked_head_on_a_pruned_model() -> None:
    import hf_shedder
    from hf_shedder import Plan, Unit

    pruned = hf_shedder.prune(build_tiny("mamba2", num_layers=3), Plan([Unit("ssm", 1), Unit("block", 2)]))
    calib = random_calib(n=2, seqlen=40, seed=2)
    res = evaluate_perplexity(pruned, calib, batch_size=2, progress=False)
    assert res.ppl == pytest.approx(_full_logit_ppl(pruned, calib, batch_size=2), rel=1e-12)
    assert pruned.get_output_embeddings() is pruned.model.lm_head  # the head is put back
