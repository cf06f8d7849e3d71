"""Several processes, one job: `torchrun --nproc-per-node N -m hybridprune run ...` (add `--nnodes` and a
rendezvous for several machines). Training runs under DistributedDataParallel (NCCL on GPUs, Gloo on CPUs),
each rank on its own shard of every epoch; everything else is decided once, on rank 0, and broadcast (filter
plans, N:M masks), so every rank holds bit-identical weights and masks after every step. Only rank 0 writes.

One process (no torchrun) is the default: `World()` with size 1, and nothing here does anything.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from .errors import HybridPruneError
from .graph import set_module

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
    from .train import resolve_device

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


@torch.no_grad()
def sync_model_(model: nn.Module, world: World) -> nn.Module:
    """Copy rank 0's parameters and buffers (BatchNorm statistics included) to every rank, in place."""
    if world.active:
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)
    return model


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


def ddp(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """The model wrapped for training across ranks (gradients averaged every step); itself when alone."""
    if not world.active:
        return model
    from torch.nn.parallel import DistributedDataParallel

    with torch.no_grad():  # pruned weights can carry odd strides on size-1 dims; DDP's buckets want standard ones
        for p in model.parameters():
            p.data = p.data.clone(memory_format=torch.contiguous_format)

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


@contextmanager
def synced_batchnorm(model: nn.Module, world: World, device: torch.device) -> Iterator[nn.Module]:
    """Within the block, the model's BatchNorm layers are SyncBatchNorm (statistics over every rank's batch:
    GPUs only, as in PyTorch); after it, the original layer types again, holding the trained tensors."""
    if not world.active:
        yield model
        return
    if device.type != "cuda":
        raise HybridPruneError("--sync-bn needs GPUs (PyTorch's SyncBatchNorm has no CPU kernel); drop it on CPUs")
    kinds = {n: type(m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    try:
        yield synced
    finally:
        for name, kind in kinds.items():
            set_module(synced, name, _as_plain(synced.get_submodule(name), kind))


def _as_plain(bn: nn.Module, kind: type) -> nn.Module:
    """A BatchNorm of `kind` sharing `bn`'s parameters and running statistics."""
    plain = kind(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    plain.weight, plain.bias = bn.weight, bn.bias
    if bn.track_running_stats:
        plain.running_mean, plain.running_var = bn.running_mean, bn.running_var
        plain.num_batches_tracked = bn.num_batches_tracked
    return plain.train(bn.training)
