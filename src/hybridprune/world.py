"""Where a job runs: this process's rank among torchrun's processes, and its device.

One process (no torchrun) is the default: `World()` with size 1, and nothing here does anything. Rank 0
decides (filter plans, N:M masks) and broadcasts; only rank 0 writes. A core module: data shards by it,
training and the staged job use it; the DDP wrappers themselves live in `training.distributed`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from hybridprune.errors import HybridPruneError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of a job."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one that decides, writes and prints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


def world_from_env(device_name: str = "auto") -> tuple[World, torch.device]:
    """The world torchrun describes in the environment (one process without it), and this rank's device."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(), resolve_device(device_name)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and not device_name.startswith("cpu")
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return World(rank, size, local), torch.device("cuda", local) if use_cuda else torch.device("cpu")


def check_batch(batch_size: int, world: World) -> None:
    """The global batch is split evenly over the ranks."""
    if batch_size % world.size:
        raise HybridPruneError(
            f"batch size {batch_size} does not divide over {world.size} processes; use a multiple of {world.size}"
        )


def broadcast(obj: T, world: World) -> T:
    """Rank 0's `obj` on every rank (pickled by torch.distributed between our own processes only)."""
    if not world.active:
        return obj
    box: list[Any] = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: World) -> None:
    if world.active:
        dist.barrier()


def shard(order: torch.Tensor, world: World) -> torch.Tensor:
    """This rank's share of an epoch's order: every rank gets the same count (a few images dropped at the
    end when the count does not divide), so all ranks take the same number of steps.

    Example:
        >>> shard(torch.arange(7), World(rank=1, size=2)).tolist()
        [1, 3, 5]
    """
    if not world.active:
        return order
    usable = len(order) // world.size * world.size
    return order[:usable][world.rank :: world.size]


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when present; 'cuda' without a GPU is bad input."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise HybridPruneError(f"unknown device {name!r}; valid: cpu, cuda, cuda:N, auto")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise HybridPruneError(f"device {name} requested but no CUDA GPU is available; use --device cpu")
    return torch.device(name)
