"""Perplexity with the Mamba-Shedder reference semantics (utils.evaluate_ppl).

For every sample: mean next-token NLL over the targets that are real tokens (padding ignored);
perplexity = exp(mean over samples of those per-sample means). All arithmetic is fp32 on the
logits and float64 on the sums, and the vocabulary projection is processed in sequence chunks
so a [B, L, V] fp32 copy of the logits is never built.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from hf_shedder.data import CalibrationSet
from hf_shedder.errors import DataError

DEFAULT_CHUNK = 256


def _target_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, ignore_token_id: int | None):
    """Which next-token targets count: the target position is a real token (and not ``ignore_token_id``)."""
    targets = input_ids[:, 1:]
    if attention_mask is None:
        mask = torch.ones_like(targets, dtype=torch.bool)
    else:
        mask = attention_mask[:, 1:].to(torch.bool)
    if ignore_token_id is not None:
        # the reference's CrossEntropyLoss(ignore_index=pad_token_id) also drops real tokens equal to pad
        mask = mask & (targets != ignore_token_id)
    return targets, mask


def _chunk_nll(logits_chunk: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    b, c, v = logits_chunk.shape
    nll = F.cross_entropy(logits_chunk.float().reshape(b * c, v), targets.reshape(b * c), reduction="none")
    return (nll.view(b, c).double() * mask).sum(dim=1)


def token_nll(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    chunk: int = DEFAULT_CHUNK,
    ignore_token_id: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample sum of next-token NLL and number of counted targets.

    ``logits`` [B, L, V] (any dtype) predict ``input_ids[:, 1:]``; returns (nll_sum float64[B], count long[B]).
    """
    if logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match input_ids {tuple(input_ids.shape)}")
    targets, mask = _target_mask(input_ids, attention_mask, ignore_token_id)
    steps = targets.shape[1]
    total = torch.zeros(input_ids.shape[0], dtype=torch.float64, device=logits.device)
    for s in range(0, steps, chunk):
        e = min(s + chunk, steps)
        total += _chunk_nll(logits[:, s:e], targets[:, s:e], mask[:, s:e])
    return total, mask.sum(dim=1)


def head_nll(
    hidden: torch.Tensor,
    head_fn: Callable[[torch.Tensor], torch.Tensor],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    chunk: int = DEFAULT_CHUNK,
    ignore_token_id: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """As ``token_nll`` but from the last hidden states [B, L, D]: ``head_fn`` (final norm + lm head)
    is applied chunk by chunk over positions, so full logits never exist."""
    if hidden.shape[:2] != input_ids.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} does not match input_ids {tuple(input_ids.shape)}")
    targets, mask = _target_mask(input_ids, attention_mask, ignore_token_id)
    steps = targets.shape[1]
    total = torch.zeros(input_ids.shape[0], dtype=torch.float64, device=hidden.device)
    for s in range(0, steps, chunk):
        e = min(s + chunk, steps)
        total += _chunk_nll(head_fn(hidden[:, s:e]), targets[:, s:e], mask[:, s:e])
    return total, mask.sum(dim=1)


class NLLAccumulator:
    """Collects per-sample (nll_sum, count) over batches; reference perplexity = exp(mean of means)."""

    def __init__(self) -> None:
        self._sums: list[torch.Tensor] = []
        self._counts: list[torch.Tensor] = []

    def add(self, nll_sum: torch.Tensor, count: torch.Tensor) -> None:
        self._sums.append(nll_sum.detach().double().cpu())
        self._counts.append(count.detach().cpu())

    @property
    def n_samples(self) -> int:
        return int(sum(c.numel() for c in self._counts))

    @property
    def n_tokens(self) -> int:
        return int(sum(int(c.sum()) for c in self._counts))

    @property
    def per_sample_mean(self) -> torch.Tensor:
        """Mean NLL of each sample that has at least one target (samples with none are skipped)."""
        if not self._sums:
            return torch.zeros(0, dtype=torch.float64)
        sums, counts = torch.cat(self._sums), torch.cat(self._counts)
        keep = counts > 0
        return sums[keep] / counts[keep]

    def mean_nll(self) -> float:
        means = self.per_sample_mean
        if means.numel() == 0:
            raise DataError("no targets to evaluate: every sample is padding or shorter than 2 tokens")
        return float(means.mean())

    def perplexity(self) -> float:
        return math.exp(self.mean_nll())


