"""Inference conversion: N:M layers to semi-structured sparse kernels (cuSPARSELt/CUTLASS), dense elsewhere.

PyTorch runs 2:4 weights fast only as a sparse GEMM operand (`to_sparse_semi_structured`, CUDA,
fp16/bf16). No library has a sparse conv, so a conv runs as a GEMM: the channels-last input is
unfolded into patches `[N*Ho*Wo, kh*kw*in]` and multiplied by the weight permuted to
`[out, kh, kw, in]` and flattened. That `(kh, kw, in)` order puts each N:M group (consecutive
input channels at one kernel position, as `nm.py` builds them) into consecutive GEMM columns,
which is what the sparse tensor core requires. BatchNorm is folded into the weight first: that
scales each filter by a constant, so zeros stay zeros and the pattern survives.

No mask policy lives here: the input is a model whose N:M layers hold zeros in the pruned places.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from hybridprune.config import NMPattern
from hybridprune.deploy.timing import median_ms
from hybridprune.errors import HybridPruneError
from hybridprune.pruning.graph import as_example, dependency_graph, example_input, followers, set_module, sole_consumer
from hybridprune.pruning.nm import nm_eligibility, satisfies_nm

KERNEL_CHOICES = ("sparse", "fastest", "dense", "gemm")
DTYPES_BY_NAME = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def conv_weight_as_gemm(weight: torch.Tensor) -> torch.Tensor:
    """`[out, in, kh, kw]` -> `[out, kh * kw * in]`: the GEMM operand whose rows keep N:M groups contiguous."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1).contiguous()


def unfold_channels_last(
    x: torch.Tensor,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int, int, int],
    dilation: tuple[int, int] = (1, 1),
    padding_mode: str = "zeros",
) -> tuple[torch.Tensor, int, int]:
    """Patches `[N * Ho * Wo, kh * kw * C]` of an `[N, C, H, W]` input, in `(kh, kw, C)` order.

    `padding` is (left, right, top, bottom), as F.pad takes it; `padding_mode` as nn.Conv2d names it.
    """
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    if any(padding):
        mode = "constant" if padding_mode == "zeros" else padding_mode
        x = F.pad(x, padding, mode=mode)
    span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    patches = x.permute(0, 2, 3, 1).unfold(1, span_h, sh).unfold(2, span_w, sw)  # [N, Ho, Wo, C, span_h, span_w]
    patches = patches[..., ::dh, ::dw]  # dilation: every dh-th row and dw-th column of the span
    n, ho, wo = patches.shape[:3]
    return patches.permute(0, 1, 2, 4, 5, 3).reshape(n * ho * wo, -1), ho, wo


