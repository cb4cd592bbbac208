"""Greedy ``generate()`` with the whole decode step, token choice included, replayed as one CUDA graph.

Why: replaying only the model's step inside Transformers' ``generate`` loop still pays that loop's host
work every token (input preparation, logits processors, stopping criteria, a device sync), which on an
H200 is as long as the 64-layer step itself. For the common case, greedy search with at most a length and
an end-of-sequence rule, the token choice is a few tensor operations: they are captured with the step, so
a token costs one graph replay and the host only checks every few tokens whether all rows have ended.

The rules are Transformers' own: the first new token comes from the prompt's forward; ``min_new_tokens``
/ ``min_length`` mask the end-of-sequence ids until the length is reached; a row that has ended gets
``pad_token_id``; generation stops after the step at which every row has ended, or at the length limit.
Anything else (sampling, beams, processors, streamers, dict outputs, padding in the prompt) goes to
Transformers' ``generate``, where the step alone is replayed (:mod:`.graph_decode`).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .graph_decode import _StepGraph, forward_cache_kwarg, graph_decoder_of, output_cache, weights_key

logger = logging.getLogger(__name__)

# Generation settings this path reproduces; any other setting that differs from GenerationConfig's default
# sends the call to Transformers' generate.
_HANDLED = {
    "max_new_tokens", "min_new_tokens", "max_length", "min_length", "eos_token_id", "pad_token_id", "bos_token_id",
    "do_sample", "num_beams", "use_cache", "transformers_version", "_from_model_config", "decoder_start_token_id",
    # ignored by greedy search (Transformers only warns about them)
    "temperature", "top_k", "top_p", "min_p", "typical_p",
}
# Settings whose false / empty value changes nothing here.
_OFF_IS_FINE = {"output_attentions", "output_hidden_states", "output_scores", "output_logits",
                "return_dict_in_generate", "renormalize_logits", "remove_invalid_values"}
_KWARGS = {"input_ids", "attention_mask", "max_new_tokens", "min_new_tokens", "max_length", "min_length",
           "do_sample", "num_beams", "pad_token_id", "eos_token_id", "use_cache"}
_CHECK_EVERY = 16  # tokens between host checks for "every row has ended"


@dataclass
class GreedyRequest:
    input_ids: torch.Tensor
    new_tokens: int
    min_new: int  # new tokens before an end-of-sequence id may be chosen
    eos: list[int]
    pad: int


def greedy_request(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> GreedyRequest | None:
    """What a ``generate`` call asks for, if it is plain greedy search this path reproduces, else None."""
    if len(args) > 1 or set(kwargs) - _KWARGS:
        return None
    input_ids = args[0] if args else kwargs.get("input_ids")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        return None
    mask = kwargs.get("attention_mask")
    if mask is not None and (mask.shape != input_ids.shape or not bool(torch.all(mask == 1))):
        return None
    config = copy.deepcopy(getattr(model, "generation_config", None))
    if config is None:
        return None
    settings = {k: v for k, v in kwargs.items() if k not in ("input_ids", "attention_mask")}
    unused = config.update(**settings)
    if unused or any(k not in _HANDLED and not (k in _OFF_IS_FINE and not v) for k, v in config.to_diff_dict().items()):
        return None
    if config.do_sample or (config.num_beams or 1) != 1 or config.use_cache is False:
        return None
    prompt = input_ids.shape[1]
    new = config.max_new_tokens if config.max_new_tokens is not None else (config.max_length or 20) - prompt
    if new is None or new < 1:
        return None
    min_new = config.min_new_tokens if config.min_new_tokens is not None else (config.min_length or 0) - prompt
    eos = config.eos_token_id
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
    return GreedyRequest(input_ids, int(new), max(0, int(min_new)), eos, int(pad))


class _GreedyBuffers:
    """Device tensors of one batch size's greedy graph; capacity = most new tokens it can hold."""

    def __init__(self, batch: int, capacity: int, eos: list[int], device: torch.device) -> None:
        self.capacity = capacity
        self.eos_count = len(eos)
        self.tokens = torch.zeros((batch, capacity), dtype=torch.long, device=device)
        self.all_ended = torch.zeros(capacity, dtype=torch.bool, device=device)
        self.ended = torch.zeros(batch, dtype=torch.bool, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)  # index of the next new token
        self.min_new = torch.zeros((), dtype=torch.long, device=device)
        self.pad = torch.zeros((), dtype=torch.long, device=device)
        self.eos = torch.zeros(max(1, len(eos)), dtype=torch.long, device=device)

    def reset(self, request: GreedyRequest) -> None:
        self.tokens.fill_(request.pad)
        self.all_ended.zero_()
        self.ended.zero_()
        self.position.zero_()
        self.min_new.fill_(request.min_new)
        self.pad.fill_(request.pad)
        if request.eos:
            self.eos.copy_(torch.tensor(request.eos, device=self.eos.device))

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """Greedy token from the last position's logits; records it; returns it as [batch, 1]."""
        scores = logits[:, -1, :].float()
        if self.eos_count:
            # Transformers' min-length processors: end-of-sequence ids are -inf until the length is reached.
            eos_scores = scores.index_select(1, self.eos)
            blocked = self.position < self.min_new
            scores = scores.index_copy(1, self.eos, torch.where(blocked, float("-inf"), eos_scores))
        token = scores.argmax(-1)
        if self.eos_count:
            token = torch.where(self.ended, self.pad, token)
            self.ended |= torch.isin(token, self.eos)
        self.tokens.index_copy_(1, self.position, token[:, None])
        self.all_ended.index_copy_(0, self.position, self.ended.all()[None])
        self.position += 1
        return token[:, None]


