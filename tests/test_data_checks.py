"""Datasets are untrusted input: every on-disk format, damaged or misshaped in generated ways, gives one
HybridPruneError line naming the file before any model is built, and good files still load."""

import pickle

import numpy as np
import pytest
import torch
from scipy.io import savemat

from helpers import (
    IDX_NAMES,
    RNG,
    cifar_entry,
    good_npz,
    idx_bytes,
    npz_bytes,
    svhn_arrays,
    write_cifar,
    write_idx,
    write_svhn,
)
from hybridprune.data.datasets import load_dataset
from hybridprune.data.images import MAX_CLASSES, Dataset, ImageSet, check_dataset
from hybridprune.errors import HybridPruneError


def refused(name, data_dir=None, *, names):
    """load_dataset fails with one line that names `names` (a file, or the folder); returns the message."""
    with pytest.raises(HybridPruneError) as info:
        load_dataset(name, data_dir)
    message = str(info.value)
    assert "\n" not in message
    assert names in message, message
    return message


def cuts(size, header=0):
    """Lengths to cut a file of `size` bytes to: inside and at the edges of its header and of its data."""
    points = {0, 1, 3, header - 1, header, header + 1, size // 2, size - 1}
    return sorted(p for p in points if 0 <= p < size)


# --- IDX (MNIST, Fashion-MNIST) ---------------------------------------------------------------------------


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_good_idx_files_load(tmp_path, name, folder):
    write_idx(tmp_path, folder)
    ds = load_dataset(name, tmp_path)
    assert ds.train.x.shape == (6, 1, 28, 28) and ds.test.y.tolist() == [0, 1, 2]


@pytest.mark.parametrize("key", list(IDX_NAMES))
def test_idx_files_cut_short_anywhere_name_the_file(tmp_path, key):
    _, blobs = write_idx(tmp_path)
    header = 4 + 4 * (3 if key.endswith("images") else 1)
    for cut in cuts(len(blobs[key]), header):
        write_idx(tmp_path, **{key: blobs[key][:cut]})
        refused("mnist", tmp_path, names=IDX_NAMES[key])


@pytest.mark.parametrize(
    "lie",
    [
        lambda a: idx_bytes(a, dims=(len(a) + 1, 28, 28)),  # promises one image more than it holds
        lambda a: idx_bytes(a, dims=(len(a) - 1, 28, 28)),  # and one fewer: trailing bytes
        lambda a: idx_bytes(a, dims=(0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF)),  # must not try to allocate this
        lambda a: idx_bytes(a, dims=(len(a), 784, 1)),  # the right byte count, but 784x1 images
        lambda a: idx_bytes(a, magic=0x0D03),  # float32 data
        lambda a: idx_bytes(a, magic=0x0804),  # 4 dimensions claimed
        lambda a: idx_bytes(a, magic=0x12340803),  # not IDX at all
        lambda a: idx_bytes(a) + b"\0",  # one byte too many
    ],
)
def test_idx_headers_that_lie_name_the_file(tmp_path, lie):
    images = RNG.integers(0, 256, (6, 28, 28), dtype=np.uint8)
    write_idx(tmp_path, train_images=lie(images))
    refused("mnist", tmp_path, names="train-images-idx3-ubyte")


@pytest.mark.parametrize(
    "labels,key",
    [
        (np.array([0, 1, 2, 10, 4, 5], np.uint8), "train_labels"),  # MNIST has 10 classes: 10 is out of range
        (np.array([255, 1, 2], np.uint8), "test_labels"),
        (np.arange(5, dtype=np.uint8), "train_labels"),  # 6 images, 5 labels
        (np.arange(7, dtype=np.uint8) % 10, "train_labels"),  # 6 images, 7 labels
    ],
)
def test_idx_labels_out_of_range_or_miscounted_name_the_labels_file(tmp_path, labels, key):
    write_idx(tmp_path, **{key: idx_bytes(labels)})
    refused("mnist", tmp_path, names=IDX_NAMES[key])


@pytest.mark.parametrize("shape", [(6, 28, 20), (6, 1, 1), (6, 4, 4), (0, 28, 28)])
def test_idx_images_of_a_shape_no_model_takes_name_the_file(tmp_path, shape):
    write_idx(tmp_path, train_images=idx_bytes(np.zeros(shape, np.uint8)))
    refused("mnist", tmp_path, names="train-images-idx3-ubyte")


def test_idx_train_and_test_of_different_sizes_are_refused(tmp_path):
    write_idx(tmp_path, test_images=idx_bytes(np.zeros((3, 32, 32), np.uint8)))
    message = refused("mnist", tmp_path, names=str(tmp_path))
    assert "1x28x28" in message and "1x32x32" in message


# --- CIFAR-10 pickled batches ------------------------------------------------------------------------------


def test_good_cifar_batches_load(tmp_path):
    ds = load_dataset("cifar10", write_cifar(tmp_path).parent)
    assert ds.train.x.shape == (15, 3, 32, 32) and len(ds.test) == 3


def test_cifar_batch_cut_short_anywhere_names_the_file(tmp_path):
    blob = pickle.dumps(cifar_entry(), protocol=2)
    for cut in [*cuts(len(blob), 2), 50, 100, 200, len(blob) - 3072, len(blob) - 10]:
        write_cifar(tmp_path, data_batch_3=blob[:cut])
        refused("cifar10", tmp_path, names="data_batch_3")


@pytest.mark.parametrize(
    "entry",
    [
        cifar_entry(labels=[0, 1, 10]),  # out of range
        cifar_entry(labels=[0, -1, 2]),
        cifar_entry(labels=[0, 1, 1_000_000]),
        cifar_entry(labels=np.array([0, 1, 2**64 - 1], np.uint64)),  # would wrap round to -1 as int64
        cifar_entry(labels=[0.0, 1.5, 2.0]),  # not integers
        cifar_entry(labels=[0, 1]),  # 3 images, 2 labels
        cifar_entry(labels=["cat", "dog", "cat"]),
        cifar_entry(data=np.zeros((3, 3072), np.float32)),
        cifar_entry(data=np.zeros((3, 3000), np.uint8)),  # not 32x32x3
        cifar_entry(data=np.zeros((0, 3072), np.uint8), labels=[]),  # no images
        {"labels": [0, 1, 2]},  # no data
        [1, 2, 3],  # not a dict
    ],
)
def test_cifar_batches_with_bad_contents_name_the_file(tmp_path, entry):
    write_cifar(tmp_path, test_batch=pickle.dumps(entry, protocol=2))
    refused("cifar10", tmp_path, names="test_batch")


# --- SVHN .mat files -----------------------------------------------------------------------------------------


def test_good_svhn_files_load(tmp_path):
    write_svhn(tmp_path)
    ds = load_dataset("svhn", tmp_path)
    assert ds.train.x.shape == (4, 3, 32, 32) and ds.train.y.tolist() == [1, 2, 3, 4]


@pytest.mark.parametrize("compress", [False, True])
def test_svhn_file_cut_short_anywhere_names_the_file(tmp_path, compress):
    savemat(tmp_path / "good.mat", svhn_arrays(), do_compression=compress)
    blob = (tmp_path / "good.mat").read_bytes()
    for cut in [*cuts(len(blob), 128), 200, 300]:
        write_svhn(tmp_path, test=blob[:cut])
        refused("svhn", tmp_path, names="test_32x32.mat")


@pytest.mark.parametrize(
    "mat",
    [
        b"this is not a .mat file at all" * 10,
        svhn_arrays(y=np.array([[1.0], [2.5], [3.0], [4.0]])),  # not whole numbers
        svhn_arrays(y=np.array([[1.0], [np.nan], [3.0], [4.0]])),
        svhn_arrays(y=np.array([[1.0], [np.inf], [3.0], [4.0]])),
        svhn_arrays(y=np.array([[1.0], [1e300], [3.0], [4.0]])),
        svhn_arrays(y=np.array([[1], [11], [3], [4]])),  # SVHN labels run 1..10
        svhn_arrays(y=np.array([[1], [-3], [3], [4]])),
        svhn_arrays(y=np.array([[1], [2], [3]])),  # 4 images, 3 labels
        svhn_arrays(size=20, channels=3) | {"X": np.zeros((32, 20, 3, 4), np.uint8)},  # not square
        svhn_arrays(channels=5),
        {"X": np.zeros((32, 32, 3, 4), np.float64), "y": np.ones((4, 1))},
        {"y": np.ones((4, 1))},  # no images
        {"X": np.zeros((32, 32, 3, 4), np.uint8)},  # no labels
    ],
)
def test_svhn_files_with_bad_contents_name_the_file(tmp_path, mat):
    write_svhn(tmp_path, train=mat)
    refused("svhn", tmp_path, names="train_32x32.mat")


# --- npz ------------------------------------------------------------------------------------------------------


def test_good_npz_files_load(tmp_path):
    (tmp_path / "one.npz").write_bytes(npz_bytes(**good_npz(channels=3)))
    ds = load_dataset(f"npz:{tmp_path / 'one.npz'}")
    assert ds.train.x.shape == (8, 3, 16, 16) and ds.train.num_classes == 3
    (tmp_path / "train.npz").write_bytes(npz_bytes(**good_npz()))
    (tmp_path / "test.npz").write_bytes(npz_bytes(**good_npz(n=2)))
    assert len(load_dataset(f"npz:{tmp_path}").test) == 2


BAD_NPZ = {
    "huge label": good_npz() | {"y": np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 1_000_000])},
    "label past the class limit": good_npz() | {"y": np.full(10, MAX_CLASSES)},
    "uint64 label that wraps": good_npz() | {"y": np.full(10, 2**64 - 1, dtype=np.uint64)},
    "negative label": good_npz() | {"y": np.array([0, 1, -1, 0, 1, 2, 0, 1, 2, 1])},
    "float labels": good_npz() | {"y": np.arange(10) / 2},
    "bool labels": good_npz() | {"y": np.arange(10) % 2 == 0},
    "2-D labels": good_npz() | {"y": np.zeros((10, 1), int)},
    "one class only": good_npz() | {"y": np.zeros(10, int)},
    "non-square images": good_npz() | {"x": np.zeros((10, 32, 40), np.uint8)},
    "1x1 images": good_npz(size=1),
    "7x7 images": good_npz(size=7),
    "5-channel images": good_npz(channels=5),
    "2-channel images": good_npz(channels=2),
    "float images": good_npz() | {"x": np.zeros((10, 16, 16), np.float32)},
    "5-D images": good_npz() | {"x": np.zeros((10, 16, 16, 3, 1), np.uint8)},
    "zero images": {"x": np.zeros((0, 16, 16), np.uint8), "y": np.zeros(0, int)},
    "more labels than images": good_npz() | {"y": np.arange(11) % 3},
    "fewer labels than images": good_npz() | {"y": np.arange(9) % 3},
    "too few to split": good_npz(n=2, classes=2),  # 80/20 of 2 leaves no test image
    "no y": {"x": np.zeros((10, 16, 16), np.uint8)},
    "object labels": None,  # needs pickle: refused with allow_pickle=False
}


