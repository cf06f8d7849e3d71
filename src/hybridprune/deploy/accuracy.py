"""Accuracy where the model is deployed: top-1 of a runtime session (a checkpoint converted to a runtime and
precision, or an ONNX file) on a test split read through the same loader as training evaluation."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from hybridprune.data.batching import batches
from hybridprune.data.images import ImageSet, StreamedSplit
from hybridprune.deploy.export import export_onnx
from hybridprune.deploy.runtimes import get_runtime, load_onnx
from hybridprune.deploy.runtimes.base import Session
from hybridprune.deploy.runtimes.files import check_classifier
from hybridprune.errors import HybridPruneError

Split = ImageSet | StreamedSplit


@dataclass
class SessionAccuracy:
    """Top-1 (percent) on `images` test images, and the logits (kept when asked, to compare two sessions)."""

    top1: float
    images: int
    logits: torch.Tensor | None = None


def evaluate_session(
    session: Session,
    split: Split,
    batch_size: int = 256,
    keep_logits: bool = False,
    progress: bool = True,
    desc: str = "evaluate",
) -> SessionAccuracy:
    """Top-1 of `session` on every image of `split` (images in [0, 1], as training's evaluation reads them).

    Example:
        >>> from hybridprune.deploy.runtimes import get_runtime
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
        >>> split = ImageSet(torch.zeros(6, 1, 2, 2, dtype=torch.uint8), torch.zeros(6, dtype=torch.long), 2)
        >>> session = get_runtime("torch").session_of(net, torch.zeros(1, 1, 2, 2), "fp32")
        >>> evaluate_session(session, split, 4, progress=False).images
        6
    """
    correct, seen, kept = 0, 0, []
    bar = tqdm(total=len(split), desc=desc, unit="img", disable=None if progress else True, leave=False)
    for x, y in batches(split, batch_size):
        logits = session.run(x)
        correct += int((logits.argmax(dim=1) == y).sum())
        seen += len(y)
        if keep_logits:
            kept.append(logits)
        bar.update(len(y))
    bar.close()
    if not seen:
        raise HybridPruneError("the test split is empty; nothing to evaluate")
    return SessionAccuracy(100.0 * correct / seen, seen, torch.cat(kept) if keep_logits else None)


def onnx_accuracy(
    path: str | Path,
    split: Split,
    runtime: str,
    precision: str,
    data_name: str = "the dataset",
    threads: int | None = None,
    batch_size: int = 256,
    progress: bool = True,
) -> SessionAccuracy:
    """Top-1 of an ONNX file run by `runtime` at `precision`, after the file is checked (its external data
    inside its folder, an image classifier of the split's shape)."""
    session, info = load_onnx(path, runtime, precision, threads)
    check_classifier(info, split.channels, split.image_size, split.num_classes, data_name)
    return evaluate_session(session, split, batch_size, progress=progress, desc=f"{runtime} {precision}")


def module_accuracy(
    model: nn.Module,
    split: Split,
    runtime: str,
    precision: str,
    threads: int | None = None,
    batch_size: int = 256,
    progress: bool = True,
) -> SessionAccuracy:
    """Top-1 of a model converted to `runtime` at `precision` (exported to ONNX for the ONNX runtimes; int8
    needs a calibrated QDQ file: `hybridprune quantize`)."""
    example = torch.zeros(1, split.channels, split.image_size, split.image_size)
    rt = get_runtime(runtime)
    rt.check(precision, "cpu")
    if precision == "int8":
        raise HybridPruneError("int8 runs a calibrated QDQ file: make one with `hybridprune quantize`, then "
                               "evaluate that file")  # fmt: skip
    desc = f"{runtime} {precision}"
    if not rt.reads_onnx:
        session = rt.session_of(model.cpu().eval(), example, precision, threads)
        return evaluate_session(session, split, batch_size, progress=progress, desc=desc)
    with tempfile.TemporaryDirectory() as folder:  # the deployed graph: BatchNorm folded, any batch size
        path = export_onnx(model, Path(folder) / "model.onnx", example_inputs=example)
        session = rt.load(path, precision, threads)
        return evaluate_session(session, split, batch_size, progress=progress, desc=desc)
