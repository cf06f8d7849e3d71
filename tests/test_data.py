import os
import pickle
import struct

import numpy as np
import pytest
import torch
from scipy.io import savemat

from hybridprune.data.batching import batches, channel_stats, random_shift
from hybridprune.data.datasets import load_dataset
from hybridprune.data.images import ImageSet
from hybridprune.errors import HybridPruneError

RNG = np.random.default_rng(0)


def _idx(path, array, magic):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape) + array.tobytes())


def _write_mnist(root, folder, n=(12, 6)):
    raw = root / folder / "raw"
    for prefix, count in zip(("train", "t10k"), n, strict=True):
        _idx(raw / f"{prefix}-images-idx3-ubyte", RNG.integers(0, 256, (count, 28, 28), dtype=np.uint8), 0x803)
        _idx(raw / f"{prefix}-labels-idx1-ubyte", RNG.integers(0, 10, count, dtype=np.uint8), 0x801)


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_idx_datasets_load_from_torchvision_layout(tmp_path, name, folder):
    _write_mnist(tmp_path, folder)
    ds = load_dataset(name, tmp_path)
    assert ds.train.x.shape == (12, 1, 28, 28) and ds.train.x.dtype == torch.uint8
    assert ds.test.x.shape == (6, 1, 28, 28) and ds.test.y.dtype == torch.long
    images = np.fromfile(tmp_path / folder / "raw" / "train-images-idx3-ubyte", dtype=np.uint8, offset=16)
    assert torch.equal(ds.train.x.flatten(), torch.from_numpy(images))


def test_svhn_loads_mat_files_and_maps_label_10_to_0(tmp_path):
    for split, n in (("train", 8), ("test", 4)):
        x = RNG.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = np.array([10] + list(range(1, n))).reshape(n, 1)  # SVHN labels digits 1..10, 10 for '0'
        savemat(tmp_path / f"{split}_32x32.mat", {"X": x, "y": y})
    ds = load_dataset("svhn", tmp_path)
    assert ds.train.x.shape == (8, 3, 32, 32)
    assert ds.train.y.tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    mat_x = __import__("scipy.io", fromlist=["loadmat"]).loadmat(tmp_path / "train_32x32.mat")["X"]
    assert torch.equal(ds.train.x[2], torch.from_numpy(mat_x[:, :, :, 2].transpose(2, 0, 1).copy()))


def _write_cifar(root, per_batch=4):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {
            "batch_label": name,
            "labels": list(RNG.integers(0, 10, per_batch)),
            "data": RNG.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            "filenames": ["x.png"] * per_batch,
        }
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
    return folder


def test_cifar10_loads_the_pickled_batches(tmp_path):
    folder = _write_cifar(tmp_path)
    ds = load_dataset("cifar10", tmp_path)
    assert ds.train.x.shape == (20, 3, 32, 32) and ds.test.x.shape == (4, 3, 32, 32) and ds.hflip
    with open(folder / "test_batch", "rb") as f:
        entry = pickle.load(f)
    assert torch.equal(ds.test.x.reshape(4, -1), torch.from_numpy(entry["data"]))


def test_cifar10_refuses_pickles_that_would_run_code(tmp_path):
    folder = _write_cifar(tmp_path)

    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({"data": Exploit(), "labels": [0]}, f)
    with pytest.raises(HybridPruneError, match="not a CIFAR-10 batch file"):
        load_dataset("cifar10", tmp_path)


