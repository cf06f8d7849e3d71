import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hybridprune.config import NMPattern
from hybridprune.deploy.sparse import (
    GemmConv2d,
    conv_weight_as_gemm,
    fold_batchnorm_,
    kernel_ineligibility,
    to_inference_model,
    unfold_channels_last,
)
from hybridprune.errors import HybridPruneError
from hybridprune.pruning.nm import nm_mask, nm_prune_


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
    patches, ho, wo = unfold_channels_last(x, (3, 3), (1, 1), (0, 0, 0, 0))
    assert (ho, wo) == (1, 1)
    # first (kh, kw) = (0, 0): channel 0 then channel 1
    assert patches[0, :4].tolist() == [0.0, 9.0, 1.0, 10.0]


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(8, 12, 3, padding=2, dilation=2),
        nn.Conv2d(8, 12, 3, stride=2, padding=1, padding_mode="reflect"),
        nn.Conv2d(8, 12, (3, 5), padding=(1, 2), padding_mode="replicate", bias=False),
        nn.Conv2d(8, 12, 3, padding=1, padding_mode="circular", dilation=(1, 2)),
        nn.Conv2d(8, 12, 4, padding="same", dilation=2),
        nn.Conv2d(8, 12, 3, padding="valid", stride=(2, 1)),
    ],
)
def test_unfold_and_gemm_honours_dilation_padding_modes_and_string_padding(conv):
    torch.manual_seed(0)
    conv = conv.double()
    x = torch.randn(2, 8, 13, 11, dtype=torch.double)
    torch.testing.assert_close(GemmConv2d.from_conv(conv)(x), conv(x))


def test_grouped_convs_are_not_lowered_to_one_gemm():
    with pytest.raises(HybridPruneError, match="grouped conv"):
        GemmConv2d.from_conv(nn.Conv2d(8, 8, 3, groups=8))


def test_folding_batchnorm_keeps_outputs_and_the_nm_pattern(zoo_model):
    masks = nm_prune_(zoo_model)
    x = torch.rand(2, *zoo_model.input_shape)
    folded = fold_batchnorm_(__import__("copy").deepcopy(zoo_model))
    torch.testing.assert_close(folded(x), zoo_model(x), rtol=1e-4, atol=1e-4)
    modules = dict(folded.named_modules())
    for name in masks:
        assert not modules[name].weight[~masks[name]].any()
    bns = [m for m in zoo_model.modules() if isinstance(m, nn.BatchNorm2d)]
    left = [m for m in folded.modules() if isinstance(m, nn.BatchNorm2d)]
    convs_with_bn = [m for m in folded.modules() if isinstance(m, nn.Conv2d) and m.bias is not None]
    assert len(left) < len(bns) and len(convs_with_bn) >= len(bns) - len(left)  # folded, not skipped


def test_batchnorm_sharing_its_conv_output_is_not_folded():
    from hybridprune.models.sources import build_model

    model = build_model("test_sparse:_SharedConvOutput", image_size=8).eval()
    x = torch.rand(2, 3, 8, 8)
    folded = fold_batchnorm_(__import__("copy").deepcopy(model))
    assert isinstance(folded.net.bn, nn.BatchNorm2d)  # the conv output is also used raw: folding would change it
    torch.testing.assert_close(folded(x), model(x))


class _SharedConvOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        y = self.conv(x)
        return self.fc((self.bn(y) + y).mean(dim=(2, 3)))


def test_cpu_conversion_is_dense_says_so_and_matches(zoo_model):
    masks = nm_prune_(zoo_model)
    inf = to_inference_model(zoo_model, masks, torch.device("cpu"), torch.float32)
    assert inf.sparse_layers == [] and "no sparse tensor cores" in inf.notice
    assert {layer.name for layer in inf.layers if "no sparse tensor cores" in layer.reason} == set(masks)
    x = torch.rand(2, *zoo_model.input_shape)
    torch.testing.assert_close(inf.model(x), zoo_model(x), rtol=1e-4, atol=1e-4)


