"""Datasets as in-memory uint8 tensors, batched and augmented with tensor ops.

Small image datasets fit in memory many times over, so each split is one uint8 tensor `[N, C, H, W]`
and a batch is a slice of it: the CPU spends its time in the model, not in a loader. The on-disk
formats are the real ones (torchvision's folder layouts, IDX, .mat, CIFAR's pickled batches, npz);
torchvision is used only to download, so a folder written by anyone in those formats loads.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import HybridPruneError
from .registry import Registry

DEFAULT_DATA_DIR = Path.home() / ".cache" / "hybridprune" / "data"
DIGITS_SPLIT_SEED = 0  # fixed, so every user gets the same digits train/test split


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
    train: ImageSet
    test: ImageSet
    hflip: bool


Loader = Callable[[Path, bool], Dataset]
DATASETS: Registry[Loader] = Registry("dataset")


def load_dataset(name: str, data_dir: str | Path | None = None, download: bool = False) -> Dataset:
    """Load a dataset by name: a registered one, or `npz:PATH` for a folder or file of arrays.

    Example:
        >>> ds = load_dataset("digits")
        >>> ds.train.x.shape[1:], ds.train.num_classes
        (torch.Size([1, 32, 32]), 10)
    """
    root = Path(data_dir).expanduser() if data_dir else DEFAULT_DATA_DIR
    if name.startswith("npz:"):
        return load_npz(Path(name[4:]).expanduser())
    return DATASETS.get(name)(root, download)


def dataset_names() -> list[str]:
    return DATASETS.names() + ["npz:PATH"]


# --- the datasets ---------------------------------------------------------------------------------


@DATASETS.register("digits")
def load_digits(root: Path, download: bool) -> Dataset:
    """scikit-learn's 1,797 real 8x8 handwritten digits, upscaled to 32x32, with a fixed 80/20 split."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    pixels = torch.from_numpy(bunch.images).float().unsqueeze(1) * (255.0 / 16.0)
    x = F.interpolate(pixels, size=(32, 32), mode="bilinear", align_corners=False).round().clamp(0, 255)
    data = ImageSet(x.to(torch.uint8), torch.from_numpy(bunch.target).long(), 10)
    train, test = split(data, test_fraction=0.2, seed=DIGITS_SPLIT_SEED)
    return Dataset("digits", train, test, hflip=False)


MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _load_idx_dataset(name: str, folder: str, tv_class: str, root: Path, download: bool) -> Dataset:
    from torchvision.datasets import mnist

    raw = root / folder / "raw"
    files = [raw / f for pair in MNIST_FILES.values() for f in pair]
    _ensure_files(name, files, download, lambda: _tv_download(tv_class, root, (True, False)))
    splits = {}
    for split_name, (images, labels) in MNIST_FILES.items():
        x = mnist.read_image_file(str(raw / images)).unsqueeze(1).contiguous()
        splits[split_name] = ImageSet(x, mnist.read_label_file(str(raw / labels)).long(), 10)
    return Dataset(name, splits["train"], splits["test"], hflip=False)


@DATASETS.register("mnist")
def load_mnist(root: Path, download: bool) -> Dataset:
    """MNIST from torchvision's layout `ROOT/MNIST/raw/*-ubyte` (IDX files)."""
    return _load_idx_dataset("mnist", "MNIST", "MNIST", root, download)


@DATASETS.register("fashion-mnist")
def load_fashion_mnist(root: Path, download: bool) -> Dataset:
    """Fashion-MNIST from torchvision's layout `ROOT/FashionMNIST/raw/*-ubyte` (IDX files)."""
    return _load_idx_dataset("fashion-mnist", "FashionMNIST", "FashionMNIST", root, download)


@DATASETS.register("svhn")
def load_svhn(root: Path, download: bool) -> Dataset:
    """SVHN (cropped digits) from torchvision's layout `ROOT/{train,test}_32x32.mat`."""
    from scipy.io import loadmat

    files = [root / "train_32x32.mat", root / "test_32x32.mat"]
    _ensure_files("svhn", files, download, lambda: _tv_download("SVHN", root, ("train", "test")))
    splits = []
    for path in files:
        mat = loadmat(str(path))
        x = torch.from_numpy(np.ascontiguousarray(mat["X"].transpose(3, 2, 0, 1)))  # HWCN -> NCHW
        y = torch.from_numpy(mat["y"].astype(np.int64).reshape(-1))
        splits.append(ImageSet(x, torch.where(y == 10, 0, y), 10))  # SVHN labels the digit 0 as 10
    return Dataset("svhn", splits[0], splits[1], hflip=False)


CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]


