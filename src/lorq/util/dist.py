"""Many processes on torch.distributed (``torchrun``; NCCL on GPUs, gloo on CPUs).

    targets of block b: dealt largest first to the least loaded rank (``World.deal``), each rank
    decomposes its own; every rank then holds every layer (broadcast from its owner), so all run
    the same block
    calibration sequences: rank r runs X_b for sequences i with i mod W = r; all gather them

Every number a rank computes is computed as one process computes it (the same matrix, the same
sequence, the same order of sums), and only rank 0 writes, so the output's bytes do not depend on
the world size. Without ``torchrun`` (no process group, WORLD_SIZE unset) everything here is the
identity of one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class World:
    """This process's rank among ``size`` processes; rank 0 writes."""

    rank: int = 0
    size: int = 1

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def owns(self, index: int) -> bool:
        return index % self.size == self.rank

    def deal(self, sizes: list[int]) -> list[int]:
        """The process of each of a list of jobs of ``sizes``: largest first, each to the least
        loaded process (ties: the lower rank). Deterministic; which process computes a job
        changes none of its numbers."""
        load = [0] * self.size
        owners = [0] * len(sizes)
        for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
            owner = min(range(self.size), key=lambda r: (load[r], r))
            owners[i] = owner
            load[owner] += sizes[i]
        return owners


def world() -> World:
    """The process group of a ``torchrun`` launch (initialised here when the launcher set
    WORLD_SIZE; NCCL when each rank has its GPU, else gloo), or one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return World()
    if not torch_dist.is_initialized():
        cuda = torch.cuda.is_available() and torch.cuda.device_count() > 0
        torch_dist.init_process_group("nccl" if cuda else "gloo")
    return World(torch_dist.get_rank(), torch_dist.get_world_size())


def broadcast(value: Any, source: int, w: World) -> Any:
    """``value`` of rank ``source`` on every rank (picklable objects, CPU tensors)."""
    if w.size == 1:
        return value
    box = [value if w.rank == source else None]
    torch_dist.broadcast_object_list(box, src=source)
    return box[0]


def gather_rows(rows: dict[int, torch.Tensor], w: World) -> dict[int, torch.Tensor]:
    """Every rank's {sequence index: tensor} on every rank."""
    if w.size == 1:
        return rows
    parts = gather_objects({i: t.cpu() for i, t in rows.items()}, w)
    return {i: t for part in parts for i, t in part.items()}


def gather_objects(value: Any, w: World) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank."""
    if w.size == 1:
        return [value]
    parts: list[Any] = [None] * w.size
    torch_dist.all_gather_object(parts, value)
    return parts


def barrier(w: World) -> None:
    if w.size > 1:
        torch_dist.barrier()
