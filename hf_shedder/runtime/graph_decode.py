"""One-token decode steps replayed as CUDA graphs inside ``generate()``.

Why: Transformers' eager decode of a Mamba is host-bound (about 1,400 kernel launches per token for a
64-layer model, the GPU busy 5-8% of the time). Transformers' own answer, ``generate(...,
cache_implementation="static")`` with ``torch.compile``, compiles for about a minute per shape and still
ran below mamba-ssm's CUDA-graph decode (233 vs 317 tok/s, mamba2-2.7b shape, H200). A Mamba decode
step only updates its recurrent cache in place (conv window and SSM state have fixed shapes), so the
step can be captured once per batch size and replayed.

How: the model's ``forward`` is wrapped (an instance attribute, as accelerate's hooks do). Each call that
is a plain cached one-token step on CUDA replays the graph of its batch size; every other call (prefill,
CPU, padding masks, extra outputs) runs the eager forward. A graph owns static copies of the cache
tensors; the cache object that ``generate`` created is pointed at them (its tensors are rebound, after
copying their values in), so the cache stays the one that ``generate`` returns and keeps updating in
place. One graph per batch size: the latest ``generate`` call of a size owns that size's buffers.
Families whose cache grows (attention key/values) are not captured: their adapter says so, and their
decode stays eager, said once.
"""

from __future__ import annotations

import inspect
import logging
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Keyword arguments of a decode step that the captured call can ignore or replay as captured.
_STEP_KWARGS = {"input_ids", "use_cache", "return_dict", "attention_mask", "cache_position", "logits_to_keep"}
_CACHE_KWARGS = ("cache", "cache_params", "past_key_values")  # the names a cache has had, newest first


# ---------------------------------------------------------------------- cache tensors
@dataclass
class _Slot:
    """One tensor of a cache object: ``holder[key]`` (dict / list) or ``getattr(holder, key)``."""

    holder: Any
    key: Any
    attribute: bool

    def get(self) -> torch.Tensor:
        return getattr(self.holder, self.key) if self.attribute else self.holder[self.key]

    def set(self, value: torch.Tensor) -> None:
        if self.attribute:
            setattr(self.holder, self.key, value)
        else:
            self.holder[self.key] = value


def _tensor_slots(holder: Any, depth: int = 0) -> Iterator[_Slot]:
    if depth > 3:
        return
    if isinstance(holder, dict):
        items: Any = sorted(holder.items(), key=lambda kv: str(kv[0]))
        for key, value in items:
            if isinstance(value, torch.Tensor):
                yield _Slot(holder, key, attribute=False)
    elif isinstance(holder, list):
        for key, value in enumerate(holder):
            if isinstance(value, torch.Tensor):
                yield _Slot(holder, key, attribute=False)
    else:
        for key, value in sorted(vars(holder).items()):
            if isinstance(value, torch.Tensor):
                yield _Slot(holder, key, attribute=True)
            elif isinstance(value, (dict, list)) and key != "layers":
                yield from _tensor_slots(value, depth + 1)


def cache_tensor_slots(cache: Any) -> list[_Slot]:
    """Every tensor a cache object holds (per layer and at top level), in a fixed order.

    Generic over Transformers' cache classes (a ``layers`` list of per-layer objects holding dicts or
    lists of tensors, or tensors held directly), so the runner does not depend on one release's layout.
    """
    slots = list(_tensor_slots(cache))
    for layer in getattr(cache, "layers", None) or []:
        slots.extend(_tensor_slots(layer))
    return slots


# ---------------------------------------------------------------------- one captured step
class _StepGraph:
    """The captured decode step of one batch size, with its static input and cache tensors."""

    def __init__(self, batch_size: int, device: torch.device) -> None:
        self.batch_size = batch_size
        self.input_ids = torch.zeros((batch_size, 1), dtype=torch.long, device=device)
        self.states: list[torch.Tensor] = []
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.output: Any = None
        self._owner: Any = None  # weak reference to the cache object last pointed at the static tensors

    @property
    def owner(self) -> Any:
        return None if self._owner is None else self._owner()

    def adopt(self, cache: Any) -> None:
        """Point ``cache`` at this graph's static tensors, carrying its current values over."""
        slots = cache_tensor_slots(cache)
        if not self.states:
            self.states = [slot.get().clone() for slot in slots]
        if len(slots) != len(self.states):
            raise RuntimeError("the cache layout changed since the capture")
        for slot, static in zip(slots, self.states):
            current = slot.get()
            if current is static:
                continue
            if current.shape != static.shape or current.dtype != static.dtype:
                raise RuntimeError(f"cache tensor {slot.key!r} changed shape since the capture")
            static.copy_(current)
            slot.set(static)
        try:
            self._owner = weakref.ref(cache)
        except TypeError:  # not weak-referenceable: every step adopts it again (a copy per step, still correct)
            self._owner = None


