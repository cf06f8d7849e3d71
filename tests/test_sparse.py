import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hybridprune.errors import HybridPruneError
from hybridprune.nm import NMPattern, nm_mask, nm_prune_
from hybridprune.sparse import (
    GemmConv2d,
    conv_weight_as_gemm,
    fold_batchnorm_,
    kernel_ineligibility,
    to_inference_model,
    unfold_channels_last,
)


@pytest.mark.parametrize("kernel,stride,padding", [(1, 1, 0), (3, 1, 1), (3, 2, 1), (5, 1, 2), (5, 2, 0), (3, 1, 0)])
@pytest.mark.parametrize("batch", [1, 3])
def test_unfold_and_gemm_equals_conv2d(kernel, stride, padding, batch):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, kernel, stride=stride, padding=padding, bias=True).double()
    x = torch.randn(batch, 8, 11, 9, dtype=torch.double)
    gemm = GemmConv2d.from_conv(conv)  # a dense matmul in place of the sparse kernel: same layout
    torch.testing.assert_close(gemm(x), conv(x))
    assert gemm(x).is_contiguous(memory_format=torch.channels_last)


def test_gemm_conv_takes_channels_last_input():
    conv = nn.Conv2d(4, 8, 3, padding=1).double()
    x = torch.randn(2, 4, 6, 6, dtype=torch.double).to(memory_format=torch.channels_last)
    torch.testing.assert_close(GemmConv2d.from_conv(conv)(x), conv(x))


def test_nm_groups_are_contiguous_columns_of_the_gemm_weight():
    # The sparse kernel groups every 4 consecutive columns of the [out, kh*kw*in] operand: each such group
    # must be exactly one nm.py group (4 consecutive input channels at one kernel position).
    w = torch.randn(16, 32, 3, 3)
    mask = nm_mask(w, NMPattern(2, 4))
    gemm_mask = conv_weight_as_gemm(mask)
    assert (gemm_mask.reshape(16, -1, 4).sum(dim=-1) == 2).all()
    pruned = conv_weight_as_gemm(w * mask)
    assert ((pruned.reshape(16, -1, 4) != 0).sum(dim=-1) <= 2).all()


def test_patch_columns_follow_kh_kw_in_order():
    x = torch.arange(2 * 3 * 3, dtype=torch.float).view(1, 2, 3, 3)  # channel c holds 9c..9c+8
    patches, ho, wo = unfold_channels_last(x, (3, 3), (1, 1), (0, 0))
    assert (ho, wo) == (1, 1)
    # first (kh, kw) = (0, 0): channel 0 then channel 1
    assert patches[0, :4].tolist() == [0.0, 9.0, 1.0, 10.0]


def test_folding_batchnorm_keeps_outputs_and_the_nm_pattern(tiny_model):
    masks = nm_prune_(tiny_model)
    x = torch.rand(2, 3, 32, 32)
    folded = fold_batchnorm_(__import__("copy").deepcopy(tiny_model))
    torch.testing.assert_close(folded(x), tiny_model(x), rtol=1e-4, atol=1e-4)
    modules = dict(folded.named_modules())
    for name in masks:
        assert not modules[name].weight[~masks[name]].any()


def test_cpu_conversion_is_dense_says_so_and_matches(tiny_model):
    masks = nm_prune_(tiny_model)
    inf = to_inference_model(tiny_model, masks, torch.device("cpu"), torch.float32)
    assert inf.sparse_layers == [] and "no sparse tensor cores" in inf.notice
    assert {layer.name for layer in inf.layers if "no sparse tensor cores" in layer.reason} == set(masks)
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(inf.model(x), tiny_model(x), rtol=1e-4, atol=1e-4)


def test_half_precision_on_cpu_and_bad_choices_are_refused(tiny_model):
    with pytest.raises(HybridPruneError, match="float32"):
        to_inference_model(tiny_model, {}, torch.device("cpu"), torch.float16)
    with pytest.raises(HybridPruneError, match="valid: sparse, fastest, dense"):
        to_inference_model(tiny_model, {}, torch.device("cpu"), torch.float32, choose="fast")


