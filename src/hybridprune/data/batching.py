"""Batches of an in-memory split, augmented with batched tensor ops (a random shift and flip), so the CPU
spends its time in the model, not in a loader; a streamed split brings its own loader (`StreamedSplit.batches`)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from hybridprune.data.images import ImageSet, StreamedSplit
from hybridprune.world import World, shard


def channel_stats(data: ImageSet | StreamedSplit, sample: int = 512) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the images in [0, 1], for the model's input normalisation (a streamed
    folder: of a seeded sample of `sample` images, as evaluation sees them)."""
    if isinstance(data, StreamedSplit):
        x = next(batches(data.subset(sample, seed=0), sample))[0]
        return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()
    x = data.x.float().div_(255)
    return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()


def batches(
    data: ImageSet | StreamedSplit,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    augment: bool = False,
    hflip: bool = False,
    device: torch.device | str = "cpu",
    world: World | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield `(images in [0, 1] as float, labels)` batches; augmentation is a random shift (and flip).
    With a `world` of several ranks, only this rank's shard of the (seeded, shared) order.

    Example:
        >>> s = ImageSet(torch.zeros(5, 1, 8, 8, dtype=torch.uint8), torch.zeros(5, dtype=torch.long), 2)
        >>> [x.shape[0] for x, _ in batches(s, 2)]
        [2, 2, 1]
    """
    if isinstance(data, StreamedSplit):  # streamed from disk: the split brings its own loader
        yield from data.batches(
            batch_size, shuffle=shuffle, seed=seed, augment=augment, hflip=hflip, device=device, world=world
        )
        return
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)) if shuffle else None
    if world is not None and world.active:
        order = shard(order if order is not None else torch.arange(len(data)), world)
    gen = torch.Generator().manual_seed(seed + 1)
    for start in range(0, len(data) if order is None else len(order), batch_size):
        idx = order[start : start + batch_size] if order is not None else slice(start, start + batch_size)
        x = data.x[idx].to(device, non_blocking=True).float().div_(255)
        if augment:
            x = random_shift(x, max_shift=max(1, x.shape[-1] // 8), generator=gen)
            if hflip:
                flip = torch.rand(x.shape[0], generator=gen) < 0.5
                x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)
        yield x, data.y[idx].to(device, non_blocking=True)


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to max_shift pixels, zero-filled: a batched 'pad and random crop'."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    dy, dx = (torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator)).to(x.device)
    rows = (torch.arange(h, device=x.device)[None] + dy[:, None])[:, :, None]  # [N, H, 1]
    cols = (torch.arange(w, device=x.device)[None] + dx[:, None])[:, None, :]  # [N, 1, W]
    batch = torch.arange(n, device=x.device)[:, None, None]
    shifted = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)
    # clone, not .contiguous(): with one channel the permuted view already counts as contiguous but keeps an odd
    # stride on the channel dim, and oneDNN's CPU convolutions corrupt memory on such inputs (torch 2.14)
    return shifted.clone(memory_format=torch.contiguous_format)