class GreedyGraphGenerate:
    """Replaces a causal LM's ``generate``: plain greedy search on CUDA runs :meth:`greedy`; the rest
    goes to the model class's own ``generate``."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.graphs: dict[int, tuple[_StepGraph, _GreedyBuffers]] = {}
        self.calls = 0
        self._weights_key: Any = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = None
        decoder = graph_decoder_of(self.model)
        if decoder is not None and decoder.enabled and not decoder.cache_grows:
            ids = args[0] if args else kwargs.get("input_ids")
            if isinstance(ids, torch.Tensor) and ids.device.type == "cuda" and not torch.compiler.is_compiling():
                request = greedy_request(self.model, args, kwargs)
        if request is None:
            return type(self.model).generate(self.model, *args, **kwargs)
        try:
            return self.greedy(request)
        except Exception as e:  # stay correct: Transformers' generate (with graph-replayed steps) instead
            self.graphs.clear()
            logger.warning("hf_shedder: greedy CUDA-graph decode failed (%s); using Transformers' generate", e)
            return type(self.model).generate(self.model, *args, **kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> GreedyGraphGenerate:
        return GreedyGraphGenerate(memo.get(id(self.model), self.model))

    def __getstate__(self) -> dict[str, Any]:
        return {"model": self.model}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["model"])  # type: ignore[misc]

    def _eager(self, **kwargs: Any) -> Any:
        return type(self.model).forward(self.model, **kwargs)

    @torch.no_grad()
    def greedy(self, request: GreedyRequest, capture: bool = True) -> torch.Tensor:
        """Greedy tokens as Transformers' greedy search gives them (prompt + new tokens).

        ``capture=False`` runs the same steps and bookkeeping eagerly (CPU tests, and a check of the graph).
        """
        ids = request.input_ids
        batch, device = ids.shape[0], ids.device
        params = _forward_parameters(self.model)
        last_only = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        out = self._eager(input_ids=ids, use_cache=True, return_dict=True, **last_only)
        cache = output_cache(out)
        key = weights_key(self.model, with_versions=True)
        if key != self._weights_key:  # weights moved, changed in place or changed dtype: capture anew
            self.graphs.clear()
            self._weights_key = key
        entry = self.graphs.get(batch) if capture else None
        if entry is not None and (entry[1].capacity < request.new_tokens or entry[1].eos_count != len(request.eos)):
            entry = None
        state, buffers = entry if entry is not None else (
            _StepGraph(batch, device), _GreedyBuffers(batch, max(256, request.new_tokens), request.eos, device))
        buffers.reset(request)
        state.input_ids.copy_(buffers.choose(out.logits))
        if request.new_tokens > 1:
            cache_kw = forward_cache_kwarg(self.model)
            if capture:
                state.adopt(cache)  # the graph's static cache tensors take this prompt's state

            def step() -> None:
                logits = self._eager(input_ids=state.input_ids, use_cache=True, return_dict=True,
                                     **{cache_kw: cache}).logits
                state.input_ids.copy_(buffers.choose(logits))

            if capture and entry is None:
                self._capture(step, state, buffers)
                self.graphs[batch] = (state, buffers)
            run = state.graph.replay if capture else step
            for i in range(1, request.new_tokens):
                run()
                if i % _CHECK_EVERY == 0 and bool(buffers.all_ended[i]):
                    break
        self.calls += 1
        return self._result(ids, buffers, request.new_tokens)

    @staticmethod
    def _result(ids: torch.Tensor, buffers: _GreedyBuffers, new_tokens: int) -> torch.Tensor:
        ended = buffers.all_ended[:new_tokens].nonzero()
        produced = int(ended[0]) + 1 if ended.numel() else new_tokens
        return torch.cat([ids, buffers.tokens[:, :produced]], dim=1)

    def _capture(self, step: Callable[[], None], state: _StepGraph, buffers: _GreedyBuffers) -> None:
        device = state.input_ids.device
        statics = [*state.states, state.input_ids, buffers.tokens, buffers.all_ended, buffers.ended, buffers.position]
        saved = [t.clone() for t in statics]
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):  # lazy init and Triton compilation happen outside the capture
                step()
        torch.cuda.current_stream(device).wait_stream(side)
        for static, value in zip(statics, saved):
            static.copy_(value)
        decoder = graph_decoder_of(self.model)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=decoder._graph_pool() if decoder is not None else None):
            step()
        state.graph = graph


def _forward_parameters(model: nn.Module) -> set[str]:
    import inspect

    return set(inspect.signature(type(model).forward).parameters)


def enable_greedy_graph_generate(model: nn.Module) -> GreedyGraphGenerate:
    current = model.__dict__.get("generate")
    if isinstance(current, GreedyGraphGenerate):
        current.model = model
        return current
    wrapper = GreedyGraphGenerate(model)
    model.generate = wrapper  # type: ignore[method-assign]
    return wrapper


def disable_greedy_graph_generate(model: nn.Module) -> None:
    if isinstance(model.__dict__.get("generate"), GreedyGraphGenerate):
        del model.generate