def test_a_mask_whose_weights_break_the_pattern_is_refused(tiny_model):
    masks = nm_prune_(tiny_model)
    with torch.no_grad():
        tiny_model.features[2].conv.weight.fill_(1.0)
    with pytest.raises(HybridPruneError, match="break 2:4"):
        to_inference_model(tiny_model, masks, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize(
    "shape,backend,dtype,expect",
    [
        ((64, 576), "cusparselt", torch.float16, ""),
        ((40, 576), "cusparselt", torch.float16, "not a multiple of 16x16"),
        ((64, 288), "cutlass", torch.float16, "not a multiple of 32x64"),
        ((64, 576), None, torch.float16, "no sparse tensor cores"),
        ((64, 576), "cusparselt", torch.float32, "no torch.float32 kernel"),
    ],
)
def test_kernel_eligibility_follows_the_backend_minimums(shape, backend, dtype, expect):
    reason = kernel_ineligibility(shape, backend, dtype, NMPattern(2, 4))
    assert (expect in reason) if expect else reason == ""


def test_non_2_4_patterns_never_reach_the_kernel():
    assert "not 2:4" in kernel_ineligibility((64, 64), "cusparselt", torch.float16, NMPattern(1, 4))


# --- real sparse kernels: run only where a GPU is present -----------------------------------------------------

FP16_TOL = {"rtol": 2e-2, "atol": 2e-2}  # fp16 accumulation order differs between cuSPARSELt and cuBLAS/cuDNN


def _sparse_device():
    from hybridprune.sparse import sparse_backend

    device = torch.device("cuda")
    if sparse_backend(device) is None:
        pytest.skip("GPU without sparse tensor cores")
    return device


@pytest.mark.gpu
@pytest.mark.parametrize("kernel,stride,padding", [(1, 1, 0), (3, 1, 1), (3, 2, 1), (5, 1, 2)])
@pytest.mark.parametrize("batch", [1, 8])
def test_gpu_sparse_conv_matches_dense_masked_conv(kernel, stride, padding, batch):
    from hybridprune.sparse import _sparse_module, sparse_backend

    device = _sparse_device()
    conv = nn.Conv2d(64, 128, kernel, stride=stride, padding=padding, bias=True).to(device, torch.float16)
    with torch.no_grad():
        conv.weight.mul_(nm_mask(conv.weight))
    x = torch.randn(batch, 64, 16, 16, device=device, dtype=torch.float16)
    sparse = _sparse_module(conv, sparse_backend(device))
    torch.testing.assert_close(sparse(x), F.conv2d(x, conv.weight, conv.bias, stride, padding), **FP16_TOL)


@pytest.mark.gpu
def test_gpu_sparse_linear_matches_dense_masked_linear():
    from hybridprune.sparse import _sparse_module, sparse_backend

    device = _sparse_device()
    lin = nn.Linear(256, 128).to(device, torch.float16)
    with torch.no_grad():
        lin.weight.mul_(nm_mask(lin.weight))
    x = torch.randn(32, 256, device=device, dtype=torch.float16)
    torch.testing.assert_close(_sparse_module(lin, sparse_backend(device))(x), lin(x), **FP16_TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_whole_model_sparse_matches_dense_masked_model(dtype):
    from hybridprune.models import alexnet

    device = _sparse_device()
    torch.manual_seed(0)
    model = alexnet(width=1.0).eval()
    masks = nm_prune_(model)
    sparse = to_inference_model(model, masks, device, dtype, choose="sparse")
    dense = to_inference_model(model, masks, device, dtype, choose="dense")
    assert len(sparse.sparse_layers) >= 5
    x = torch.rand(16, 3, 32, 32, device=device, dtype=dtype)
    with torch.inference_mode():
        out_sparse, out_dense = sparse.model(x).float(), dense.model(x).float()
    scale = out_dense.abs().max()
    assert (out_sparse - out_dense).abs().max() <= 0.03 * scale
