"""ONNX export of any hybridprune model, and its check against PyTorch with ONNX Runtime.

The exported graph takes images in [0, 1] (`images`, `[batch, C, H, W]`, batch size dynamic) and returns
`logits`: the input normalisation is inside, BatchNorm is folded into the convs it follows (`sparse.py`), and
the weights keep their names, so each N:M layer's weight can be found in the file and its 2:4 pattern
counted. TensorRT builds sparse kernels from such a file (`trtexec --onnx=model.onnx --sparsity=enable`).

`onnx` and `onnxruntime` are an optional extra: `pip install -e ".[export]"`.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hybridprune.config import ONNX_OPSET, NMPattern
from hybridprune.deploy.sparse import fold_batchnorm_
from hybridprune.errors import HybridPruneError, first_line
from hybridprune.models.sources import input_shape, model_label
from hybridprune.outputs import atomic_target
from hybridprune.pruning.graph import as_example

OPSET = ONNX_OPSET


def _onnx():
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise HybridPruneError('ONNX export needs onnx and onnxruntime: pip install -e ".[export]"') from None
    return onnx, onnxruntime


def export_onnx(
    model: nn.Module,
    path: str | Path,
    opset: int = OPSET,
    *,
    example_inputs: torch.Tensor | None = None,
    record: bool = False,
) -> Path:
    """Write the model (BatchNorm folded, normalisation inside, dynamic batch) to `path` atomically (`record`:
    listed in its folder's manifest, for a run folder). Any nn.Module: a plain one is traced on `example_inputs`
    (a batch it takes; its shape, not its values, is used) unless filter pruning recorded its input shape.

    Example:
        >>> import tempfile, torchvision
        >>> from hybridprune.models.sources import build_model
        >>> p = export_onnx(build_model("resnet20", width=0.5), Path(tempfile.mkdtemp()) / "m.onnx")
        >>> p.stat().st_size > 10_000
        True
        >>> net = torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.25)
        >>> p = export_onnx(net, Path(tempfile.mkdtemp()) / "m.onnx", example_inputs=torch.zeros(1, 3, 32, 32))
        >>> p.stat().st_size > 10_000
        True
    """
    _onnx()
    example = torch.zeros(1, *input_shape(model, None if example_inputs is None else as_example(example_inputs)))
    folded = fold_batchnorm_(copy.deepcopy(model).cpu().eval(), example).eval()
    with atomic_target(path, record=record) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on tracing; the check below is what counts
        try:
            torch.onnx.export(
                folded,
                (example,),
                str(tmp),
                input_names=["images"],
                output_names=["logits"],
                dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                opset_version=opset,
                dynamo=False,  # the TorchScript exporter: fast and complete for CNNs, no onnxscript needed
            )
        except Exception as e:  # noqa: BLE001 - an operator ONNX lacks, in any of the user's layers
            raise HybridPruneError(f"ONNX export of {model_label(model)} failed ({first_line(e)})") from None
    return Path(path)


def onnxruntime_session(  # noqa: ANN201 - onnxruntime's type
    model: nn.Module, threads: int | None = None, example_inputs: torch.Tensor | None = None
):
    """An ONNX Runtime CPU session of the model's exported graph (through a temporary file), using `threads`
    intra-op threads (default: as many as torch uses, so the two compare on equal terms)."""
    import tempfile

    _, ort = _onnx()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    # no busy-waiting between runs: spinning threads would steal the cores from the PyTorch variants timed
    # in the same round-robin
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    with tempfile.TemporaryDirectory() as folder:
        path = export_onnx(model, Path(folder) / "model.onnx", example_inputs=example_inputs)
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@dataclass
class OnnxCheck:
    """How the exported file compares with PyTorch, and whether the N:M pattern survived in it."""

    images: int
    max_abs_diff: float
    max_abs_logit: float
    top1_agreement: float
    nm_layers: int
    nm_layers_found: int
    broken_groups: int

    @property
    def matches(self) -> bool:
        """ONNX Runtime's logits equal PyTorch's up to float32 reordering (1e-3 of the largest logit)."""
        return self.max_abs_diff <= 1e-3 * max(1.0, self.max_abs_logit)

    @property
    def ok(self) -> bool:
        return self.matches and self.broken_groups == 0 and self.nm_layers_found == self.nm_layers


def check_onnx(
    path: str | Path, model: nn.Module, masks: dict[str, torch.Tensor], images: torch.Tensor, pattern: NMPattern
) -> OnnxCheck:
    """Run the file with ONNX Runtime on `images` against the PyTorch model, and count the groups of M
    weights in each N:M layer's exported weight that hold more than N nonzeros (must be 0)."""
    onnx, ort = _onnx()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        reference = model.cpu().eval()(images.cpu()).numpy()
    got = session.run(None, {"images": images.cpu().numpy().astype(np.float32)})[0]
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    found, broken = 0, 0
    for name in masks:
        weight = weights.get(f"{name}.weight")
        if weight is None:
            continue
        found += 1
        broken += count_broken_groups(weight, pattern)
    return OnnxCheck(
        images=len(images),
        max_abs_diff=float(np.abs(got - reference).max()),
        max_abs_logit=float(np.abs(reference).max()),
        top1_agreement=float((got.argmax(1) == reference.argmax(1)).mean()),
        nm_layers=len(masks),
        nm_layers_found=found,
        broken_groups=broken,
    )


def count_broken_groups(weight: np.ndarray, pattern: NMPattern) -> int:
    """Groups of M consecutive input-channel weights (per output and kernel position) with more than N nonzeros;
    a weight whose input channels do not split into groups of M counts every row as broken.

    Example:
        >>> count_broken_groups(np.array([[1.0, 0, 0, 1, 1, 1, 1, 0]]), NMPattern(2, 4))
        1
    """
    w = np.moveaxis(weight, 1, -1) if weight.ndim == 4 else weight  # conv: [out, kh, kw, in]
    if w.shape[-1] % pattern.m:
        return int(np.prod(w.shape[:-1]))  # cannot even be grouped: every row counts as broken
    groups = (w.reshape(-1, pattern.m) != 0).sum(axis=1)
    return int((groups > pattern.n).sum())
