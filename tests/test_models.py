"""Where models come from, and the whole pruning chain on real architectures (torchvision's and the built-in
CIFAR networks) at small input sizes: forward passes only, a few seconds each."""

import copy

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from conftest import coupled_shapes_match, kill_channels
from hybridprune.config import PruneConfig
from hybridprune.deploy.sparse import to_inference_model
from hybridprune.errors import HybridPruneError
from hybridprune.models.sources import build_model
from hybridprune.pruning.checkpoint import load_checkpoint, load_weights_, save_checkpoint
from hybridprune.pruning.filters import prune_filters_
from hybridprune.pruning.graph import channel_groups, dependency_graph
from hybridprune.pruning.nm import apply_masks_, nm_prune_, satisfies_nm
from hybridprune.pruning.plan import FilterPlan, GroupPlan, apply_filter_plan_
from zoo import randomize_batchnorm_

REAL = [
    "torchvision:resnet18",
    "torchvision:mobilenet_v2",
    "torchvision:vgg11_bn",
    "torchvision:densenet121",
    "resnet20",
    "resnet56",
    "vgg16",
]


@pytest.mark.parametrize("name", REAL)
def test_the_pruning_chain_holds_its_properties_on_real_architectures(name, tmp_path):
    torch.manual_seed(0)
    model = randomize_batchnorm_(build_model(name, image_size=32)).eval()
    x = torch.rand(2, 3, 32, 32)

    # 1. removing channels that contribute nothing leaves the logits unchanged
    group = channel_groups(model, dependency_graph(model))[-1]
    dead = list(range(0, group.size, 2))
    kill_channels(model, group, dead)
    before = model(x)
    keep = tuple(c for c in range(group.size) if c not in dead)
    apply_filter_plan_(model, FilterPlan(0.5, 1, (GroupPlan(group.name, group.size, keep),)))
    torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-5 * before.abs().max().item())

    # 2. filter pruning + N:M + one optimizer step: the pattern holds exactly, coupled layers agree
    plan = prune_filters_(model, PruneConfig(metric="hybrid", filter_ratio=0.4, round_to=8), [])
    assert any(g.kept < g.original for g in plan.groups)
    masks = nm_prune_(model)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    nn.functional.cross_entropy(model(x), torch.tensor([1, 2])).backward()
    opt.step()
    apply_masks_(model, masks)
    model.eval()
    assert all(satisfies_nm(model.get_submodule(n).weight) for n in masks)
    coupled_shapes_match(model)

    # 3. a checkpoint round trip gives identical logits
    loaded, loaded_masks, _ = load_checkpoint(save_checkpoint(tmp_path / "m.safetensors", model, masks))
    assert torch.isfinite(model(x)).all()
    assert torch.equal(loaded(x), model(x)) and set(loaded_masks) == set(masks)

    # 4. the inference model (BN folded, N:M convs lowered to unfold + GEMM) equals the masked model
    inf = to_inference_model(model, masks, torch.device("cpu"), torch.float32, choose="gemm")
    out = model(x)
    assert sum(layer.kernel == "gemm" for layer in inf.layers) >= 3
    torch.testing.assert_close(inf.model(x), out, rtol=1e-3, atol=1e-4 * out.abs().max().item())


def test_a_gray_dataset_meets_an_rgb_torchvision_model_by_repeating_its_channel():
    model = build_model("torchvision:resnet18", in_channels=1, image_size=32).eval()
    assert model.net_channels == 3 and model.input_shape == (1, 32, 32)
    gray = torch.rand(2, 1, 32, 32)
    mean, std = model.normalize.mean, model.normalize.std
    expected = model.net(((gray - mean) / std).repeat(1, 3, 1, 1))
    torch.testing.assert_close(model(gray), expected)


def test_builtin_models_take_the_data_channels_directly():
    assert build_model("resnet20", in_channels=1).net_channels == 1


@pytest.mark.parametrize(
    "name,message",
    [
        ("torchvision:resnet9000", "unknown torchvision classification model 'resnet9000'; valid: .*resnet18"),
        ("torchvision:fasterrcnn_resnet50_fpn", "unknown torchvision classification model"),
        ("vgg99", "unknown model 'vgg99'; valid names: alexnet, resnet20, resnet56, vgg16"),
        ("no_such_module:make", "cannot load model factory 'no_such_module:make'"),
        ("zoo:nothing_here", "cannot load model factory 'zoo:nothing_here'"),
        ("zoo:ZOO", "not callable"),
        ("zoo:randomize_batchnorm_", "model factory .zoo:randomize_batchnorm_. failed .TypeError"),
    ],
)
def test_bad_model_names_fail_with_one_line(name, message):
    with pytest.raises(HybridPruneError, match=message) as err:
        build_model(name, image_size=16)
    assert "\n" not in str(err.value)


def test_a_model_that_cannot_take_the_images_is_refused():
    with pytest.raises(HybridPruneError, match="vgg16 has five 2x2 max-pools"):
        build_model("vgg16", image_size=16)
    with pytest.raises(HybridPruneError, match="--width scales the built-in models only"):
        build_model("torchvision:resnet18", width=0.5)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_trained_weights_load_into_the_network_without_unpickling_code(suffix, tmp_path):
    trained = build_model("zoo:residual_net", image_size=16)
    with torch.no_grad():
        for p in trained.net.parameters():
            p.normal_()
    path = tmp_path / f"w{suffix}"
    state = {f"module.{k}": v for k, v in trained.net.state_dict().items()}  # as DDP saves them
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    fresh = load_weights_(build_model("zoo:residual_net", image_size=16), path)
    x = torch.rand(2, 3, 16, 16)
    assert torch.equal(fresh.eval()(x), trained.eval()(x))


def test_weights_of_another_model_or_a_pickled_module_are_refused(tmp_path):
    other = tmp_path / "other.pt"
    torch.save(build_model("zoo:plain_net", image_size=16).net.state_dict(), other)
    with pytest.raises(HybridPruneError, match="does not fit zoo:residual_net"):
        load_weights_(build_model("zoo:residual_net", image_size=16), other)
    pickled = tmp_path / "module.pt"
    torch.save(nn.Linear(2, 2), pickled)
    with pytest.raises(HybridPruneError, match="not a readable state dict"):
        load_weights_(build_model("zoo:residual_net", image_size=16), pickled)


def test_width_scales_the_builtin_cifar_networks():
    narrow, wide = build_model("resnet20", width=0.5), build_model("resnet20", width=2.0)
    assert narrow.net.stem.conv.out_channels == 8 and wide.net.stem.conv.out_channels == 32
    assert sum(p.numel() for p in copy.deepcopy(wide).parameters()) > sum(p.numel() for p in narrow.parameters())


def test_a_model_over_the_parameter_limit_is_refused_before_allocating():
    import time

    start = time.perf_counter()
    with pytest.raises(HybridPruneError, match="3,832,814,602 parameters, over the limit"):
        build_model("vgg16", width=16)  # 15 GB of weights if it were built
    assert time.perf_counter() - start < 5
