"""Inference conversion: N:M layers to semi-structured sparse kernels (cuSPARSELt/CUTLASS) where they pay.

PyTorch runs 2:4 weights fast only as a sparse GEMM operand (`to_sparse_semi_structured`, CUDA,
fp16/bf16). No library has a sparse conv, so a conv runs as a GEMM (`deploy/gemm.py`): an unpadded 1x1
conv directly on its channels-last pixels, any other conv on unfolded patches. The unfold copies kh*kw
times the input, more than 2:4 can save, so kxk convs stay on cuDNN unless measured faster; linears and
1x1 convs take the sparse kernel. BatchNorm is folded into the weight first: that scales each filter by a
constant, so zeros stay zeros and the pattern survives.

Every layer's decision comes with its reason (`LayerKernel.reason`); with cuSPARSELt, each sparse layer's
algorithm is chosen once by timing (`deploy/sparse_tuning.py`). No mask policy lives here: the input is a
model whose N:M layers hold zeros in the pruned places.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from hybridprune.config import NMPattern
from hybridprune.deploy.gemm import (  # noqa: F401 - conv_padding, kernel_operand, unfold_channels_last: re-exported
    Gemm,
    GemmConv2d,
    GemmLinear,
    conv_padding,
    conv_weight_as_gemm,
    gemm_ineligibility,
    kernel_operand,
    unfold_channels_last,
)
from hybridprune.deploy.sparse_tuning import kernel_ms, layer_input, tune_cusparselt_alg
from hybridprune.errors import HybridPruneError
from hybridprune.pruning.graph import as_example, dependency_graph, example_input, followers, set_module, sole_consumer
from hybridprune.pruning.nm import nm_eligibility, satisfies_nm

KERNEL_CHOICES = ("sparse", "fastest", "dense", "gemm", "sparse-all")
DTYPES_BY_NAME = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of the conv with eval-mode BatchNorm folded in (a BN without affine terms scales by 1
    and shifts by 0)."""
    weight = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
    shift = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
    scale = weight / torch.sqrt(bn.running_var + bn.eps)
    bias = shift - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return (conv.weight * scale.view(-1, 1, 1, 1)).detach(), bias.detach()


def fold_batchnorm_(model: nn.Module, example_inputs: torch.Tensor | None = None) -> nn.Module:
    """Fold every BatchNorm into the conv it directly follows (found by tracing, for any model), in place:
    the conv gets the folded weight and a bias, the BatchNorm becomes an identity (eval semantics). A plain
    module is traced on `example_inputs` (a batch it takes) where it knows no input shape.

    A BatchNorm is folded only when it is the sole consumer of its conv's output.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
        >>> x = torch.rand(2, 3, 8, 8)
        >>> folded = fold_batchnorm_(copy.deepcopy(net), x)
        >>> type(folded[1]).__name__, torch.allclose(folded(x), net(x), atol=1e-6)
        ('Identity', True)
    """
    example = example_input(model, example=example_inputs)
    graph = dependency_graph(model, example)
    pairs = followers(model, example).bn
    for conv_name, bn_name in pairs.items():
        if not sole_consumer(graph, model, conv_name, bn_name) or not model.get_submodule(bn_name).track_running_stats:
            continue  # another layer reads the raw conv output, or the BN normalises with batch statistics
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        weight, bias = fold_bn(conv, bn)
        fused = copy.deepcopy(conv)
        fused.weight = nn.Parameter(weight)
        fused.bias = nn.Parameter(bias)
        set_module(model, conv_name, fused)
        set_module(model, bn_name, nn.Identity())
    return model


# --- hardware and shape eligibility -----------------------------------------------------------


def sparse_backend(device: torch.device) -> str | None:
    """'cusparselt' or 'cutlass' where PyTorch's 2:4 kernels run on `device`, else None (`no_sparse_reason` says
    why). PyTorch's CUTLASS 2:4 kernels are built for compute capability 8.x only: on 9.x (Hopper) and later
    only cuSPARSELt counts.

    Example:
        >>> sparse_backend(torch.device("cpu")) is None
        True
    """
    if no_sparse_reason(device):
        return None
    return "cusparselt" if torch.backends.cusparselt.is_available() else "cutlass"


