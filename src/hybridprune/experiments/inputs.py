"""What a job starts from: the configured data (seeded subsets), the configured model, and a dense checkpoint,
with the checks that a checkpoint fits the data it is given (image shape, classes, their order).

Nothing here trains or writes; `job` and the grid's runner build on it, and so do the `train` and `evaluate`
commands.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hybridprune.config import DataConfig, RunConfig
from hybridprune.data.batching import channel_stats
from hybridprune.data.datasets import load_dataset
from hybridprune.data.images import Dataset
from hybridprune.errors import HybridPruneError
from hybridprune.models.sources import Classifier, build_model
from hybridprune.pruning.checkpoint import load_checkpoint, load_weights_

Log = Callable[[str], None]


def prepare_data(cfg: RunConfig) -> Dataset:
    """Load the configured dataset and take its seeded subsets."""
    return prepare_data_config(cfg.data, cfg.seed)


def prepare_data_config(d: DataConfig, seed: int) -> Dataset:
    """The dataset of `d`, cut to its train and test sizes by `seed` (the test subset by `seed + 1`)."""
    ds = load_dataset(d.dataset, d.data_dir, d.download, image_size=d.image_size, workers=d.workers, strict=d.strict)
    train, test = ds.train.subset(d.train_size, seed), ds.test.subset(d.test_size, seed + 1)
    return Dataset(ds.name, train, test, ds.hflip, ds.note)


def data_meta(data: Dataset) -> dict[str, Any]:
    """What a checkpoint records of its data: the dataset's name or spec (`cifar10`, `npz:PATH`; never a file's
    contents), and the class names, in label order, when the data has them."""
    classes = getattr(data.train, "classes", None)
    return {"dataset": data.name, **({"classes": list(classes)} if classes else {})}


def recorded_dataset(meta: dict[str, Any], path: str | Path) -> str | None:
    """The dataset a checkpoint's header records, checked as a `--dataset` value is; None where it records none
    (checkpoints written before it was recorded).

    Example:
        >>> recorded_dataset({"dataset": "cifar10"}, "m.safetensors"), recorded_dataset({}, "m.safetensors")
        ('cifar10', None)
    """
    name = meta.get("dataset")
    if name is None:
        return None
    try:
        return DataConfig(dataset=name).dataset
    except HybridPruneError as e:
        raise HybridPruneError(f"{path}: header field 'dataset' is not a dataset ({e}); pass --dataset") from None


def check_classes(meta: dict[str, Any], data: Dataset, path: str | Path) -> None:
    """A checkpoint that records class names only takes data with those classes, in that order."""
    recorded, given = meta.get("classes"), getattr(data.train, "classes", None)
    if recorded is not None and given is not None and list(recorded) != list(given):
        diff = sorted(set(recorded) ^ set(given))[:3] or ["(same names, another order)"]
        raise HybridPruneError(f"{path} was trained on other classes than {data.name} has (e.g. {', '.join(diff)})")


def check_fits(model: nn.Module, data: Dataset, trained_on: str | None = None) -> None:
    """A checkpoint's model must take the dataset's images and predict at least its classes; the refusal says
    which `--dataset` to pass (`trained_on`: the dataset the checkpoint records, where it records one)."""
    c, h, w = model.input_shape
    want = (data.train.channels, data.train.image_size)
    if (c, h) != want or model.num_classes < data.train.num_classes:
        hint = f"pass --dataset {trained_on}" if isinstance(trained_on, str) else "pass the --dataset it was trained on"
        raise HybridPruneError(
            f"model takes {c}x{h}x{w} images and {model.num_classes} classes; "
            f"{data.name} has {want[0]}x{want[1]}x{want[1]} and {data.train.num_classes}: {hint}"
        )


def new_model(cfg: RunConfig, data: Dataset, log: Log = print) -> Classifier:
    """The configured model, shaped for the dataset, normalising with its training statistics; with
    `cfg.model.weights`, the user's trained weights loaded into it."""
    mean, std = channel_stats(data.train)
    torch.manual_seed(cfg.seed)
    model = build_model(
        cfg.model.name,
        in_channels=data.train.channels,
        num_classes=data.train.num_classes,
        image_size=data.train.image_size,
        width=cfg.model.width,
        mean=mean,
        std=std,
    )
    if model.net_channels != data.train.channels:
        log(
            f"model: {model.source.label} takes {model.net_channels}-channel images; each {data.name} image's "
            f"{data.train.channels} channel(s) are repeated to fill them"
        )
    if cfg.model.weights:
        load_weights_(model, cfg.model.weights)
        log(f"model: weights from {cfg.model.weights}")
    return model


def load_dense_checkpoint(path: str | Path, data: Dataset, user_model: str | None = None) -> nn.Module:
    """A dense checkpoint that fits the dataset; anything else is bad input."""
    model, masks, meta = load_checkpoint(path, user_model)
    if masks:
        raise HybridPruneError(f"{path} is already N:M-pruned; pruning starts from a dense checkpoint")
    check_fits(model, data, meta.get("dataset"))
    check_classes(meta, data, path)
    return model
