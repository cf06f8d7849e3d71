"""The operand rule of PyTorch's cuSPARSELt path, replayed on the CPU, so layout bugs show without a GPU.

What reaches cuSPARSELt when a sparse layer calls `F.linear(x2d, W, b)` with W a
`SparseSemiStructuredTensorCUSPARSELT` (torch 2.11-2.14, torch/sparse/_semi_structured_ops.py and
semi_structured.py): `semi_sparse_linear` views x as `[m, k]`; `semi_sparse_addmm` calls
`cusparselt_mm(dense=x2d, ...)`, which pads x2d with `F.pad` (a fresh contiguous copy) only when m or k is
not a multiple of the dense minimum (8 for fp16/bf16, 16 for int8) and then calls
`torch._cslt_sparse_mm(W.packed, x2d.t(), bias, transpose_result=True)`.

`_cslt_sparse_mm_impl` (aten/src/ATen/native/sparse/cuda/cuSPARSELtOps.cpp) describes its dense operand
B `[k, n]` by `B.is_contiguous()` alone:
- contiguous: a row-major k x n matrix with leading dimension n, i.e. element (i, j) at `data_ptr + i*n + j`;
- anything else: the transpose (CUSPARSE_OPERATION_TRANSPOSE) of a row-major n x k matrix with leading
  dimension k, i.e. element (i, j) at `data_ptr + j*k + i`: the strides of `B.t().contiguous().t()`, whatever
  B's real strides are. A wrong answer, never an error.
With B = x2d.t(): a contiguous x2d (strides (k, 1)) gives B strides (1, k) and is read right; an x2d whose
transpose is contiguous is read right too; any other x2d (a row stride other than k: a sliced or strided view,
a broadcast) is read as if its rows were k elements apart, i.e. other rows' (other samples', other pixels')
values. `cslt_read` below replays that reading, and `replay_cslt_linear` is a fake kernel built on it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DENSE_MIN = (8, 8)  # (rows, cols) multiples below which cusparselt_mm pads x2d (fp16/bf16; int8: 16, 16)


def cslt_read(dense_b: torch.Tensor) -> torch.Tensor:
    """The `[k, n]` matrix that `_cslt_sparse_mm` reads from `dense_b`: its storage at strides (n, 1) when
    `dense_b.is_contiguous()`, else at strides (1, k), from the same first element. A read past the end of the
    storage gives NaN (on the GPU: whatever lies there).

    Example:
        >>> a = torch.arange(6.0).view(2, 3)
        >>> torch.equal(cslt_read(a), a), torch.equal(cslt_read(a.t()), a.t())  # contiguous, or its transpose
        (True, True)
        >>> cslt_read(torch.arange(8.0).view(2, 4)[:, :2]).tolist()  # strides (4, 1): read at (1, 2)
        [[0.0, 2.0], [1.0, 3.0]]
    """
    k, n = dense_b.shape
    row, col = (n, 1) if dense_b.is_contiguous() else (1, k)
    flat = torch.empty(0, dtype=dense_b.dtype).set_(dense_b.untyped_storage())
    flat = torch.cat([flat, flat.new_full((1,), float("nan"))])  # the last slot stands for out-of-bounds reads
    index = dense_b.storage_offset() + torch.arange(k)[:, None] * row + torch.arange(n)[None, :] * col
    return flat[index.clamp(max=flat.numel() - 1)]


def replay_cslt_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, W, bias)` as PyTorch computes it with W on cuSPARSELt (module docstring), `weight` being W's
    dense 2:4 values: pad only where the wrapper pads, then multiply by what cuSPARSELt reads.

    Example:
        >>> x, w = torch.randn(8, 16), torch.randn(4, 16)
        >>> column_major = x.t().contiguous().t()
        >>> [torch.allclose(replay_cslt_linear(a, w), x @ w.t()) for a in (x, column_major)]
        [True, True]
        >>> big = torch.randn(8, 32)
        >>> torch.allclose(replay_cslt_linear(big[:, :16], w), big[:, :16] @ w.t())  # row stride 32, read as 16
        False
    """
    k = x.shape[-1]
    x2d = x.view(-1, k)  # semi_sparse_linear views, it does not reshape
    m = x2d.shape[0]
    pad_m, pad_k = (-m) % DENSE_MIN[0], (-k) % DENSE_MIN[1]
    if pad_m or pad_k:
        x2d = F.pad(x2d, (0, pad_k, 0, pad_m))
    read = cslt_read(x2d.t())[:k, :m]  # [k, m], as the kernel sees it
    out = (weight @ read).t()  # transpose_result=True: [m, out]
    out = out if bias is None else out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