def no_sparse_reason(device: torch.device) -> str:
    """Why `device` runs no 2:4 kernel ('' where it does).

    Example:
        >>> no_sparse_reason(torch.device("cpu"))
        'cpu: no sparse tensor cores (needs CUDA compute capability >= 8.0)'
    """
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"{device.type}: no sparse tensor cores (needs CUDA compute capability >= 8.0)"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"compute capability {major}.{minor}: no sparse tensor cores (needs >= 8.0)"
    if major > 8 and not torch.backends.cusparselt.is_available():
        return f"compute capability {major}.{minor} without cuSPARSELt: PyTorch's CUTLASS 2:4 kernels target 8.x only"
    return ""


# Minimum (rows, cols) of the sparse operand, and the multiple both must be, per backend and dtype:
# from torch.sparse.semi_structured (_DTYPE_SHAPE_CONSTRAINTS).
SPARSE_MIN_SHAPE = {
    "cusparselt": {torch.float16: (16, 16), torch.bfloat16: (16, 16), torch.int8: (32, 32)},
    "cutlass": {torch.float16: (32, 64), torch.bfloat16: (32, 64), torch.float32: (32, 32), torch.int8: (16, 128)},
}


@dataclass(frozen=True)
class SparseKernel:
    """One 2:4 GEMM kernel as the sparse layers use it: its name, the (rows, cols) multiples its sparse operand
    needs per dtype, `compress` (a dense 2:4 weight to the kernel's weight, once) and `gemm(x2d, weight, bias)`
    (`x2d @ W.T + bias`, given a contiguous row-major x2d). A test swaps in a replay of a kernel here.

    Example:
        >>> k = SparseKernel("dense-replay", {torch.float32: (16, 16)}, compress=lambda w: w)
        >>> sparse_module(nn.Linear(16, 16), k).gemm is F.linear
        True
    """

    name: str
    min_shape: Mapping[torch.dtype, tuple[int, int]]
    compress: Callable[[torch.Tensor], torch.Tensor]
    gemm: Gemm = F.linear

    @property
    def tunable(self) -> bool:
        """Whether the kernel has cuSPARSELt algorithm ids to choose from."""
        return self.name == "cusparselt"


def semi_structured_kernel(backend: str) -> SparseKernel:
    """PyTorch's semi-structured kernel of `backend` ('cusparselt' or 'cutlass'), through `F.linear`."""
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    cls = SparseSemiStructuredTensorCUSPARSELT if backend == "cusparselt" else SparseSemiStructuredTensorCUTLASS
    return SparseKernel(backend, SPARSE_MIN_SHAPE[backend], lambda w: cls.from_dense(w.contiguous()))


def as_kernel(backend: str | SparseKernel | None) -> SparseKernel | None:
    """The kernel a backend name stands for (None stays None)."""
    return semi_structured_kernel(backend) if isinstance(backend, str) else backend


def kernel_ineligibility(
    weight_2d_shape: tuple[int, int], backend: str | SparseKernel | None, dtype: torch.dtype, pattern: NMPattern
) -> str:
    """Why a GEMM weight of this shape cannot run on the sparse kernel ('' when it can)."""
    if backend is None:
        return "no sparse tensor cores on this device"
    kernel = as_kernel(backend)
    name, table = kernel.name, kernel.min_shape
    if (pattern.n, pattern.m) != (2, 4):
        return f"{pattern} is not 2:4, the only pattern sparse tensor cores run"
    if dtype not in table:
        return f"{name} has no {dtype} kernel"
    rows, cols = weight_2d_shape
    min_r, min_c = table[dtype]
    if rows % min_r or cols % min_c:
        return f"weight {rows}x{cols} is not a multiple of {min_r}x{min_c} ({name}, {dtype})"
    return ""


def sparse_module(module: nn.Module, backend: str | SparseKernel | None) -> GemmConv2d | GemmLinear:
    """A copy of a 2:4-pruned conv or linear layer as one GEMM on the sparse kernel (`backend`: a name, or a
    SparseKernel); the layer itself is untouched. A conv becomes a `GemmConv2d` (1x1 without padding: the pixels
    are the operand; others: unfold), a linear a `GemmLinear`; both hand the kernel contiguous operands only.

    Example:
        >>> from hybridprune.pruning.nm import nm_mask
        >>> conv = nn.Conv2d(64, 128, 1).cuda().half()  # doctest: +SKIP
        >>> conv.weight.data.mul_(nm_mask(conv.weight))  # doctest: +SKIP
        >>> sparse = sparse_module(conv, sparse_backend(torch.device("cuda")))  # doctest: +SKIP
    """
    kernel = as_kernel(backend)
    if kernel is None:
        raise HybridPruneError("no sparse kernel on this device: sparse_module needs a GPU with sparse tensor cores")
    layer = GemmConv2d.from_conv(module) if isinstance(module, nn.Conv2d) else GemmLinear.from_linear(module)
    layer.weight = nn.Parameter(kernel.compress(layer.weight.data), requires_grad=False)
    layer.gemm = kernel.gemm
    return layer