# ---------------------------------------------------------------------- the forward wrapper
class GraphDecodeForward:
    """Replaces a causal LM's ``forward``: cached one-token steps on CUDA replay a captured graph.

    ``warmup`` eager steps (on a side stream, values restored afterwards) precede each capture, so lazy
    initialisation and Triton compilation happen outside it.
    """

    def __init__(self, model: nn.Module, cache_grows: bool = False, warmup: int = 2) -> None:
        self.model = model
        self.cache_grows = cache_grows
        self.warmup = warmup
        self.enabled = True
        self.graphs: dict[int, _StepGraph] = {}
        self.replays = 0
        self.captures = 0
        self._pool: Any = None
        self._weights_key: tuple[Any, ...] | None = None
        self._said: set[str] = set()

    @property
    def __signature__(self) -> inspect.Signature:  # noqa: PLW3201
        # generate() and Trainer read forward's parameters (cache keyword, dataset columns).
        return inspect.signature(type(self.model).forward.__get__(self.model))

    # The eager forward is looked up on the class each time, so the wrapper never holds a bound method
    # of its own model (deepcopy and class swaps stay simple).
    def eager(self, *args: Any, **kwargs: Any) -> Any:
        return type(self.model).forward(self.model, *args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        step = self._graph_step(args, kwargs)
        if step is None:
            return self.eager(*args, **kwargs)
        return step

    def __deepcopy__(self, memo: dict[int, Any]) -> GraphDecodeForward:
        # A copy of the model gets its own (empty) graphs; CUDA graphs cannot be copied.
        copied_model = memo.get(id(self.model), self.model)
        return GraphDecodeForward(copied_model, self.cache_grows, self.warmup)

    def __getstate__(self) -> dict[str, Any]:
        return {"model": self.model, "cache_grows": self.cache_grows, "warmup": self.warmup}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["model"], state["cache_grows"], state["warmup"])  # type: ignore[misc]

    def reset(self) -> None:
        """Drop every captured graph (weights moved, dtype changed, or to free memory)."""
        self.graphs.clear()
        self._pool = None
        self._weights_key = None

    def _say_once(self, key: str, message: str, level: int = logging.INFO) -> None:
        if key not in self._said:
            self._said.add(key)
            logger.log(level, message)

    # ------------------------------------------------------------------ dispatch
    def _graph_step(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not self.enabled or args:
            return None
        cache_kw = next((k for k in _CACHE_KWARGS if kwargs.get(k) is not None), None)
        input_ids = kwargs.get("input_ids")
        if cache_kw is None or input_ids is None or input_ids.dim() != 2 or input_ids.shape[1] != 1:
            return None  # prefill, no cache, or embeddings as input: eager
        if input_ids.device.type != "cuda":
            self._say_once("cpu", "hf_shedder: CUDA-graph decode needs a CUDA device; decoding eagerly")
            return None
        if self.cache_grows:
            self._say_once("grows", f"hf_shedder: {type(self.model).__name__} keeps a growing attention cache; "
                           "CUDA-graph decode covers recurrent-only models, decoding eagerly", logging.WARNING)
            return None
        if set(kwargs) - _STEP_KWARGS - {cache_kw} or kwargs.get("attention_mask") is not None:
            return None  # extra outputs or a padding mask: not what was captured
        if kwargs.get("use_cache") is False or kwargs.get("return_dict") is False:
            return None
        if torch.cuda.is_current_stream_capturing() or torch.compiler.is_compiling():
            return None  # inside someone else's capture or a torch.compile trace: stay plain eager code
        cache = kwargs[cache_kw]
        if not _has_state(cache):
            return None  # a one-token prompt: the eager step initialises the cache first
        logits_to_keep = kwargs.get("logits_to_keep", 0)
        if not isinstance(logits_to_keep, int):
            return None
        try:
            return self._replay(input_ids, cache, cache_kw, logits_to_keep)
        except Exception as e:  # capture can fail for reasons outside our control: stay correct
            self.enabled = False
            self.reset()
            self._say_once("failed", f"hf_shedder: CUDA-graph decode turned off after an error ({e}); "
                           "decoding eagerly", logging.WARNING)
            return None

    def _graph_pool(self) -> Any:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return self._pool

    def _replay(self, input_ids: torch.Tensor, cache: Any, cache_kw: str, logits_to_keep: int) -> Any:
        batch = input_ids.shape[0]
        graph = self.graphs.get(batch)
        if graph is None or graph.owner is not cache:
            # First step of a generate call: the weights may have moved or changed in place since the capture.
            key = weights_key(self.model, with_versions=True)
            if key != self._weights_key:
                self.reset()
                self._weights_key = key
                graph = None
        if graph is None:
            graph = self._capture(input_ids, cache, cache_kw, logits_to_keep)
        elif graph.owner is not cache:
            graph.adopt(cache)
        graph.input_ids.copy_(input_ids)
        graph.graph.replay()
        self.replays += 1
        output = graph.output
        # A fresh output object with a private copy of the logits: the static buffer changes on the next
        # replay, and generate may keep the logits (output_logits / output_scores).
        out = type(output)(**{k: v for k, v in output.items()})
        out["logits"] = graph.logits.clone()
        out[_output_cache_key(output)] = cache
        return out

    def _capture(self, input_ids: torch.Tensor, cache: Any, cache_kw: str, logits_to_keep: int) -> _StepGraph:
        device = input_ids.device
        graph = _StepGraph(input_ids.shape[0], device)
        graph.adopt(cache)
        graph.input_ids.copy_(input_ids)
        call: Callable[[], Any] = lambda: self.eager(  # noqa: E731
            input_ids=graph.input_ids, use_cache=True, return_dict=True, logits_to_keep=logits_to_keep,
            **{cache_kw: cache},
        )
        saved = [t.clone() for t in graph.states]
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(self.warmup):
                call()
        torch.cuda.current_stream(device).wait_stream(side)
        for static, value in zip(graph.states, saved):
            static.copy_(value)
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph, pool=self._graph_pool()), torch.no_grad():
            output = call()
        graph.graph, graph.output, graph.logits = cuda_graph, output, output.logits
        self.graphs[graph.batch_size] = graph
        self.captures += 1
        return graph