# --- the sparse layers, run through the replay -------------------------------------------------------------

import copy  # noqa: E402 - the replay above is self-contained; the tests below use the library

import pytest  # noqa: E402
import torchvision  # noqa: E402
from torch import nn  # noqa: E402

from hybridprune.deploy.sparse import (  # noqa: E402
    SparseKernel,
    no_sparse_reason,
    sparse_backend,
    sparse_module,
    to_inference_model,  # noqa: E402
)
from hybridprune.pruning.nm import nm_mask, nm_prune_  # noqa: E402

REPLAY_SHAPES = {torch.float32: (16, 16), torch.float64: (16, 16)}  # cuSPARSELt's fp16 multiples, in CPU dtypes


@pytest.fixture
def operands() -> list[torch.Tensor]:
    return []


@pytest.fixture
def replay(operands) -> SparseKernel:
    """cuSPARSELt replayed on the CPU: the weight stays dense, every operand is recorded and read by the rule."""

    def gemm(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        operands.append(x2d)
        return replay_cslt_linear(x2d, weight, bias)

    return SparseKernel("cusparselt-replay", REPLAY_SHAPES, compress=lambda w: w.contiguous(), gemm=gemm)


def _masked(layer: nn.Module) -> nn.Module:
    with torch.no_grad():
        layer.weight.mul_(nm_mask(layer.weight))
    return layer


def test_the_replay_can_fail():
    # the rule must tell a strided operand from a contiguous one, or every test below passes vacuously
    torch.manual_seed(0)
    w, x = torch.randn(16, 32, dtype=torch.double), torch.randn(8, 64, dtype=torch.double)
    strided = x[:, ::2]
    assert not torch.allclose(replay_cslt_linear(strided, w), strided @ w.t())
    torch.testing.assert_close(replay_cslt_linear(strided.contiguous(), w), strided @ w.t())


@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize(
    "kernel,stride,padding,size",
    [
        (1, 2, 0, (2, 2)),  # one output pixel (ResNet-18's layer4.0.downsample at 32x32)
        (1, 2, 0, (2, 8)),  # one output row
        (1, 2, 0, (8, 1)),  # one output column
        (1, 2, 0, (7, 9)),
        (1, 1, 0, (1, 1)),
        (1, 1, 0, (4, 4)),
        (1, 1, 1, (3, 3)),  # padded 1x1: unfold path
        (3, 1, 1, (1, 1)),
        (3, 1, 1, (4, 4)),
        (3, 2, 1, (2, 2)),  # one output pixel
        (3, 2, 1, (2, 6)),  # one output row
        (3, 2, 0, (3, 3)),
    ],
)
def test_sparse_conv_hands_the_kernel_operands_it_reads_right(
    replay, operands, kernel, stride, padding, size, batch, channels_last
):
    torch.manual_seed(0)
    conv = _masked(nn.Conv2d(32, 16, kernel, stride, padding).double())
    x = torch.randn(batch, 32, *size, dtype=torch.double)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    out = sparse_module(conv, replay)(x)
    torch.testing.assert_close(out, conv(x))
    assert operands and all(op.is_contiguous() for op in operands)


@pytest.mark.parametrize(
    "make",
    [
        lambda t: t,
        lambda t: t.t().contiguous().t(),  # column-major
        lambda t: torch.cat([t, t], dim=1)[:, ::2],  # row stride 2k
        lambda t: torch.cat([t, t], dim=1)[:, 32:],  # row stride 2k, offset
        lambda t: t[:1].expand(8, 32),  # broadcast rows (stride 0)
        lambda t: t.view(2, 4, 32).transpose(0, 1),  # 3-D, permuted
        lambda t: t[:1],  # one row
    ],
    ids=["contiguous", "column-major", "strided", "offset", "broadcast", "3d-permuted", "one-row"],
)
def test_sparse_linear_hands_the_kernel_operands_it_reads_right(replay, operands, make):
    torch.manual_seed(0)
    lin = _masked(nn.Linear(32, 16).double())
    x = make(torch.randn(8, 32, dtype=torch.double))
    torch.testing.assert_close(sparse_module(lin, replay)(x), lin(x))
    assert all(op.is_contiguous() for op in operands)


MODELS = ["zoo:plain_net", "zoo:residual_net", "zoo:concat_net", "zoo:depthwise_net", "resnet20",
          "torchvision:resnet18", "torchvision:mobilenet_v2"]  # fmt: skip


def model_with_unit_logits(name: str, size: int, seed: int = 0) -> nn.Module:
    """`name` at `size`x`size` with random BatchNorm statistics and its last linear scaled so its largest logit
    is 1: every dtype holds it (MobileNet-V2's raw logits, ~1e-10, underflow to zero in fp16) and a wrong read
    shows as a large relative error."""
    from hybridprune.models.sources import build_model
    from zoo import randomize_batchnorm_

    torch.manual_seed(seed)
    model = randomize_batchnorm_(build_model(name, in_channels=3, num_classes=10, image_size=size).eval(), seed)
    x = torch.rand(8, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        scale = model(x).abs().max()
        head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        head.weight.div_(scale)
        head.bias.div_(scale)
    return model


@pytest.mark.parametrize("name", MODELS)
def test_whole_models_on_the_replayed_kernel_match_the_dense_model(replay, name):
    size = 32 if name.startswith(("torchvision", "resnet")) else 16
    model = model_with_unit_logits(name, size)
    x = torch.rand(8, 3, size, size)  # rows a multiple of 8: the wrapper pads (copies) other row counts
    masks = nm_prune_(model, example_inputs=x)
    inf = to_inference_model(model, masks, torch.device("cpu"), torch.float32, choose="sparse-all", kernel=replay,
                             example_inputs=x)  # fmt: skip
    assert inf.sparse_layers, [(k.name, k.reason) for k in inf.layers]
    with torch.no_grad():
        out, ref = inf.model(x), model(x)
    assert ref.abs().max() > 0.1  # logits of a scale where a wrong read shows
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_resnet18_downsample_runs_sparse_on_one_pixel(replay, operands):
    # the layer that gave 0.7 wrong logits on an H200: 1x1 stride 2 on a 2x2 input, one output pixel per sample
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.rand(8, 3, 32, 32)
    masks = nm_prune_(model, example_inputs=x)
    inf = to_inference_model(model, masks, torch.device("cpu"), torch.float32, kernel=replay, example_inputs=x)
    layer = next(k for k in inf.layers if k.name == "layer4.0.downsample.0")
    assert layer.kernel == "sparse" and layer.input_shape == (8, 256, 2, 2)
    assert inf.model.get_submodule("layer4.0.downsample.0").pointwise


def test_sparse_choice_keeps_kxk_convs_dense_and_says_why(replay):
    model = torchvision.models.resnet18(num_classes=16).eval()
    x = torch.rand(2, 3, 32, 32)
    masks = nm_prune_(model, example_inputs=x)
    inf = to_inference_model(model, masks, torch.device("cpu"), torch.float32, kernel=replay, example_inputs=x)
    kinds = {k.name: (k.kernel, k.reason) for k in inf.layers}
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n in masks}
    assert all(kinds[n][0] == "sparse" for n, m in convs.items() if m.kernel_size == (1, 1))
    assert all(kinds[n][0] == "dense" and "unfold" in kinds[n][1] for n, m in convs.items() if m.kernel_size == (3, 3))
    assert kinds["fc"][0] == "sparse"  # 512 -> 16: a linear, eligible
    assert all(reason for _, reason in kinds.values())  # every layer says why, sparse or dense


def test_fastest_measures_and_reports_both_times(replay):
    model = torchvision.models.resnet18(num_classes=16).eval()
    x = torch.rand(2, 3, 32, 32)
    masks = nm_prune_(model, example_inputs=x)
    inf = to_inference_model(model, masks, torch.device("cpu"), torch.float32, choose="fastest", kernel=replay,
                             example_inputs=x)  # fmt: skip
    timed = [k for k in inf.layers if k.name in masks]
    assert timed and all(k.dense_ms and k.sparse_ms and "measured faster" in k.reason for k in timed)
    assert all((k.kernel == "sparse") == (k.sparse_ms < k.dense_ms) for k in timed)
    with torch.no_grad():
        torch.testing.assert_close(inf.model(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "capability,cusparselt,expect",
    [((7, 5), True, None), ((8, 0), True, "cusparselt"), ((8, 6), False, "cutlass"), ((9, 0), True, "cusparselt"),
     ((9, 0), False, None), ((10, 0), False, None)],
)  # fmt: skip
def test_no_cutlass_fallback_beyond_compute_capability_8(monkeypatch, capability, cusparselt, expect):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: cusparselt)
    device = torch.device("cuda")
    assert sparse_backend(device) == expect
    assert bool(no_sparse_reason(device)) == (expect is None)


def test_a_layer_copy_is_untouched_by_conversion(replay):
    conv = _masked(nn.Conv2d(32, 16, 1).double())
    before = copy.deepcopy(conv.weight)
    sparse_module(conv, replay)
    assert torch.equal(conv.weight, before)
