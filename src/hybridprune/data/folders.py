"""Image datasets in class folders (ImageNet layout), streamed from disk by a DataLoader.

`folder:PATH` reads `PATH/train/<class>/*` and `PATH/val/<class>/*` (without `val/`, a seeded 10% of
`train/`). Images are decoded in DataLoader worker processes with torchvision's standard transforms
(training: random resized crop and flip; evaluation: resize and centre crop), pinned memory and a bounded
prefetch, so memory stays flat whatever the number of files. A file that cannot be decoded is skipped and
counted (`strict=True` makes it an error instead), never a crash in the middle of an epoch.

Every file is untrusted input (`read_image`): it is opened only as one of the formats the loader accepts, and
its size is read from its header and checked against `config.MAX_IMAGE_PIXELS` before anything is decoded,
in whichever process decodes it (a DataLoader worker, or the main process with `workers=0`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from hybridprune.config import MAX_IMAGE_PIXELS
from hybridprune.errors import HybridPruneError
from hybridprune.world import World, shard

EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
FORMATS = ("JPEG", "PNG", "PPM", "BMP", "TIFF", "WEBP")  # Pillow's names of those files' formats: none other opens
VAL_FRACTION = 0.1  # held out of train/ when there is no val/
DEFAULT_IMAGE_SIZE = 224


def default_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 2) - 1))


@dataclass
class SkipCounter:
    """Files skipped because they could not be decoded, across every pass over a split."""

    paths: set[str] = field(default_factory=set)

    @property
    def count(self) -> int:
        return len(self.paths)


class _Images(Dataset):
    """(path, label) samples decoded on access; a file that fails yields its path and error instead."""

    def __init__(self, samples: list[tuple[str, int]], transform: object) -> None:
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple:
        path, label = self.samples[i]
        try:
            image = read_image(path)
        except (OSError, ValueError, SyntaxError) as e:  # truncated, corrupt, not an accepted format, too large
            return path, f"{type(e).__name__}: {str(e)[:120]}"
        return self.transform(image), label


def read_image(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> object:
    """The RGB image (a PIL image) in `path`, opened only as one of `FORMATS` and decoded only when its header
    claims at most `max_pixels` pixels; any other file raises OSError or ValueError (one line), and no warning
    of Pillow's reaches the caller. Pillow's global settings are left as they are.

    Example:
        >>> from PIL import Image
        >>> path = getfixture("tmp_path") / "a.png"
        >>> Image.new("RGB", (4000, 4000)).save(path)
        >>> read_image(path).size
        (4000, 4000)
        >>> read_image(path, max_pixels=1000)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: its header claims 4000x4000 pixels, over the bound of 1,000; not decoded
    """
    from PIL import Image

    # Pillow's own bomb check (a warning above Image.MAX_IMAGE_PIXELS, an error above twice it) runs inside
    # open(), on a bound far above ours: silenced here, since the header check below decides first; a broken
    # file's other warnings would only repeat, per file, what its count or --strict already says
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            img = Image.open(path, formats=FORMATS)
        except Image.DecompressionBombError:
            raise ValueError(f"its header claims over {max_pixels:,} pixels, the bound; not decoded") from None
        with img:
            width, height = img.size
            if width < 1 or height < 1:
                raise ValueError(f"its header claims {width}x{height} pixels, an empty image")
            if width * height > max_pixels:
                bound = f"over the bound of {max_pixels:,}; not decoded"
                raise ValueError(f"its header claims {width}x{height} pixels, {bound}")
            return img.convert("RGB")


def _collate(items: list[tuple]) -> tuple[torch.Tensor | None, torch.Tensor | None, list[tuple[str, str]]]:
    good = [(x, y) for x, y in items if isinstance(x, torch.Tensor)]
    bad = [(x, y) for x, y in items if not isinstance(x, torch.Tensor)]
    if not good:
        return None, None, bad
    return torch.stack([x for x, _ in good]), torch.tensor([y for _, y in good]), bad


@dataclass
class FolderSet:
    """One split of a class-folder dataset: samples on disk, streamed in batches of float images in [0, 1]."""

    samples: list[tuple[str, int]]
    classes: tuple[str, ...]
    image_size: int = DEFAULT_IMAGE_SIZE
    workers: int = field(default_factory=default_workers)
    strict: bool = False
    skipped: SkipCounter = field(default_factory=SkipCounter)

    channels = 3

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def y(self) -> torch.Tensor:
        return torch.tensor([label for _, label in self.samples])

    def subset(self, size: int | None, seed: int) -> FolderSet:
        """A seeded random subset of `size` images (all of them when size is None or larger)."""
        if size is None or size >= len(self):
            return self
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:size].tolist()
        return replace(self, samples=[self.samples[i] for i in sorted(idx)])

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
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Stream `(images, labels)`; undecodable files are counted in `skipped` (or refused when strict).
        With a `world` of several ranks, only this rank's shard of the (seeded, shared) order."""
        data = _Images(self.samples, self._transform(augment, hflip))
        if world is not None and world.active:
            gen = torch.Generator().manual_seed(seed)
            order = torch.randperm(len(data), generator=gen) if shuffle else torch.arange(len(data))
            data, shuffle = Subset(data, shard(order, world).tolist()), False
        loader = DataLoader(
            data,
            batch_size=batch_size,
            shuffle=shuffle,
            generator=torch.Generator().manual_seed(seed),
            num_workers=self.workers,
            collate_fn=_collate,
            pin_memory=torch.device(device).type == "cuda",
            prefetch_factor=2 if self.workers else None,  # bounded: memory does not grow with the dataset
            persistent_workers=False,
        )
        for x, y, bad in loader:
            for path, error in bad:
                if self.strict:
                    raise HybridPruneError(f"{path} cannot be read ({error}); without --strict it would be skipped")
                self.skipped.paths.add(path)
            if x is not None:
                yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    def _transform(self, augment: bool, hflip: bool) -> object:
        from torchvision import transforms as T

        if augment:
            steps = [T.RandomResizedCrop(self.image_size, antialias=True)]
            steps += [T.RandomHorizontalFlip()] if hflip else []
        else:
            steps = [T.Resize(int(round(self.image_size / 0.875)), antialias=True), T.CenterCrop(self.image_size)]
        return T.Compose([*steps, T.ToTensor()])