@pytest.mark.parametrize("case", list(BAD_NPZ))
def test_npz_files_with_bad_contents_name_the_file(tmp_path, case):
    path = tmp_path / "data.npz"
    if BAD_NPZ[case] is None:
        np.savez(path, x=np.zeros((10, 16, 16), np.uint8), y=np.array([0, "a"] * 5, dtype=object))
    else:
        path.write_bytes(npz_bytes(**BAD_NPZ[case]))
    refused(f"npz:{path}", names=str(path))


def test_npz_cut_short_anywhere_or_not_npz_names_the_file(tmp_path):
    blob, path = npz_bytes(**good_npz()), tmp_path / "data.npz"
    for cut in [*cuts(len(blob), 30), 100, 400, len(blob) - 22]:
        path.write_bytes(blob[:cut])
        refused(f"npz:{path}", names=str(path))
    np.save(path.with_suffix(".npy"), np.zeros(4))  # an .npy given where an .npz belongs
    path.write_bytes(path.with_suffix(".npy").read_bytes())
    refused(f"npz:{path}", names=str(path))


@pytest.mark.parametrize(
    "train,test",
    [
        (good_npz(channels=3), good_npz(n=3)),  # 3 channels against 1
        (good_npz(size=16), good_npz(n=3, size=8)),  # 16x16 against 8x8
        (good_npz(n=1, classes=1) | {"y": np.array([1])}, good_npz(n=3)),  # one train image
        (good_npz() | {"y": np.full(10, 0)}, good_npz(n=3) | {"y": np.full(3, 0)}),  # one class
    ],
)
def test_npz_train_and_test_that_do_not_fit_together_are_refused(tmp_path, train, test):
    (tmp_path / "train.npz").write_bytes(npz_bytes(**train))
    (tmp_path / "test.npz").write_bytes(npz_bytes(**test))
    refused(f"npz:{tmp_path}", names=str(tmp_path))