def conv_padding(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """The conv's padding as (left, right, top, bottom), resolving 'same' and 'valid'."""
    if conv.padding == "valid":
        return (0, 0, 0, 0)
    if conv.padding == "same":
        pads = []
        for d, k in zip(reversed(conv.dilation), reversed(conv.kernel_size), strict=True):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return tuple(pads)
    ph, pw = conv.padding
    return (pw, pw, ph, ph)


def gemm_ineligibility(conv: nn.Conv2d) -> str:
    """Why a conv cannot run as unfold + GEMM ('' when it can)."""
    if conv.groups != 1:
        return f"grouped conv (groups={conv.groups}) is not one GEMM"
    if conv.padding_mode not in ("zeros", "reflect", "replicate", "circular"):
        return f"padding mode {conv.padding_mode!r}"
    return ""


class GemmConv2d(nn.Module):
    """A conv computed as unfold + GEMM with a `[out, kh*kw*in]` weight, dense or semi-structured sparse.

    Honours stride, padding (numbers, 'same', 'valid'), padding mode and dilation. Output is
    `[N, out, Ho, Wo]` in channels-last memory, so the next GemmConv2d unfolds without a layout copy.
    """

    def __init__(
        self,
        weight_2d: torch.Tensor,
        bias: torch.Tensor | None,
        kernel: tuple[int, int],
        stride: tuple[int, int],
        padding: tuple[int, int, int, int],
        dilation: tuple[int, int] = (1, 1),
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight_2d, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.kernel, self.stride, self.padding = kernel, stride, padding
        self.dilation, self.padding_mode = dilation, padding_mode

    @classmethod
    def from_conv(
        cls, conv: nn.Conv2d, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None
    ) -> GemmConv2d:
        reason = gemm_ineligibility(conv)
        if reason:
            raise HybridPruneError(f"GEMM conv cannot take {conv}: {reason}")
        w = conv.weight if weight is None else weight
        b = conv.bias if bias is None else bias
        return cls(
            conv_weight_as_gemm(w.detach()),
            None if b is None else b.detach(),
            conv.kernel_size,
            conv.stride,
            conv_padding(conv),
            conv.dilation,
            conv.padding_mode,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches, ho, wo = unfold_channels_last(
            x, self.kernel, self.stride, self.padding, self.dilation, self.padding_mode
        )
        out = F.linear(patches, self.weight, self.bias)
        return out.reshape(x.shape[0], ho, wo, -1).permute(0, 3, 1, 2)


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
    """'cusparselt' or 'cutlass' where 2:4 kernels run (CUDA, compute capability >= 8.0), else None."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    if torch.cuda.get_device_capability(device) < (8, 0):
        return None
    return "cusparselt" if torch.backends.cusparselt.is_available() else "cutlass"


# Minimum (rows, cols) of the sparse operand, and the multiple both must be, per backend and dtype:
# from torch.sparse.semi_structured (_DTYPE_SHAPE_CONSTRAINTS).
SPARSE_MIN_SHAPE = {
    "cusparselt": {torch.float16: (16, 16), torch.bfloat16: (16, 16), torch.int8: (32, 32)},
    "cutlass": {torch.float16: (32, 64), torch.bfloat16: (32, 64), torch.float32: (32, 32), torch.int8: (16, 128)},
}


def kernel_ineligibility(
    weight_2d_shape: tuple[int, int], backend: str | None, dtype: torch.dtype, pattern: NMPattern
) -> str:
    """Why a GEMM weight of this shape cannot run on the sparse kernel ('' when it can)."""
    if backend is None:
        return "no sparse tensor cores on this device"
    if (pattern.n, pattern.m) != (2, 4):
        return f"{pattern} is not 2:4, the only pattern sparse tensor cores run"
    if dtype not in SPARSE_MIN_SHAPE[backend]:
        return f"{backend} has no {dtype} kernel"
    rows, cols = weight_2d_shape
    min_r, min_c = SPARSE_MIN_SHAPE[backend][dtype]
    if rows % min_r or cols % min_c:
        return f"weight {rows}x{cols} is not a multiple of {min_r}x{min_c} ({backend}, {dtype})"
    return ""


# --- conversion -----------------------------------------------------------------------------------


@dataclass
class LayerKernel:
    """Which kernel one layer runs, why, and (when measured) both candidates' times."""

    name: str
    kind: str
    gemm_shape: tuple[int, int]
    kernel: str
    reason: str = ""
    dense_ms: float | None = None
    sparse_ms: float | None = None
    input_shape: tuple[int, ...] | None = None


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
) -> InferenceModel:
    """Fold BatchNorm and run every eligible N:M layer on the semi-structured sparse kernel.

    `choose`: 'sparse' uses the sparse kernel wherever eligible; 'fastest' times dense and sparse on
    the layer's real input shape (from `example_inputs`, a batch of the size to time) and keeps the faster;
    'dense' converts nothing; 'gemm' lowers every N:M conv to unfold + a dense GEMM (checks the lowering on any
    device). Without sparse tensor cores (CPU, pre-Ampere GPU) the result is the dense folded model, said once
    in `notice`. Any nn.Module: a plain one is traced on `example_inputs` (`example` is that argument's
    older name).

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
    why_dense = {e.name: e.reason for e in nm_eligibility(model, pattern, example)}
    model = fold_batchnorm_(copy.deepcopy(model).eval(), example).to(device=device, dtype=dtype)
    backend = sparse_backend(device)
    shapes = _layer_input_shapes(model, example.to(device, dtype)) if example is not None else {}
    result = InferenceModel(model, backend=backend)
    if backend is None:
        result.notice = (
            f"{device.type}: no sparse tensor cores (needs CUDA compute capability >= 8.0), so every "
            "layer runs dense; N:M layers give no speedup here"
        )
    for name, module in list(model.named_modules()):
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            result.layers.append(
                _convert_layer(model, name, module, masks, backend, dtype, pattern, choose, shapes.get(name), why_dense)
            )
    return result


def _convert_layer(
    model: nn.Module,
    name: str,
    module: nn.Module,
    masks: dict[str, torch.Tensor],
    backend: str | None,
    dtype: torch.dtype,
    pattern: NMPattern,
    choose: str,
    input_shape: tuple[int, ...] | None,
    why_dense: dict[str, str],
) -> LayerKernel:
    is_conv = isinstance(module, nn.Conv2d)
    w2d = conv_weight_as_gemm(module.weight) if is_conv else module.weight
    info = LayerKernel(name, "conv" if is_conv else "linear", tuple(w2d.shape), "dense", input_shape=input_shape)
    if name not in masks:
        info.reason = why_dense.get(name) or "no N:M mask in this model"
        return info
    if not satisfies_nm(module.weight, pattern):
        raise HybridPruneError(f"layer {name} has a mask but its weights break {pattern}: not an N:M checkpoint")
    if is_conv and gemm_ineligibility(module):
        info.reason = gemm_ineligibility(module)
        return info
    if choose == "gemm":
        if is_conv:
            set_module(model, name, GemmConv2d.from_conv(module))
            info.kernel = "gemm"
        return info
    info.reason = kernel_ineligibility(tuple(w2d.shape), backend, dtype, pattern)
    if info.reason or choose == "dense":
        info.reason = info.reason or "dense chosen"
        return info
    sparse = sparse_module(module, backend)
    if choose == "fastest" and input_shape is not None:
        info.dense_ms, info.sparse_ms = _time_layer(module, input_shape), _time_layer(sparse, input_shape)
        if info.sparse_ms >= info.dense_ms:
            info.reason = f"dense measured faster ({info.dense_ms:.3f} vs {info.sparse_ms:.3f} ms)"
            return info
    set_module(model, name, sparse)
    info.kernel = "sparse"
    return info


def _to_sparse(weight: torch.Tensor, backend: str | None) -> torch.Tensor:
    """Compress a 2:4 weight for the chosen backend (explicit class: no global backend switch)."""
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    cls = SparseSemiStructuredTensorCUSPARSELT if backend == "cusparselt" else SparseSemiStructuredTensorCUTLASS
    return cls.from_dense(weight.contiguous())


def sparse_module(module: nn.Module, backend: str | None) -> nn.Module:
    """A copy of a 2:4-pruned conv or linear layer whose weight is a semi-structured sparse tensor of `backend`
    (a conv becomes a `GemmConv2d`); the layer itself is untouched. Needs a GPU with sparse tensor cores.

    Example:
        >>> from hybridprune.pruning.nm import nm_mask
        >>> conv = nn.Conv2d(64, 128, 3, padding=1).cuda().half()  # doctest: +SKIP
        >>> conv.weight.data.mul_(nm_mask(conv.weight))  # doctest: +SKIP
        >>> sparse = sparse_module(conv, sparse_backend(torch.device("cuda")))  # doctest: +SKIP
    """
    if isinstance(module, nn.Conv2d):
        gemm = GemmConv2d.from_conv(module)
        gemm.weight = nn.Parameter(_to_sparse(gemm.weight.data, backend), requires_grad=False)
        return gemm
    linear = copy.deepcopy(module)
    linear.weight = nn.Parameter(_to_sparse(linear.weight.data, backend), requires_grad=False)
    return linear


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


@torch.no_grad()
def _time_layer(module: nn.Module, input_shape: tuple[int, ...], repeats: int = 20) -> float:
    param = next(module.parameters())
    x = torch.randn(input_shape, device=param.device, dtype=param.dtype)
    return median_ms(lambda: module(x), repeats=repeats, device=param.device)


def check_dtype(dtype: torch.dtype, device: torch.device) -> None:
    """Half precision needs a GPU here: CPU half matmuls are emulated and would misreport speed."""
    if device.type == "cpu" and dtype != torch.float32:
        raise HybridPruneError(f"dtype {dtype} is not run on the CPU by the benchmark; use float32 there")
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise HybridPruneError("this GPU cannot run bfloat16; use float16")
