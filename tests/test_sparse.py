import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hybridprune.config import NMPattern
from hybridprune.deploy.gemm import GemmConv2d, conv_weight_as_gemm, unfold_channels_last
from hybridprune.deploy.sparse import fold_batchnorm_, kernel_ineligibility, to_inference_model
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

GPU_REL_TOL = 2e-2  # max|sparse - dense| / max|dense|: fp16/bf16 accumulation order differs from cuDNN's


def _sparse_device():
    from hybridprune.deploy.sparse import sparse_backend

    device = torch.device("cuda")
    if sparse_backend(device) is None:
        pytest.skip("GPU without sparse tensor cores")
    return device


def _assert_relative(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, tol: float = GPU_REL_TOL) -> None:
    """max|out - ref| <= tol * max|ref|, on outputs of a scale `dtype` holds (not underflowed zeros)."""
    scale = ref.float().abs().max()
    assert scale > 1e3 * torch.finfo(dtype).tiny, f"reference outputs ({scale:.1e}) underflow in {dtype}"
    err = (out.float() - ref.float()).abs().max()
    assert err <= tol * scale, f"max |diff| {err:.3e} > {tol} x max |ref| {scale:.3e}"


@pytest.mark.gpu
@pytest.mark.parametrize(
    "kernel,stride,padding,side",
    [(1, 1, 0, 16), (1, 2, 0, 16), (1, 2, 0, 2), (1, 2, 0, 1), (3, 1, 1, 16), (3, 2, 1, 16), (3, 2, 1, 2),
     (5, 1, 2, 8)],
)  # fmt: skip
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
def test_gpu_sparse_conv_matches_dense_masked_conv(kernel, stride, padding, side, batch, channels_last):
    from hybridprune.deploy.sparse import sparse_backend, sparse_module

    device = _sparse_device()
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 128, kernel, stride=stride, padding=padding, bias=True).to(device, torch.float16)
    with torch.no_grad():
        conv.weight.mul_(nm_mask(conv.weight))
    x = torch.randn(batch, 64, side, side, device=device, dtype=torch.float16)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    sparse = sparse_module(conv, sparse_backend(device))
    with torch.inference_mode():
        _assert_relative(sparse(x), F.conv2d(x, conv.weight, conv.bias, stride, padding), torch.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("view", ["contiguous", "strided", "3d"])
def test_gpu_sparse_linear_matches_dense_masked_linear(view):
    from hybridprune.deploy.sparse import sparse_backend, sparse_module

    device = _sparse_device()
    torch.manual_seed(0)
    lin = nn.Linear(256, 128).to(device, torch.float16)
    with torch.no_grad():
        lin.weight.mul_(nm_mask(lin.weight))
    x = torch.randn(32, 512, device=device, dtype=torch.float16)
    x = {"contiguous": x[:, :256].contiguous(), "strided": x[:, ::2], "3d": x[:, :256].view(4, 8, 256)}[view]
    with torch.inference_mode():
        _assert_relative(sparse_module(lin, sparse_backend(device))(x), lin(x), torch.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("choose", ["sparse-all", "sparse"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["alexnet", "resnet20", "torchvision:resnet18", "torchvision:mobilenet_v2"])
def test_gpu_whole_model_sparse_matches_dense_masked_model(dtype, name, choose):
    from test_sparse_operands import model_with_unit_logits

    device = _sparse_device()
    model = model_with_unit_logits(name, 32)  # largest logit 1: fp16 holds it (raw MobileNet-V2 logits underflow)
    x = torch.rand(16, 3, 32, 32, device=device, dtype=dtype)  # 16 rows: the wrapper pads (copies) no operand
    masks = nm_prune_(model, example_inputs=x[:2].float().cpu())
    sparse = to_inference_model(model, masks, device, dtype, choose=choose, example_inputs=x)
    dense = to_inference_model(model, masks, device, dtype, choose="dense")
    assert len(sparse.sparse_layers) >= (5 if choose == "sparse-all" else 1), [k.reason for k in sparse.layers]
    with torch.inference_mode():
        _assert_relative(sparse.model(x), dense.model(x), dtype, tol=0.03)


@pytest.mark.gpu
def test_gpu_sparse_layers_get_a_checked_algorithm_and_replay_in_a_cuda_graph():
    # the timing path replays CUDA graphs; a captured cuSPARSELt call must give what the eager call gives
    from test_sparse_operands import model_with_unit_logits

    device = _sparse_device()
    model = model_with_unit_logits("torchvision:resnet18", 32)
    x = torch.rand(16, 3, 32, 32, device=device, dtype=torch.float16)
    masks = nm_prune_(model, example_inputs=x[:2].float().cpu())
    inf = to_inference_model(model, masks, device, torch.float16, choose="sparse", example_inputs=x)
    sparse = [k for k in inf.layers if k.kernel == "sparse"]
    assert sparse and all(k.sparse_ms is not None and k.reason for k in sparse)
    if inf.backend == "cusparselt":
        assert all(k.alg_id is not None and "alg" in k.reason for k in sparse)
    static_x = x.clone()
    with torch.inference_mode():
        eager = inf.model(static_x).clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            inf.model(static_x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = inf.model(static_x)
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
    _assert_relative(out, eager, torch.float16, tol=1e-3)  # same kernels, same inputs (split-K may reorder sums)