def test_a_huge_label_in_the_test_file_names_the_test_file(tmp_path):
    (tmp_path / "train.npz").write_bytes(npz_bytes(**good_npz()))
    (tmp_path / "test.npz").write_bytes(npz_bytes(**good_npz(n=3) | {"y": np.array([0, 1, 1_000_000])}))
    message = refused(f"npz:{tmp_path}", names="test.npz")
    assert "1000000" in message and str(MAX_CLASSES) in message


# --- check_dataset on what any loader returns -------------------------------------------------------------------


def images(n=4, c=1, h=8, w=8, dtype=torch.uint8):
    return torch.zeros(n, c, h, w, dtype=dtype)


GOOD = ImageSet(images(), torch.tensor([0, 1, 0, 1]), 2)


@pytest.mark.parametrize(
    "train,test",
    [
        (ImageSet(images(), torch.tensor([0, 1, 0, 2]), 2), GOOD),  # label K
        (ImageSet(images(), torch.tensor([0.0, 1.0, 0.0, 1.0]), 2), GOOD),  # float labels
        (ImageSet(images(), torch.tensor([True, False, True, False]), 2), GOOD),
        (ImageSet(images(), torch.tensor([0, 1, 0]), 2), GOOD),  # a label short
        (ImageSet(images(), torch.tensor([0, 1, 0, 1]), 3), GOOD),  # train and test disagree on K
        (ImageSet(images(), torch.tensor([0, 0, 0, 0]), 1), ImageSet(images(), torch.tensor([0, 0, 0, 0]), 1)),
        (ImageSet(images(), torch.tensor([0, 1, 0, 1]), True), ImageSet(images(), torch.tensor([0, 1, 0, 1]), True)),
        (ImageSet(images(dtype=torch.float32), GOOD.y, 2), GOOD),
        (ImageSet(images(h=8, w=9), GOOD.y, 2), GOOD),
        (ImageSet(torch.zeros(1, 1, 1, 1, dtype=torch.uint8).expand(1, 1, 4097, 4097), GOOD.y[:1], 2), GOOD),
        (ImageSet(images(c=4), GOOD.y, 2), GOOD),
        (ImageSet(images(n=1), GOOD.y[:1], 2), GOOD),  # one train image
        (GOOD, ImageSet(images(h=16, w=16), GOOD.y, 2)),
        (GOOD, ImageSet(images(n=0), GOOD.y[:0], 2)),
        (ImageSet(torch.zeros(4, 8, 8, dtype=torch.uint8), GOOD.y, 2), GOOD),  # no channel dimension
    ],
)
def test_check_dataset_refuses_what_no_model_can_take(train, test):
    with pytest.raises(HybridPruneError, match="^from a loader") as info:
        check_dataset(Dataset("x", train, test, hflip=False), "from a loader")
    assert "\n" not in str(info.value)


EDGES = {  # what is valid, at both ends of every bound
    "smallest": Dataset("x", ImageSet(images(n=2), GOOD.y[:2], 2), ImageSet(images(n=1), GOOD.y[:1], 2), False),
    "largest": Dataset(
        "x",
        ImageSet(
            torch.zeros(1, 1, 1, 1, dtype=torch.uint8).expand(2, 3, 4096, 4096),
            torch.tensor([0, MAX_CLASSES - 1]),
            MAX_CLASSES,
        ),
        ImageSet(torch.zeros(1, 1, 1, 1, dtype=torch.uint8).expand(1, 3, 4096, 4096), torch.tensor([1]), MAX_CLASSES),
        True,
    ),
}


@pytest.mark.parametrize("edge", list(EDGES))
def test_check_dataset_returns_a_good_dataset_unchanged(edge):
    """1 or 3 channels, 8 to 4096 pixels a side, 2 to MAX_CLASSES classes, 2 train and 1 test image: all valid,
    and the very dataset given comes back (no copy, no conversion)."""
    assert check_dataset(EDGES[edge], "x") is EDGES[edge]
