"""A thin view of ``torch.distributed`` for the search: rank, world size, gather and broadcast.

Processes started by ``torchrun`` or ``accelerate launch`` get ``WORLD_SIZE``/``RANK`` in the
environment; :func:`init_from_env` joins that process group (gloo on CPU, NCCL on CUDA). Without a
group everything degenerates to the single process, so the same search code serves both.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


class Comm:
    """The current process group (or a single process when there is none)."""

    def __init__(self) -> None:
        self.enabled = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.enabled else 0
        self.world_size = dist.get_world_size() if self.enabled else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(device: str | None = None) -> Comm:
    """Join the process group described by the launcher's environment, if any; returns the Comm."""
    if env_world_size() > 1 and dist.is_available() and not dist.is_initialized():
        cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        if cuda:
            torch.cuda.set_device(local_rank())
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Comm()


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))


def rank_device(device: str | None) -> str | None:
    """``cuda`` becomes ``cuda:<local rank>`` when several processes share a host."""
    if device == "cuda" and env_world_size() > 1:
        return f"cuda:{local_rank()}"
    return device