# --- conversion -----------------------------------------------------------------------------------


@dataclass
class LayerKernel:
    """Which kernel one layer runs, why, and (when measured) both candidates' times and the cuSPARSELt algorithm."""

    name: str
    kind: str
    gemm_shape: tuple[int, int]
    kernel: str
    reason: str = ""
    dense_ms: float | None = None
    sparse_ms: float | None = None
    input_shape: tuple[int, ...] | None = None
    alg_id: int | None = None


@dataclass
class InferenceModel:
    """The converted model and its per-layer kernel report."""

    model: nn.Module
    layers: list[LayerKernel] = field(default_factory=list)
    backend: str | None = None
    notice: str = ""

    @property
    def sparse_layers(self) -> list[str]:
        return [layer.name for layer in self.layers if layer.kernel == "sparse"]


def to_inference_model(
    model: nn.Module,
    masks: dict[str, torch.Tensor],
    device: torch.device,
    dtype: torch.dtype = torch.float16,
    *,
    choose: str = "sparse",
    pattern: NMPattern = NMPattern(),
    example_inputs: torch.Tensor | None = None,
    example: torch.Tensor | None = None,
    kernel: SparseKernel | None = None,
) -> InferenceModel:
    """Fold BatchNorm and run the N:M layers that pay on the 2:4 sparse kernel; every layer says why (`layers`).

    `choose`: 'sparse' puts linears and unpadded 1x1 convs (direct GEMMs) on the sparse kernel and keeps kxk
    convs dense (their unfold copies kh*kw times the input, more than 2:4 saves); 'fastest' times dense and
    sparse on the layer's real input shape (from `example_inputs`, a batch of the size to time) and keeps the
    faster; 'sparse-all' puts every eligible layer on the sparse kernel (correctness checks); 'dense' converts
    nothing; 'gemm' lowers every N:M conv to a dense GEMM (checks the lowering on any device). With cuSPARSELt
    and `example_inputs`, each sparse layer's algorithm is chosen by timing, its output checked against dense.
    Without sparse tensor cores (CPU, pre-Ampere GPU) the result is the dense folded model, said in `notice`.
    `kernel` replaces the device's sparse kernel (a test's replay). Any nn.Module: a plain one is traced on
    `example_inputs` (`example` is that argument's older name).

    Example:
        >>> from hybridprune.models.sources import build_model
        >>> inf = to_inference_model(build_model("resnet20", width=0.5), {}, torch.device("cpu"), torch.float32)
        >>> inf.sparse_layers, inf.notice.startswith("cpu")
        ([], True)
        >>> import torchvision
        >>> from hybridprune.pruning.nm import nm_prune_
        >>> net, x = torchvision.models.resnet18(num_classes=10).eval(), torch.rand(2, 3, 32, 32)
        >>> masks = nm_prune_(net, example_inputs=x)
        >>> inf = to_inference_model(net, masks, torch.device("cpu"), torch.float32, example_inputs=x)
        >>> torch.allclose(inf.model(x), net(x), atol=1e-4)
        True
    """
    if choose not in KERNEL_CHOICES:
        raise HybridPruneError(f"unknown kernel choice {choose!r}; valid: {', '.join(KERNEL_CHOICES)}")
    check_dtype(dtype, device)
    example = example_inputs if example_inputs is not None else example
    example = None if example is None else as_example(example)
    param = next(model.parameters(), None)  # tracing runs the model as it is: the example in its dtype
    traced = None if example is None or param is None else example.to(dtype=param.dtype)
    why_dense = {e.name: e.reason for e in nm_eligibility(model, pattern, traced)}
    model = fold_batchnorm_(copy.deepcopy(model).eval(), traced).to(device=device, dtype=dtype)
    kernel = kernel or as_kernel(sparse_backend(device))
    shapes = _layer_input_shapes(model, example.to(device, dtype)) if example is not None else {}
    result = InferenceModel(model, backend=None if kernel is None else kernel.name)
    if kernel is None:
        result.notice = f"{no_sparse_reason(device)}, so every layer runs dense; N:M layers give no speedup here"
    for name, module in list(model.named_modules()):
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            info = LayerKernel(name, "conv" if isinstance(module, nn.Conv2d) else "linear", (0, 0), "dense",
                               input_shape=shapes.get(name))  # fmt: skip
            _convert_layer(model, module, info, masks, kernel, dtype, pattern, choose, why_dense)
            result.layers.append(info)
    return result


