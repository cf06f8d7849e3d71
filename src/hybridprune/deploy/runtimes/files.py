"""What an ONNX file given by a user is, checked before any runtime reads it: an ONNX model at all, with its
external data (if any) inside its own folder, one image input, a logits output, and whether it is quantized.

ONNX stores the path of each external-data file in the model itself, so a file from elsewhere could make a
runtime read any file on the machine (`/etc/shadow`, `../../secrets`). The model is parsed without its external
data, every tensor's `location` is checked, and the external files are never opened here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hybridprune.errors import HybridPruneError, first_line

QUANTIZED_OPS = frozenset(
    {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger"}
)


@dataclass(frozen=True)
class OnnxInfo:
    """An ONNX file's interface: its image input (name and shape, a str for a symbolic dim), its first output's
    shape, whether it holds quantized operators, and the external-data files it names (inside its folder)."""

    path: Path
    input_name: str
    input_shape: tuple[int | str, ...]
    output_shape: tuple[int | str, ...]
    quantized: bool
    external: tuple[str, ...]


def inspect_onnx(path: str | Path) -> OnnxInfo:
    """Parse `path` without its external data and check it (one line when it is not a model a runtime may read).

    Example:
        >>> inspect_onnx("/nonexistent.onnx")
        Traceback (most recent call last):
        ...
        hybridprune.errors.HybridPruneError: /nonexistent.onnx does not exist; give an ONNX file
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise HybridPruneError(f"{path} {'is not a file' if path.exists() else 'does not exist'}; give an ONNX file")
    try:
        import onnx
    except ImportError:
        raise HybridPruneError('reading ONNX files needs onnx: pip install -e ".[export]"') from None
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf's errors for a file that is not a model
        raise HybridPruneError(f"{path} is not an ONNX model ({first_line(e)})") from None
    external = tuple(sorted({_checked_location(path, t) for t in _tensors(model.graph) if _is_external(t)}))
    graph = model.graph
    weights = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in weights]
    if len(inputs) != 1 or not graph.output:
        raise HybridPruneError(f"{path} has {len(inputs)} inputs and {len(graph.output)} outputs; a classifier "
                               "has one image input and a logits output")  # fmt: skip
    return OnnxInfo(
        path=path,
        input_name=inputs[0].name,
        input_shape=_shape(inputs[0]),
        output_shape=_shape(graph.output[0]),
        quantized=any(n.op_type in QUANTIZED_OPS for n in graph.node),
        external=external,
    )


def check_classifier(info: OnnxInfo, channels: int, size: int, classes: int, data: str) -> None:
    """The file takes `channels`x`size`x`size` images and returns at least `classes` logits per image, or
    one line saying what it takes instead.

    Example:
        >>> info = OnnxInfo(Path("m.onnx"), "images", ("batch", 3, 32, 32), ("batch", 10), False, ())
        >>> check_classifier(info, 1, 32, 10, "digits")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        hybridprune.errors.HybridPruneError: m.onnx takes images of shape batch x 3 x 32 x 32 ...; digits has 1x32x32...
    """
    image, out = info.input_shape, info.output_shape
    fits_image = len(image) == 4 and list(image[1:]) == [channels, size, size]
    fits_out = len(out) == 2 and (isinstance(out[1], str) or out[1] >= classes)
    if not (fits_image and fits_out):
        raise HybridPruneError(
            f"{info.path} takes images of shape {' x '.join(map(str, image))} and returns "
            f"{' x '.join(map(str, out))}; {data} has {channels}x{size}x{size} images and {classes} classes"
        )


def _shape(value: Any) -> tuple[int | str, ...]:
    dims = value.type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims)


def _is_external(tensor: Any) -> bool:
    return tensor.HasField("data_location") and tensor.data_location == 1  # TensorProto.EXTERNAL


def _checked_location(model_path: Path, tensor: Any) -> str:
    """The external-data file a tensor names, refused unless it is a relative path inside the model's folder."""
    entries = {e.key: e.value for e in tensor.external_data}
    location = entries.get("location", "")
    folder = os.path.realpath(model_path.parent)
    target = os.path.realpath(os.path.join(folder, location)) if location else ""
    if not location or os.path.isabs(location) or os.path.commonpath([folder, target]) != folder or target == folder:
        raise HybridPruneError(
            f"{model_path}: tensor {tensor.name!r} names external data at {location!r}, outside the model's folder; "
            "refused (external data must be a relative path inside the folder that holds the .onnx file)"
        )
    return location


def _tensors(graph: Any) -> Iterator[Any]:
    """Every tensor a graph holds: initializers, sparse initializers, and those in node attributes and subgraphs."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _tensors(attribute.g)
            for sub in attribute.graphs:
                yield from _tensors(sub)
