"""Class-folder datasets streamed from disk: real PNG and JPEG files written by the tests, one truncated."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from hybridprune.cli import main
from hybridprune.data.batching import batches, channel_stats
from hybridprune.data.datasets import load_dataset
from hybridprune.errors import HybridPruneError

CLASSES = ("cat", "dog", "fox")


def write_folder(root, classes=CLASSES, per_class=(6, 2), size=(20, 24), truncated=True, seed=0):
    """train/<class>/ and val/<class>/ of real PNG and JPEG images whose brightness tells the class apart."""
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "val"), per_class, strict=True):
        if n == 0:
            continue
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = (rng.random((*size, 3)) * 60 + label * 90).astype(np.uint8)
                Image.fromarray(pixels).save(folder / (f"{i}.png" if i % 2 else f"{i}.jpg"))
    if truncated:
        bad = root / "train" / classes[1] / "truncated.jpg"
        Image.fromarray(np.zeros((*size, 3), np.uint8)).save(bad)
        bad.write_bytes(bad.read_bytes()[:100])
    return root


def test_the_loader_maps_classes_in_sorted_order_and_streams_cropped_images(tmp_path):
    ds = load_dataset(f"folder:{write_folder(tmp_path / 'd')}", image_size=16, workers=1)
    assert ds.train.classes == CLASSES and ds.train.num_classes == 3 and ds.note == ""
    assert len(ds.train) == 3 * 6 + 1 and len(ds.test) == 3 * 2
    xs, ys = zip(*batches(ds.train, 5, shuffle=True, seed=1, augment=True, hflip=True), strict=True)
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.shape == (18, 3, 16, 16) and 0 <= x.min() and x.max() <= 1  # the truncated file is left out
    assert sorted(y.tolist()) == [0] * 6 + [1] * 6 + [2] * 6
    assert ds.train.skipped.count == 1 and ds.train.skipped.paths == {str(tmp_path / "d/train/dog/truncated.jpg")}
    ex, ey = next(batches(ds.test, 6))
    assert ex.shape == (6, 3, 16, 16) and ey.tolist() == [0, 0, 1, 1, 2, 2]
    assert ex[ey == 2].mean() > ex[ey == 0].mean()  # the classes' brightness survived decoding


def test_strict_makes_an_unreadable_file_an_error_naming_it(tmp_path):
    ds = load_dataset(f"folder:{write_folder(tmp_path / 'd')}", image_size=16, workers=1, strict=True)
    with pytest.raises(HybridPruneError, match=r"truncated\.jpg cannot be read") as err:
        list(batches(ds.train, 4))
    assert "\n" not in str(err.value)


def test_without_val_a_seeded_tenth_of_train_is_held_out_and_said(tmp_path):
    root = write_folder(tmp_path / "d", per_class=(10, 0), truncated=False)
    a, b = (load_dataset(f"folder:{root}", image_size=8, workers=1) for _ in range(2))
    assert len(a.test) == 3 and len(a.train) == 27 and a.test.samples == b.test.samples
    assert not set(a.test.samples) & set(a.train.samples)
    assert "no val/ folder" in a.note and "3 of its 30" in a.note


@pytest.mark.parametrize(
    "layout,message",
    [
        ("missing", "not found"),
        ("no_train", "has no train/ folder"),
        ("one_class", "needs at least 2 class subfolders"),
        ("empty_class", "holds no images"),
        ("val_other_classes", "val has classes"),
    ],
)
def test_bad_folder_layouts_are_one_line(tmp_path, layout, message):
    root = tmp_path / "d"
    if layout == "no_train":
        (root / "val" / "a").mkdir(parents=True)
    elif layout == "one_class":
        write_folder(root, classes=("only",), truncated=False)
    elif layout == "empty_class":
        write_folder(root, truncated=False)
        (root / "train" / "empty").mkdir()
    elif layout == "val_other_classes":
        write_folder(root, truncated=False)
        (root / "val" / "cat").rename(root / "val" / "cow")
    with pytest.raises(HybridPruneError, match=message) as err:
        load_dataset(f"folder:{root}", image_size=8, workers=1)
    assert "\n" not in str(err.value)


def test_normalisation_statistics_come_from_a_sample_of_the_folder(tmp_path):
    ds = load_dataset(f"folder:{write_folder(tmp_path / 'd', truncated=False)}", image_size=8, workers=1)
    mean, std = channel_stats(ds.train)
    assert len(mean) == 3 and all(0.2 < m < 0.8 for m in mean) and all(s > 0.05 for s in std)


def test_a_checkpoint_remembers_its_classes_and_refuses_others(tmp_path, capsys):
    first = write_folder(tmp_path / "a", truncated=False)
    other = write_folder(tmp_path / "b", classes=("ant", "bee", "cow"), truncated=False)
    ckpt = tmp_path / "m.safetensors"
    common = ["--image-size", "16", "--workers", "1", "--no-progress"]
    train = ["train", "--dataset", f"folder:{first}", "--model", "resnet20", "--width", "0.5", "--epochs", "1"]
    assert main([*train, "--batch-size", "8", *common, "--out", str(ckpt)]) == 0
    assert main(["evaluate", str(ckpt), "--dataset", f"folder:{first}", *common]) == 0
    assert main(["evaluate", str(ckpt), "--dataset", f"folder:{other}", *common]) == 2
    err = capsys.readouterr().err.strip()
    assert "trained on other classes" in err and len(err.splitlines()) == 1


def test_run_on_a_folder_counts_the_skipped_file(tmp_path):
    root = write_folder(tmp_path / "d")
    out = tmp_path / "run"
    args = ["run", "--dataset", f"folder:{root}", "--image-size", "16", "--workers", "1", "--model", "resnet20"]
    args += ["--width", "0.5", "--epochs", "1", "--finetune-epochs", "1", "--round-to", "4", "--metric", "l1"]
    assert main([*args, "--batch-size", "8", "--calib-batches", "1", "--no-progress", "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["dataset"]["unreadable_files_skipped"] == 1


MEMORY_PROBE = """
import sys
from hybridprune.data.batching import batches
from hybridprune.data.datasets import load_dataset

def rss_mib():  # resident memory now (not the peak, which torch's import sets)
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) // 1024

ds = load_dataset("folder:" + sys.argv[1], image_size=160, workers=1)
next(batches(ds.train, 16))  # warm up the loader machinery
before = rss_mib()
for epoch in range(2):
    for x, y in batches(ds.train, 16, shuffle=True, seed=epoch):
        x.sum()  # touch every page, as training does (batches arrive in shared memory from the workers)
print(rss_mib() - before)
"""


def test_memory_does_not_grow_with_the_number_of_files(tmp_path):
    small = write_folder(tmp_path / "small", per_class=(10, 1), size=(160, 160), truncated=False)
    large = write_folder(tmp_path / "large", per_class=(100, 1), size=(160, 160), truncated=False)
    growth = [
        int(
            subprocess.run(
                [sys.executable, "-c", MEMORY_PROBE, str(root)], capture_output=True, text=True, check=True
            ).stdout
        )  # fmt: skip
        for root in (small, large)
    ]
    # two epochs over 270 more images of 3x160x160 float32 (300 KB each): 160 MB more if the loader kept them
    assert growth[1] - growth[0] < 40, growth
