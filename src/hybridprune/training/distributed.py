"""Several processes, one job: `torchrun --nproc-per-node N -m hybridprune run ...` (add `--nnodes` and a
rendezvous for several machines). Training runs under DistributedDataParallel (NCCL on GPUs, Gloo on CPUs),
each rank on its own shard of every epoch; everything else is decided once, on rank 0, and broadcast (filter
plans, N:M masks), so every rank holds bit-identical weights and masks after every step. Only rank 0 writes.

One process (no torchrun) is the default: `World()` with size 1, and nothing here does anything.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from hybridprune.errors import HybridPruneError
from hybridprune.pruning.graph import set_module
from hybridprune.world import World


@torch.no_grad()
def sync_model_(model: nn.Module, world: World) -> nn.Module:
    """Copy rank 0's parameters and buffers (BatchNorm statistics included) to every rank, in place."""
    if world.active:
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)
    return model


def any_rank(flag: torch.Tensor, world: World) -> bool:
    """Whether `flag` (a bool tensor on this rank's device) is true on any rank: a decision every rank takes
    alike, so none waits in a collective that another has left."""
    if world.active:
        flag = flag.to(torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag)


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
            set_module(synced, name, plain_batchnorm(synced.get_submodule(name), kind))


def plain_batchnorm(bn: nn.Module, kind: type) -> nn.Module:
    """A BatchNorm of `kind` sharing `bn`'s parameters and running statistics (the same tensors, not copies):
    how `synced_batchnorm` turns SyncBatchNorm layers back into the model's own types.

    Example:
        >>> sync = nn.SyncBatchNorm(8)
        >>> bn = plain_batchnorm(sync, nn.BatchNorm2d)
        >>> type(bn).__name__, bn.weight is sync.weight, bn.running_mean is sync.running_mean
        ('BatchNorm2d', True, True)
    """
    plain = kind(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    plain.weight, plain.bias = bn.weight, bn.bias
    if bn.track_running_stats:
        plain.running_mean, plain.running_var = bn.running_mean, bn.running_var
        plain.num_batches_tracked = bn.num_batches_tracked
    return plain.train(bn.training)