def load_folder(path: Path, image_size: int = DEFAULT_IMAGE_SIZE, workers: int | None = None, strict: bool = False):
    """`(train, test, note)` splits of a class-folder dataset; bad layouts are one line each."""
    if not path.is_dir():
        raise HybridPruneError(f"folder dataset {path} not found: give a folder with train/<class>/ images")
    train_dir = path / "train"
    if not train_dir.is_dir():
        raise HybridPruneError(f"folder dataset {path} has no train/ folder (expected train/<class>/*.jpg|png)")
    classes, train = _scan(train_dir)
    workers = default_workers() if workers is None else workers
    make = lambda samples: FolderSet(samples, classes, image_size, workers, strict)  # noqa: E731
    if (path / "val").is_dir():
        val_classes, val = _scan(path / "val")
        if val_classes != classes:
            raise HybridPruneError(
                f"{path}/val has classes {list(val_classes)[:5]}..., train/ has {list(classes)[:5]}..."
            )
        return make(train), make(val), ""
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
    n_val = max(1, int(round(len(train) * VAL_FRACTION)))
    held = set(order[:n_val])
    note = f"{path} has no val/ folder: a seeded {n_val} of its {len(train)} train images are held out for testing"
    return make([s for i, s in enumerate(train) if i not in held]), make([train[i] for i in sorted(held)]), note


def _scan(folder: Path) -> tuple[tuple[str, ...], list[tuple[str, int]]]:
    classes = tuple(sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")))
    if len(classes) < 2:
        raise HybridPruneError(f"{folder} needs at least 2 class subfolders with images, found {len(classes)}")
    samples = []
    for label, name in enumerate(classes):
        files = sorted(p for p in (folder / name).rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())
        if not files:
            raise HybridPruneError(f"class folder {folder / name} holds no images ({', '.join(EXTENSIONS)})")
        samples += [(str(p), label) for p in files]
    return classes, samples
