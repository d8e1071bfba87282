"""The process's place in a torch.distributed group (or a group of one), and the few collectives used."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Place:
    """Rank, world size and local rank of this process; (0, 1, 0) without torch.distributed."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def current(cls) -> Place:
        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        # torchrun and Ray Train set LOCAL_RANK: the GPU of this process on its node.
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank() % max(1, torch.cuda.device_count())))
        return cls(dist.get_rank(), dist.get_world_size(), local)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def gather_objects(place: Place, value: Any) -> list[Any]:
    """Every rank's `value`, in rank order (just [value] in a group of one)."""
    if not place.distributed:
        return [value]
    gathered: list[Any] = [None] * place.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_object(place: Place, value: Any) -> Any:
    """Rank 0's `value` on every rank."""
    if not place.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(place: Place) -> None:
    if place.distributed:
        dist.barrier()