def test_npz_folder_and_single_file(tmp_path):
    x = RNG.integers(0, 256, (20, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "train.npz", x=x, y=np.arange(20) % 4)
    np.savez(tmp_path / "test.npz", x=x[:5], y=np.arange(5) % 4)
    ds = load_dataset(f"npz:{tmp_path}")
    assert ds.train.x.shape == (20, 3, 16, 16) and ds.train.num_classes == 4
    assert torch.equal(ds.train.x[3].permute(1, 2, 0), torch.from_numpy(x[3]))
    np.savez(tmp_path / "gray.npz", x=x[..., 0], y=np.arange(20) % 4)
    single = load_dataset(f"npz:{tmp_path / 'gray.npz'}")
    assert len(single.train) == 16 and len(single.test) == 4 and single.train.channels == 1


def test_bad_npz_files_fail_clearly(tmp_path):
    np.savez(tmp_path / "floats.npz", x=np.zeros((4, 8, 8), dtype=np.float32), y=np.zeros(4, dtype=int))
    with pytest.raises(HybridPruneError, match="uint8"):
        load_dataset(f"npz:{tmp_path / 'floats.npz'}")
    np.savez(tmp_path / "nolabels.npz", x=np.zeros((4, 8, 8), dtype=np.uint8))
    with pytest.raises(HybridPruneError, match="'x' and 'y'"):
        load_dataset(f"npz:{tmp_path / 'nolabels.npz'}")
    with pytest.raises(HybridPruneError, match="not found"):
        load_dataset(f"npz:{tmp_path / 'absent.npz'}")


@pytest.mark.parametrize(
    "name,expected",
    [
        ("mnist", "train-images-idx3-ubyte"),
        ("svhn", "train_32x32.mat"),
        ("cifar10", "data_batch_1"),
        ("fashion-mnist", "t10k-labels-idx1-ubyte"),
    ],
)
def test_missing_dataset_names_the_files_and_the_folder(tmp_path, name, expected):
    with pytest.raises(HybridPruneError, match=f"{expected}.*{tmp_path}.*--download"):
        load_dataset(name, tmp_path)


def test_unknown_dataset_lists_the_valid_ones():
    with pytest.raises(HybridPruneError, match="valid names: digits, mnist"):
        load_dataset("imagenet")


def test_digits_is_real_resized_and_split_the_same_way_every_time():
    a, b = load_dataset("digits"), load_dataset("digits")
    assert a.train.x.shape == (1438, 1, 32, 32) and len(a.test) == 359
    assert torch.equal(a.test.y, b.test.y) and torch.equal(a.train.x, b.train.x)
    assert set(a.train.y.tolist()) == set(range(10))
    assert a.train.x.max() == 255  # full uint8 range after rescaling 0..16


def test_batches_cover_every_image_once_and_scale_to_unit_range():
    data = ImageSet(
        torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 4, 4).clone(), torch.arange(10), 10
    )
    seen = torch.cat([y for _, y in batches(data, 3, shuffle=True, seed=1)])
    assert sorted(seen.tolist()) == list(range(10))
    x, y = next(iter(batches(data, 10)))
    assert torch.allclose(x[:, 0, 0, 0] * 255, y.float())


def test_random_shift_translates_each_image():
    x = torch.zeros(6, 1, 8, 8)
    x[:, :, 4, 4] = 1.0
    out = random_shift(x, max_shift=2, generator=torch.Generator().manual_seed(0))
    assert (out.sum(dim=(1, 2, 3)) == 1).all()  # the bright pixel moved (by at most 2) and nothing was smeared
    rows, cols = out[:, 0].nonzero()[:, 1], out[:, 0].nonzero()[:, 2]
    assert ((rows - 4).abs() <= 2).all() and ((cols - 4).abs() <= 2).all()


def test_channel_stats_match_numpy():
    data = ImageSet(torch.randint(0, 256, (10, 3, 4, 4), dtype=torch.uint8), torch.zeros(10, dtype=torch.long), 1)
    mean, _ = channel_stats(data)
    assert np.allclose(mean, data.x.float().div(255).mean(dim=(0, 2, 3)).numpy(), atol=1e-6)


def test_download_failure_is_one_clear_error(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    class Offline:
        def __init__(self, root, download, **kwargs):
            raise OSError("network unreachable")

    monkeypatch.setattr(tvd, "MNIST", Offline)
    with pytest.raises(HybridPruneError, match="downloading MNIST into .* failed: network unreachable"):
        load_dataset("mnist", tmp_path, download=True)


def test_download_writes_the_torchvision_layout_that_is_then_read(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    calls = []

    class FakeMNIST:  # stands in for the network: writes the files torchvision would
        def __init__(self, root, download, train):
            calls.append((root, download, train))
            if len(calls) == 1:
                _write_mnist(tmp_path, "MNIST")

    monkeypatch.setattr(tvd, "MNIST", FakeMNIST)
    ds = load_dataset("mnist", tmp_path, download=True)
    assert calls == [(str(tmp_path), True, True), (str(tmp_path), True, False)]
    assert len(ds.train) == 12 and len(ds.test) == 6
