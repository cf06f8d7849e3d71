"""Convs and linears as one 2-D GEMM `y = x2d @ W.T + b`, the only form a 2:4 sparse kernel runs.

A conv becomes a GEMM on channels-last activations. A 1x1 conv without padding needs no lowering: its
operand is the input itself, `[N*Ho*Wo, C]`, strides taken by slicing. Any other conv is unfolded into
patches `[N*Ho*Wo, kh*kw*C]` (kh*kw times the input: the reason kxk convs rarely gain from 2:4) times the
weight permuted to `[out, kh, kw, in]`, whose `(kh, kw, in)` order keeps each N:M group (consecutive input
channels at one kernel position, as `nm.py` builds them) in consecutive GEMM columns.

Every operand goes through `kernel_operand`: PyTorch's cuSPARSELt wrapper reads a dense operand right only when
it is contiguous (or its exact transpose); other strides are read as if rows were packed (a wrong answer, not an
error). The GEMM itself is the module's `gemm` attribute, `F.linear` by default, so a sparse weight, a dense
one, or a test's replay of a kernel all run through the same forward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from hybridprune.errors import HybridPruneError

Gemm = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]  # (x2d, weight, bias) -> y2d


def kernel_operand(x2d: torch.Tensor) -> torch.Tensor:
    """`x2d` as a sparse GEMM must receive it: contiguous (row-major, rows exactly `k` apart) and 16-byte aligned
    (cuSPARSELt's descriptor alignment); a copy only where it is not already.

    Example:
        >>> x = torch.randn(4, 8, 2, 2)[:, :, ::2, ::2].permute(0, 2, 3, 1).reshape(4, 8)  # a strided view
        >>> x.is_contiguous(), kernel_operand(x).is_contiguous(), torch.equal(kernel_operand(x), x)
        (False, True, True)
    """
    if x2d.is_contiguous() and x2d.data_ptr() % 16 == 0:
        return x2d
    return x2d.clone(memory_format=torch.contiguous_format)


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
    """Patches `[N * Ho * Wo, kh * kw * C]` of an `[N, C, H, W]` input, in `(kh, kw, C)` order (possibly a view:
    pass it through `kernel_operand` before a sparse kernel).

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


def pointwise_channels_last(x: torch.Tensor, stride: tuple[int, int]) -> tuple[torch.Tensor, int, int]:
    """The operand `[N * Ho * Wo, C]` of an unpadded 1x1 conv: the (strided) pixels themselves, no unfold. A view
    of a channels-last input at stride 1; a copy otherwise.

    Example:
        >>> x = torch.arange(16.0).view(1, 1, 4, 4)
        >>> rows, ho, wo = pointwise_channels_last(x, (2, 2))
        >>> rows.flatten().tolist(), ho, wo
        ([0.0, 2.0, 8.0, 10.0], 2, 2)
    """
    sh, sw = stride
    x = x[:, :, ::sh, ::sw] if (sh, sw) != (1, 1) else x
    n, c, ho, wo = x.shape
    return x.permute(0, 2, 3, 1).reshape(n * ho * wo, c), ho, wo


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
    """Why a conv cannot run as one GEMM ('' when it can)."""
    if conv.groups != 1:
        return f"grouped conv (groups={conv.groups}) is not one GEMM"
    if conv.padding_mode not in ("zeros", "reflect", "replicate", "circular"):
        return f"padding mode {conv.padding_mode!r}"
    return ""


class GemmConv2d(nn.Module):
    """A conv computed as one GEMM `gemm(operand, weight, bias)` with a `[out, kh*kw*in]` weight (dense, or a
    semi-structured sparse tensor): unpadded 1x1 convs on the pixels directly, others through unfold.

    Honours stride, padding (numbers, 'same', 'valid'), padding mode and dilation. Output is `[N, out, Ho, Wo]`
    in channels-last memory, so the next GemmConv2d reads its pixels without a layout copy.

    Example:
        >>> conv = nn.Conv2d(8, 4, 1, stride=2).double()
        >>> x = torch.randn(2, 8, 5, 5, dtype=torch.double)
        >>> torch.allclose(GemmConv2d.from_conv(conv)(x), conv(x))
        True
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
        gemm: Gemm = F.linear,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight_2d, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.kernel, self.stride, self.padding = kernel, stride, padding
        self.dilation, self.padding_mode = dilation, padding_mode
        self.gemm = gemm

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        gemm: Gemm = F.linear,
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
            gemm,
        )

    @property
    def pointwise(self) -> bool:
        """Whether the conv runs on its input pixels directly (1x1, no padding): no unfold."""
        return tuple(self.kernel) == (1, 1) and not any(self.padding)

    def operand(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """The GEMM operand `[N*Ho*Wo, kh*kw*C]` for input `x` (contiguous, as `kernel_operand` makes it)."""
        if self.pointwise:
            rows, ho, wo = pointwise_channels_last(x, self.stride)
        else:
            rows, ho, wo = unfold_channels_last(
                x, self.kernel, self.stride, self.padding, self.dilation, self.padding_mode
            )
        return kernel_operand(rows), ho, wo

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, ho, wo = self.operand(x)
        out = self.gemm(rows, self.weight, self.bias)
        return out.reshape(x.shape[0], ho, wo, -1).permute(0, 3, 1, 2)


class GemmLinear(nn.Module):
    """An `nn.Linear` computed as one 2-D GEMM `gemm(operand, weight, bias)` on a contiguous `[rows, in]` operand,
    whatever the input's leading dimensions and strides (a sparse weight must never see a strided view).

    Example:
        >>> lin = nn.Linear(8, 4).double()
        >>> x = torch.randn(3, 5, 16, dtype=torch.double)[..., ::2]  # strided input
        >>> torch.allclose(GemmLinear.from_linear(lin)(x), lin(x))
        True
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, gemm: Gemm = F.linear) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.gemm = gemm

    @classmethod
    def from_linear(cls, linear: nn.Linear, gemm: Gemm = F.linear) -> GemmLinear:
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(linear.weight.detach(), bias, gemm)

    def operand(self, x: torch.Tensor) -> torch.Tensor:
        """The GEMM operand `[rows, in]` for input `x` (contiguous)."""
        return kernel_operand(x.reshape(-1, x.shape[-1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.gemm(self.operand(x), self.weight, self.bias)
        return out.reshape(*x.shape[:-1], out.shape[-1])
