"""The on-disk formats of the registered datasets and of a user's arrays: scikit-learn's digits, IDX (MNIST,
Fashion-MNIST), SVHN's .mat, CIFAR-10's pickled batches (read by an unpickler that builds arrays only), npz.

These are the real formats, in torchvision's folder layouts; torchvision is used only to download, so a
folder written by anyone in those formats loads. Every reader checks what it read (`images.check_dataset`).
"""

from __future__ import annotations

import math
import os
import pickle
import struct
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F

from hybridprune.config import DATASET_NAMES
from hybridprune.data.images import MAX_CLASSES, Dataset, ImageSet, check_images, check_labels, split
from hybridprune.errors import HybridPruneError
from hybridprune.registry import Registry

DIGITS_SPLIT_SEED = 0  # fixed, so every user gets the same digits train/test split
Loader = Callable[[Path, bool], Dataset]
DATASETS: Registry[Loader] = Registry("dataset", DATASET_NAMES)


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
    raw = root / folder / "raw"
    files = [raw / f for pair in MNIST_FILES.values() for f in pair]
    _ensure_files(name, files, download, lambda: _tv_download(tv_class, root, (True, False)))
    splits = {}
    for split_name, (images, labels) in MNIST_FILES.items():
        x = torch.from_numpy(_read_idx(raw / images, ndim=3)).unsqueeze(1)
        y = torch.from_numpy(_read_idx(raw / labels, ndim=1)).long()
        check_images(x, str(raw / images))
        if len(y) != len(x):
            raise HybridPruneError(f"{raw / labels} holds {len(y)} labels but {images} holds {len(x)} images")
        check_labels(y, 10, str(raw / labels), count=len(x))
        splits[split_name] = ImageSet(x, y, 10)
    return Dataset(name, splits["train"], splits["test"], hflip=False)


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes (MNIST's format: big-endian magic 0x0000080N, N uint32 sizes, the data),
    read only after its size matches what its header promises, so a damaged file is one clear line."""
    try:
        with open(path, "rb") as f:
            return _read_idx_from(f, path, ndim)
    except OSError as e:  # unreadable: permissions, an I/O error on a damaged disk
        raise HybridPruneError(f"cannot read {path}: {e.strerror or e}") from None


def _read_idx_from(f: BinaryIO, path: Path, ndim: int) -> np.ndarray:
    header_len = 4 + 4 * ndim
    size = os.fstat(f.fileno()).st_size
    head = f.read(header_len)
    if len(head) < header_len:
        raise HybridPruneError(f"{path} is cut short: {size} bytes, less than its {header_len}-byte IDX header")
    zero, dtype, dims = struct.unpack(">HBB", head[:4])
    if (zero, dtype, dims) != (0, 0x08, ndim):
        raise HybridPruneError(
            f"{path} is not an IDX file of unsigned bytes with {ndim} dimensions: "
            f"magic 0x{head[:4].hex()}, valid 0x0000080{ndim}"
        )
    shape = struct.unpack(f">{ndim}I", head[4:])
    expected = header_len + math.prod(shape)
    if size != expected:
        raise HybridPruneError(
            f"{path} has {size} bytes but its header promises {' x '.join(map(str, shape))} values "
            f"({expected} bytes): the file is cut short or damaged"
        )
    data = np.fromfile(f, dtype=np.uint8, count=math.prod(shape))
    if data.size != math.prod(shape):  # the file changed between the size check and the read
        raise HybridPruneError(f"{path} changed while it was read; try again")
    return data.reshape(shape)


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
    splits = [_read_svhn_mat(path, loadmat) for path in files]
    return Dataset("svhn", splits[0], splits[1], hflip=False)


def _read_svhn_mat(path: Path, loadmat: Callable) -> ImageSet:
    try:
        mat = loadmat(str(path))
    except Exception as e:  # scipy raises many types on damaged files (ValueError, OSError, zlib, MatReadError)
        raise HybridPruneError(f"{path} is not a readable .mat file ({_one_line(e)})") from None
    x, y = mat.get("X"), mat.get("y")
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4:
        got = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else "nothing"
        raise HybridPruneError(f"{path}: X must be uint8 H x W x C x N images; got {got}")
    # The official files store y as doubles: accept any number that is a whole one, refuse 1.5, nan, inf.
    if not isinstance(y, np.ndarray) or y.size != x.shape[3] or not np.issubdtype(y.dtype, np.number):
        got = f"{y.dtype} {y.shape}" if isinstance(y, np.ndarray) else "nothing"
        raise HybridPruneError(f"{path}: y must hold one label per image ({x.shape[3]}); got {got}")
    y = y.reshape(-1)
    if np.issubdtype(y.dtype, np.complexfloating) or not np.all(np.isfinite(y) & (np.round(y) == y)):
        raise HybridPruneError(f"{path}: labels must be whole numbers 1..10 (10 for the digit 0)")
    labels = torch.from_numpy(np.clip(y, -1, MAX_CLASSES).astype(np.int64))  # clip: no int64 overflow on 1e300
    check_labels(labels, 11, str(path), count=len(labels), valid="1..10, 10 for the digit 0")
    images = torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1)))  # HWCN -> NCHW
    check_images(images, str(path))
    return ImageSet(images, torch.where(labels == 10, 0, labels), 10)  # SVHN labels the digit 0 as 10


def _int64_labels(y: np.ndarray) -> torch.Tensor:
    # uint64 labels past 2**63 would wrap round to small or negative ones; any label that large is refused anyway
    return torch.from_numpy((np.minimum(y, MAX_CLASSES) if y.dtype == np.uint64 else y).astype(np.int64))


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


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
        data, labels = np.asarray(entry["data"]), np.asarray(entry.get("labels", entry.get("fine_labels")))
    except Exception as e:  # a damaged pickle fails in many ways (EOFError, UnpicklingError, struct, ValueError)
        raise HybridPruneError(f"{path} is not a CIFAR-10 batch file ({_one_line(e)})") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise HybridPruneError(f"{path}: data must be uint8 N x 3072 (32x32 RGB images); got {data.dtype} {data.shape}")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or len(labels) != len(data):
        raise HybridPruneError(
            f"{path}: labels must be one integer per image ({len(data)}); got {labels.dtype} {labels.shape}"
        )
    x = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    y = _int64_labels(labels)
    check_images(x, str(path))
    check_labels(y, 10, str(path), count=len(x))
    return x, y


def load_npz(path: Path) -> Dataset:
    """Arrays `x` (uint8, N x H x W or N x H x W x C) and `y` (int): a folder with train.npz and test.npz,
    or one file, split 80/20 with a fixed seed."""
    if path.is_dir():
        _ensure_files(f"npz:{path}", [path / "train.npz", path / "test.npz"], False, None)
        train, test = _read_npz(path / "train.npz"), _read_npz(path / "test.npz")
    elif path.is_file():
        data = _read_npz(path)
        if len(data) < 3:
            raise HybridPruneError(f"{path} holds {len(data)} images; one file is split 80/20, so give at least 3")
        train, test = split(data, test_fraction=0.2, seed=DIGITS_SPLIT_SEED)
    else:
        raise HybridPruneError(
            f"npz dataset {path} not found: give a .npz file or a folder with train.npz and test.npz"
        )
    # Each file's labels are already checked to be in 0..MAX_CLASSES-1; an empty test split (a tiny single
    # file) counts as no labels here and is refused by check_dataset with the image counts.
    num_classes = int(max(train.y.max(), test.y.max() if len(test) else 0)) + 1
    train, test = ImageSet(train.x, train.y, num_classes), ImageSet(test.x, test.y, num_classes)
    return Dataset(f"npz:{path}", train, test, hflip=train.channels == 3)


def _read_npz(path: Path) -> ImageSet:
    try:
        with np.load(path, allow_pickle=False) as arrays:
            x, y = arrays["x"], arrays["y"]
    except KeyError:
        raise HybridPruneError(f"{path} must hold arrays 'x' and 'y'") from None
    except Exception as e:  # a damaged zip fails in many ways (BadZipFile, EOFError, zlib, ValueError, .npy given)
        raise HybridPruneError(f"{path} is not a readable .npz file ({_one_line(e)})") from None
    if x.dtype != np.uint8 or x.ndim not in (3, 4) or y.ndim != 1 or len(x) != len(y):
        raise HybridPruneError(
            f"{path}: x must be uint8 N x H x W (x C) and y one int per image; "
            f"got x {x.dtype} {x.shape}, y {y.dtype} {y.shape}"
        )
    if not np.issubdtype(y.dtype, np.integer):
        raise HybridPruneError(f"{path}: y must hold integer labels 0..K-1; got {y.dtype}")
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
    images = torch.from_numpy(np.ascontiguousarray(x))
    labels = _int64_labels(y)
    check_images(images, str(path))
    check_labels(labels, MAX_CLASSES, str(path), len(images), f"integers 0..K-1 for K classes, K <= {MAX_CLASSES}")
    return ImageSet(images, labels, int(labels.max()) + 1)


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