@DATASETS.register("cifar10")
def load_cifar10(root: Path, download: bool) -> Dataset:
    """CIFAR-10 from torchvision's layout `ROOT/cifar-10-batches-py/` (the official pickled batches)."""
    folder = root / CIFAR10_FOLDER
    files = [folder / f for f in CIFAR10_TRAIN + ["test_batch"]]
    _ensure_files("cifar10", files, download, lambda: _tv_download("CIFAR10", root, (True, False)))
    batches = [_read_cifar_batch(f) for f in files]
    train = ImageSet(torch.cat([b[0] for b in batches[:-1]]), torch.cat([b[1] for b in batches[:-1]]), 10)
    return Dataset("cifar10", train, ImageSet(*batches[-1], 10), hflip=True)


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """CIFAR's batches are pickles; allow only the NumPy array types they hold, so no code can run."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle's signature
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        with open(path, "rb") as f:
            entry = _ArraysOnlyUnpickler(f, encoding="latin1").load()
        entry = {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}
        data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(entry.get("labels", entry.get("fine_labels")), dtype=np.int64)
    except (pickle.UnpicklingError, KeyError, ValueError, TypeError, EOFError, AttributeError) as e:
        raise HybridPruneError(f"{path} is not a CIFAR-10 batch file ({e})") from None
    return torch.from_numpy(data.copy()), torch.from_numpy(labels)


def load_npz(path: Path) -> Dataset:
    """Arrays `x` (uint8, N x H x W or N x H x W x C) and `y` (int): a folder with train.npz and test.npz,
    or one file, split 80/20 with a fixed seed."""
    if path.is_dir():
        _ensure_files(f"npz:{path}", [path / "train.npz", path / "test.npz"], False, None)
        train, test = _read_npz(path / "train.npz"), _read_npz(path / "test.npz")
    elif path.is_file():
        train, test = split(_read_npz(path), test_fraction=0.2, seed=DIGITS_SPLIT_SEED)
    else:
        raise HybridPruneError(
            f"npz dataset {path} not found: give a .npz file or a folder with train.npz and test.npz"
        )
    num_classes = int(max(train.y.max(), test.y.max())) + 1
    train, test = ImageSet(train.x, train.y, num_classes), ImageSet(test.x, test.y, num_classes)
    return Dataset(f"npz:{path}", train, test, hflip=train.channels == 3)


def _read_npz(path: Path) -> ImageSet:
    try:
        with np.load(path, allow_pickle=False) as arrays:
            x, y = arrays["x"], arrays["y"]
    except KeyError:
        raise HybridPruneError(f"{path} must hold arrays 'x' and 'y'") from None
    except (ValueError, OSError) as e:
        raise HybridPruneError(f"{path} is not a readable .npz file ({e})") from None
    if x.dtype != np.uint8 or x.ndim not in (3, 4) or y.ndim != 1 or len(x) != len(y):
        raise HybridPruneError(
            f"{path}: x must be uint8 N x H x W (x C) and y one int per image; "
            f"got x {x.dtype} {x.shape}, y {y.dtype} {y.shape}"
        )
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
        raise HybridPruneError(f"{path}: y must hold non-negative integer labels")
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
    y_t = torch.from_numpy(y.astype(np.int64))
    return ImageSet(torch.from_numpy(np.ascontiguousarray(x)), y_t, int(y_t.max()) + 1)


def split(data: ImageSet, test_fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """A seeded random train/test split."""
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(data) * test_fraction))
    test, train = idx[:n_test], idx[n_test:]
    return ImageSet(data.x[train], data.y[train], data.num_classes), ImageSet(
        data.x[test], data.y[test], data.num_classes
    )


def _ensure_files(name: str, files: list[Path], download: bool, fetch: Callable[[], None] | None) -> None:
    missing = [f for f in files if not f.is_file()]
    if missing and download and fetch is not None:
        fetch()
        missing = [f for f in files if not f.is_file()]
    if missing:
        hint = "; pass --download to fetch it" if fetch is not None and not download else ""
        raise HybridPruneError(
            f"dataset {name} not found: expected {', '.join(f.name for f in files)} in {missing[0].parent}{hint}"
        )


def _tv_download(class_name: str, root: Path, splits: tuple) -> None:
    import torchvision.datasets as tvd

    cls = getattr(tvd, class_name)
    for s in splits:
        kwargs = {"split": s} if class_name == "SVHN" else {"train": s}
        try:
            cls(root=str(root), download=True, **kwargs)
        except Exception as e:  # network errors come in many types; the user needs one line either way
            raise HybridPruneError(f"downloading {class_name} into {root} failed: {e}") from None


# --- batches --------------------------------------------------------------------------------------


def channel_stats(data: ImageSet) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the images in [0, 1], for the model's input normalisation."""
    x = data.x.float().div_(255)
    return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()


def batches(
    data: ImageSet,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    augment: bool = False,
    hflip: bool = False,
    device: torch.device | str = "cpu",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield `(images in [0, 1] as float, labels)` batches; augmentation is a random shift (and flip).

    Example:
        >>> s = ImageSet(torch.zeros(5, 1, 8, 8, dtype=torch.uint8), torch.zeros(5, dtype=torch.long), 2)
        >>> [x.shape[0] for x, _ in batches(s, 2)]
        [2, 2, 1]
    """
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)) if shuffle else None
    gen = torch.Generator().manual_seed(seed + 1)
    for start in range(0, len(data), batch_size):
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
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()
