"""`load_dataset`: a registered dataset by name, a user's arrays (`npz:PATH`) or class folders streamed from
disk (`folder:PATH`), each checked before any model is built from it."""

from __future__ import annotations

from pathlib import Path

from hybridprune.config import DEFAULT_DATA_DIR
from hybridprune.data.folders import DEFAULT_IMAGE_SIZE, load_folder
from hybridprune.data.formats import DATASETS, load_npz
from hybridprune.data.images import Dataset, check_dataset


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    download: bool = False,
    *,
    image_size: int | None = None,
    workers: int | None = None,
    strict: bool = False,
) -> Dataset:
    """Load a dataset by name: a registered one, `npz:PATH` for a folder or file of arrays, or `folder:PATH`
    for class folders streamed from disk (`image_size`, `workers` and `strict` apply to those; see folders.py).

    Example:
        >>> ds = load_dataset("digits")
        >>> ds.train.x.shape[1:], ds.train.num_classes
        (torch.Size([1, 32, 32]), 10)
    """
    root = Path(data_dir).expanduser() if data_dir else DEFAULT_DATA_DIR
    if name.startswith("folder:"):
        path = Path(name[7:]).expanduser()
        train, test, note = load_folder(path, image_size or DEFAULT_IMAGE_SIZE, workers, strict)
        return Dataset(f"folder:{path}", train, test, hflip=True, note=note)
    if name.startswith("npz:"):
        path = Path(name[4:]).expanduser()
        return check_dataset(load_npz(path), f"npz dataset {path}")
    return check_dataset(DATASETS.get(name)(root, download), f"dataset {name} in {root}")
