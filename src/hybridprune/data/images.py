"""A dataset in memory: each split one uint8 tensor `[N, C, H, W]` with integer labels, and the checks every
loader's output passes before a model is built from it.

Small image datasets fit in memory many times over, so a batch is a slice of one tensor (see `batching`); a
split streamed from disk (`folders.FolderSet`) offers the `StreamedSplit` protocol.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from hybridprune.errors import HybridPruneError
from hybridprune.world import World

# What the models accept: square images of 1 or 3 channels, at least 8 pixels a side (AlexNet pools three
# times), at most 4096 (beyond that one image is more memory than these small-image models are meant for).
IMAGE_CHANNELS = (1, 3)
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 4096
MAX_CLASSES = 100_000  # a stray huge label must not build a classifier layer of millions of outputs


@runtime_checkable
class StreamedSplit(Protocol):
    """A split too large for memory (`folders.FolderSet`): what training and evaluation need of it, its size,
    classes, seeded subsets and its own loader of `(images in [0, 1] as float [B, C, H, W], labels [B])`
    batches, sharded by `world` when several ranks run. `batching.batches` takes an `ImageSet` or this."""

    num_classes: int

    def __len__(self) -> int: ...

    def subset(self, size: int | None, seed: int) -> StreamedSplit: ...

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        augment: bool = False,
        hflip: bool = False,
        device: torch.device | str = "cpu",
        world: World | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


@dataclass(frozen=True)
class ImageSet:
    """One split: images as uint8 `[N, C, H, W]` and integer labels `[N]`.

    Example:
        >>> s = ImageSet(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 0, 1]), 2)
        >>> len(s), s.channels, s.image_size
        (4, 1, 8)
    """

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def channels(self) -> int:
        return self.x.shape[1]

    @property
    def image_size(self) -> int:
        return self.x.shape[2]

    def subset(self, size: int | None, seed: int) -> ImageSet:
        """A seeded random subset of `size` images (all of them when size is None or larger)."""
        if size is None or size >= len(self):
            return self
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:size]
        return ImageSet(self.x[idx], self.y[idx], self.num_classes)


@dataclass(frozen=True)
class Dataset:
    """A named dataset: train and test splits and whether horizontal flips preserve labels."""

    name: str
    train: ImageSet | StreamedSplit
    test: ImageSet | StreamedSplit
    hflip: bool
    note: str = ""  # something the run should say about how the data was read


def check_dataset(ds: Dataset, source: str) -> Dataset:
    """Check what a loader returned before any model is built from it: the dataset unchanged, or one
    HybridPruneError line naming `source`, what is wrong and what is valid.

    Example:
        >>> s = ImageSet(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 0, 1]), 2)
        >>> check_dataset(Dataset("toy", s, s, hflip=False), "toy").name
        'toy'
        >>> wide = ImageSet(torch.zeros(4, 1, 8, 9, dtype=torch.uint8), torch.tensor([0, 1, 0, 1]), 2)
        >>> check_dataset(Dataset("toy", wide, s, hflip=False), "toy")
        Traceback (most recent call last):
        ...
        hybridprune.errors.HybridPruneError: toy (train split): images are 8x9; valid: square, 8 to 4096 pixels a side
    """
    k = ds.train.num_classes
    if ds.test.num_classes != k:
        raise HybridPruneError(
            f"{source}: train has {k} classes but test has {ds.test.num_classes}; both need the same"
        )
    if isinstance(k, bool) or not isinstance(k, int) or not 2 <= k <= MAX_CLASSES:
        raise HybridPruneError(
            f"{source}: {k!r} {'class' if k == 1 else 'classes'}; valid: 2 to {MAX_CLASSES} classes labelled 0..K-1"
        )
    for split_name, data in (("train", ds.train), ("test", ds.test)):
        where = f"{source} ({split_name} split)"
        check_images(data.x, where, allow_empty=True)  # the counts are checked below, with both splits named
        check_labels(data.y, k, where, count=len(data.x))
    if ds.train.x.shape[1:] != ds.test.x.shape[1:]:
        raise HybridPruneError(
            f"{source}: train images are {_shape(ds.train.x)} but test images are {_shape(ds.test.x)}; "
            "both splits need the same channels and size"
        )
    if len(ds.train) < 2 or len(ds.test) < 1:
        raise HybridPruneError(
            f"{source}: {len(ds.train)} train and {len(ds.test)} test images; need at least 2 train and 1 test"
        )
    return ds


def check_images(x: object, where: str, allow_empty: bool = False) -> None:
    """Images as the models take them: uint8 [N, C, S, S] with C in (1, 3) and S in 8..4096, N >= 1."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.ndim != 4:
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise HybridPruneError(f"{where}: images must be uint8 N x C x H x W; got {got}")
    n, c, h, w = x.shape
    if n == 0 and not allow_empty:
        raise HybridPruneError(f"{where}: holds no images; valid: at least one")
    if c not in IMAGE_CHANNELS:
        raise HybridPruneError(f"{where}: images have {c} channels; valid: 1 (grey) or 3 (colour)")
    if h != w or not MIN_IMAGE_SIZE <= h <= MAX_IMAGE_SIZE:
        raise HybridPruneError(
            f"{where}: images are {h}x{w}; valid: square, {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} pixels a side"
        )


def check_labels(y: object, num_classes: int, where: str, count: int, valid: str | None = None) -> None:
    """Labels as the loss takes them: `count` integers in 0..num_classes-1 (`valid` says so to the user)."""
    if not isinstance(y, torch.Tensor) or y.ndim != 1 or y.dtype == torch.bool or y.is_floating_point():
        got = f"{y.dtype} {tuple(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
        raise HybridPruneError(f"{where}: labels must be one integer per image; got {got}")
    if len(y) != count:
        raise HybridPruneError(f"{where}: {count} images but {len(y)} labels; valid: one label per image")
    if count and (y.min() < 0 or y.max() >= num_classes):
        bad = int(y.min()) if y.min() < 0 else int(y.max())
        valid = valid or f"integers 0..{num_classes - 1} ({num_classes} classes)"
        raise HybridPruneError(f"{where}: label {bad} is out of range; valid: {valid}")


def _shape(x: torch.Tensor) -> str:
    return f"{x.shape[1]}x{x.shape[2]}x{x.shape[3]}"


def split(data: ImageSet, test_fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """A seeded random train/test split."""
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(data) * test_fraction))
    test, train = idx[:n_test], idx[n_test:]
    return ImageSet(data.x[train], data.y[train], data.num_classes), ImageSet(
        data.x[test], data.y[test], data.num_classes
    )