def test_gemm_lowering_of_every_nm_conv_equals_the_masked_model(zoo_model):
    from hybridprune.config import PruneConfig
    from hybridprune.pruning.filters import prune_filters_

    prune_filters_(zoo_model, PruneConfig(metric="l1", filter_ratio=0.4, round_to=4), [])
    masks = nm_prune_(zoo_model)
    inf = to_inference_model(zoo_model, masks, torch.device("cpu"), torch.float32, choose="gemm")
    lowered = {layer.name for layer in inf.layers if layer.kernel == "gemm"}
    assert lowered == {n for n in masks if isinstance(zoo_model.get_submodule(n), nn.Conv2d)} and lowered
    assert all(isinstance(inf.model.get_submodule(n), GemmConv2d) for n in lowered)
    dense = {layer.name: layer.reason for layer in inf.layers if layer.name not in masks}
    assert all(dense.values())  # every dense layer says why
    x = torch.rand(3, *zoo_model.input_shape)
    torch.testing.assert_close(inf.model(x), zoo_model(x), rtol=1e-4, atol=1e-4)


def test_half_precision_on_cpu_and_bad_choices_are_refused(tiny_model):
    with pytest.raises(HybridPruneError, match="float32"):
        to_inference_model(tiny_model, {}, torch.device("cpu"), torch.float16)
    with pytest.raises(HybridPruneError, match="valid: sparse, fastest, dense, gemm"):
        to_inference_model(tiny_model, {}, torch.device("cpu"), torch.float32, choose="fast")


def test_a_mask_whose_weights_break_the_pattern_is_refused(tiny_model):
    masks = nm_prune_(tiny_model)
    with torch.no_grad():
        tiny_model.net.features[2].conv.weight.fill_(1.0)
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
    from hybridprune.deploy.sparse import sparse_backend

    device = torch.device("cuda")
    if sparse_backend(device) is None:
        pytest.skip("GPU without sparse tensor cores")
    return device


@pytest.mark.gpu
@pytest.mark.parametrize("kernel,stride,padding", [(1, 1, 0), (3, 1, 1), (3, 2, 1), (5, 1, 2)])
@pytest.mark.parametrize("batch", [1, 8])
def test_gpu_sparse_conv_matches_dense_masked_conv(kernel, stride, padding, batch):
    from hybridprune.deploy.sparse import sparse_backend, sparse_module

    device = _sparse_device()
    conv = nn.Conv2d(64, 128, kernel, stride=stride, padding=padding, bias=True).to(device, torch.float16)
    with torch.no_grad():
        conv.weight.mul_(nm_mask(conv.weight))
    x = torch.randn(batch, 64, 16, 16, device=device, dtype=torch.float16)
    sparse = sparse_module(conv, sparse_backend(device))
    torch.testing.assert_close(sparse(x), F.conv2d(x, conv.weight, conv.bias, stride, padding), **FP16_TOL)


@pytest.mark.gpu
def test_gpu_sparse_linear_matches_dense_masked_linear():
    from hybridprune.deploy.sparse import sparse_backend, sparse_module

    device = _sparse_device()
    lin = nn.Linear(256, 128).to(device, torch.float16)
    with torch.no_grad():
        lin.weight.mul_(nm_mask(lin.weight))
    x = torch.randn(32, 256, device=device, dtype=torch.float16)
    torch.testing.assert_close(sparse_module(lin, sparse_backend(device))(x), lin(x), **FP16_TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["alexnet", "resnet20", "torchvision:resnet18", "torchvision:mobilenet_v2"])
def test_gpu_whole_model_sparse_matches_dense_masked_model(dtype, name):
    from hybridprune.models.sources import build_model

    device = _sparse_device()
    torch.manual_seed(0)
    model = build_model(name, image_size=32).eval()
    masks = nm_prune_(model)
    sparse = to_inference_model(model, masks, device, dtype, choose="sparse")
    dense = to_inference_model(model, masks, device, dtype, choose="dense")
    assert len(sparse.sparse_layers) >= 5
    x = torch.rand(16, 3, 32, 32, device=device, dtype=dtype)
    with torch.inference_mode():
        out_sparse, out_dense = sparse.model(x).float(), dense.model(x).float()
    scale = out_dense.abs().max()
    assert (out_sparse - out_dense).abs().max() <= 0.03 * scale