@dataclass
class PerplexityResult:
    ppl: float
    mean_nll: float
    n_samples: int
    n_tokens: int
    seconds: float
    source: str | None = None
    seqlen: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _CaptureHead(nn.Module):
    """Stands in for the LM head during a forward: keeps the hidden states it is given and returns logits
    with an empty vocabulary axis, so the model never builds its [B, L, V] logits (and their fp32 copy);
    ``head_nll`` then applies the real head a few hundred positions at a time."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head
        self.hidden: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:  # models cast the hidden states to lm_head.weight.dtype
        return self.head.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self.hidden = hidden
        return hidden.new_zeros((*hidden.shape[:-1], 0))


def _head_parts(model: nn.Module) -> tuple[nn.Module, nn.Module, Callable] | None:
    """(model whose ``lm_head`` can be swapped, that head, what the model does to the head's output), or
    None for models without an hf_shedder adapter (they are evaluated on full logits)."""
    from hf_shedder.arch import get_adapter
    from hf_shedder.errors import UnsupportedModelError

    inner = model
    while getattr(inner, "config", None) is not None and getattr(inner.config, "model_type", None) == "hf_shedder":
        inner = inner.model  # PrunedMambaForCausalLM wraps the (pruned) base model
    try:
        adapter = get_adapter(inner)
    except UnsupportedModelError:
        return None
    head = adapter.lm_head()
    if inner.get_output_embeddings() is not head or getattr(head, "bias", None) is not None:
        return None
    return inner, head, adapter.scale_logits


@torch.no_grad()
def evaluate_perplexity(
    model: torch.nn.Module,
    calib: CalibrationSet,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    progress: bool = True,
    ignore_token_id: int | None = None,
) -> PerplexityResult:
    """Reference perplexity of any HF causal LM (its output has ``.logits``) on ``calib``.

    For the families hf_shedder knows, the vocabulary projection runs in chunks of positions (peak memory
    is the model's activations plus ``batch x chunk x vocab`` fp32 logits, not ``batch x seqlen x vocab``);
    the numbers are the same as from the full logits. Other models are evaluated on their full logits.
    """
    device = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    acc = NLLAccumulator()
    parts = _head_parts(model)
    _sync(device)
    start = time.perf_counter()
    try:
        n_batches = math.ceil(calib.n_samples / batch_size)
        for batch in tqdm(calib.batches(batch_size, device), total=n_batches, desc="perplexity", disable=not progress):
            if parts is None:
                logits = model(**batch, use_cache=False).logits
                acc.add(*token_nll(logits, batch["input_ids"], batch["attention_mask"], ignore_token_id=ignore_token_id))
                del logits
                continue
            inner, head, scale_logits = parts
            capture = _CaptureHead(head)
            inner.set_output_embeddings(capture)
            try:
                model(**batch, use_cache=False)
            finally:
                inner.set_output_embeddings(head)
            hidden, capture.hidden = capture.hidden, None

            def head_fn(x: torch.Tensor, head: nn.Module = head, scale: Callable = scale_logits) -> torch.Tensor:
                return scale(head(x))  # the model's own op order: lm_head, then its logit scaling

            acc.add(*head_nll(hidden, head_fn, batch["input_ids"], batch["attention_mask"],
                              ignore_token_id=ignore_token_id))
            del hidden
    finally:
        model.train(was_training)
    _sync(device)
    mean = acc.mean_nll()
    return PerplexityResult(
        ppl=math.exp(mean),
        mean_nll=mean,
        n_samples=acc.n_samples,
        n_tokens=acc.n_tokens,
        seconds=time.perf_counter() - start,
        source=calib.source,
        seqlen=calib.seqlen,
    )