def _has_state(cache: Any) -> bool:
    has_previous_state = getattr(cache, "has_previous_state", None)
    if not callable(has_previous_state):
        return True
    try:
        return bool(has_previous_state(0))
    except TypeError:  # releases whose method takes no layer index
        return bool(has_previous_state())


def _output_cache_key(output: Any) -> str:
    for key in _CACHE_KWARGS:
        if key in output:
            return key
    return "cache_params"


def output_cache(output: Any) -> Any:
    """The cache a model output carries, under whichever name the release gives it."""
    for key in _CACHE_KWARGS:
        value = getattr(output, key, None)
        if value is not None:
            return value
    return None


def forward_cache_kwarg(model: nn.Module) -> str:
    """The keyword ``model``'s forward takes its cache under."""
    params = inspect.signature(type(model).forward).parameters
    return next((k for k in _CACHE_KWARGS if k in params), "past_key_values")


def weights_key(model: nn.Module, with_versions: bool = False) -> tuple[Any, ...]:
    """Where and how the weights live (and, with versions, whether they changed in place): a captured graph
    reads them by address, so any change means capturing anew."""
    params = list(model.parameters())
    key: tuple[Any, ...] = tuple((p.data_ptr(), p.dtype, p.device) for p in (params[:1] + params[-1:]))
    if with_versions:
        key += (len(params), sum(p._version for p in params))
    return key


# ---------------------------------------------------------------------- install / remove
def enable_graph_decode(model: nn.Module, cache_grows: bool = False) -> GraphDecodeForward:
    """Wrap ``model.forward`` for CUDA-graph decode (idempotent); returns the wrapper."""
    current = model.__dict__.get("forward")
    if isinstance(current, GraphDecodeForward):
        current.model = model
        return current
    wrapper = GraphDecodeForward(model, cache_grows=cache_grows)
    model.forward = wrapper  # type: ignore[method-assign]
    return wrapper


def disable_graph_decode(model: nn.Module) -> None:
    if isinstance(model.__dict__.get("forward"), GraphDecodeForward):
        del model.forward


def graph_decoder_of(model: nn.Module) -> GraphDecodeForward | None:
    current = model.__dict__.get("forward")
    return current if isinstance(current, GraphDecodeForward) else None