def _convert_layer(
    model: nn.Module,
    module: nn.Module,
    info: LayerKernel,
    masks: dict[str, torch.Tensor],
    kernel: SparseKernel | None,
    dtype: torch.dtype,
    pattern: NMPattern,
    choose: str,
    why_dense: dict[str, str],
) -> None:
    """Decide `info.name`'s kernel, fill `info` (kernel, reason, times) and swap the layer in `model`."""
    is_conv = isinstance(module, nn.Conv2d)
    info.gemm_shape = tuple(conv_weight_as_gemm(module.weight).shape if is_conv else module.weight.shape)
    if info.name not in masks:
        info.reason = why_dense.get(info.name) or "no N:M mask in this model"
        return
    if not satisfies_nm(module.weight, pattern):
        raise HybridPruneError(f"layer {info.name} has a mask but its weights break {pattern}: not an N:M checkpoint")
    info.reason = gemm_ineligibility(module) if is_conv else ""
    if info.reason:
        return
    if choose == "gemm":
        if is_conv:
            set_module(model, info.name, GemmConv2d.from_conv(module))
            info.kernel = "gemm"
        return
    info.reason = kernel_ineligibility(info.gemm_shape, kernel, dtype, pattern) or _policy_reason(module, choose)
    if info.reason:
        return
    sparse = _sparse_if_faster(module, info, kernel, choose)
    if sparse is not None:
        set_module(model, info.name, sparse)
        info.kernel = "sparse"


def _policy_reason(module: nn.Module, choose: str) -> str:
    """Why `choose` keeps an eligible layer dense without measuring it ('' when it may go sparse)."""
    if choose == "dense":
        return "dense chosen"
    if choose == "sparse" and isinstance(module, nn.Conv2d) and not _direct_gemm(module):
        kh, kw = module.kernel_size
        return f"{kh}x{kw} conv: unfold copies its input {kh * kw} times, more than 2:4 saves (fastest measures it)"
    return ""


def _direct_gemm(conv: nn.Conv2d) -> bool:
    """An unpadded 1x1 conv: its input pixels are its GEMM operand, no unfold."""
    return tuple(conv.kernel_size) == (1, 1) and not any(conv_padding(conv))


def _sparse_if_faster(
    module: nn.Module, info: LayerKernel, kernel: SparseKernel, choose: str
) -> GemmConv2d | GemmLinear | None:
    """The sparse layer, its algorithm chosen where it can be and measured against dense under 'fastest'; None
    (with `info.reason`) where it should stay dense."""
    sparse = sparse_module(module, kernel)
    shape, device = info.input_shape, next(module.parameters()).device
    why = "direct GEMM" if choose == "sparse" else "every eligible layer sparse" if choose == "sparse-all" else ""
    if shape is None or (choose != "fastest" and not (kernel.tunable and device.type == "cuda")):
        info.reason = why or "fastest: no input shape to time, sparse by default"
        return sparse
    x = layer_input(module, shape)
    if kernel.tunable and device.type == "cuda":
        info.sparse_ms, note = tune_cusparselt_alg(sparse, module, x)
        info.alg_id = sparse.weight.alg_id_cusparselt
        if info.sparse_ms is None:
            info.reason = note
            return None
    else:
        info.sparse_ms, note = kernel_ms(sparse, x)
    why = "; ".join(filter(None, [why, note]))
    if choose == "fastest":
        info.dense_ms, dense_note = kernel_ms(module, x)
        if info.sparse_ms >= info.dense_ms:
            info.reason = f"dense measured faster ({info.dense_ms:.3f} vs {info.sparse_ms:.3f} ms)"
            return None
        why = f"sparse measured faster ({info.sparse_ms:.3f} vs {info.dense_ms:.3f} ms); {why}"
    info.reason = why
    return sparse


@torch.no_grad()
def _layer_input_shapes(model: nn.Module, example: torch.Tensor) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [
        m.register_forward_hook(lambda mod, inp, out, n=n: shapes.__setitem__(n, tuple(inp[0].shape)))
        for n, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    try:
        model(example)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def check_dtype(dtype: torch.dtype, device: torch.device) -> None:
    """Half precision needs a GPU here: CPU half matmuls are emulated and would misreport speed."""
    if device.type == "cpu" and dtype != torch.float32:
        raise HybridPruneError(f"dtype {dtype} is not run on the CPU by the benchmark; use float32 there")
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise HybridPruneError("this GPU cannot run bfloat16; use float16")
