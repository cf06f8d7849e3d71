import pytest
import torch
from torch import nn

from hybridprune.models.sources import build_model
from zoo import ZOO_SOURCES, randomize_batchnorm_

# Every property test runs on these: four kinds of channel coupling written as plain user code, and the
# built-in networks. Image size 16 (32 for the CIFAR ResNet, which is built for it).
ZOO_NAMES = [*ZOO_SOURCES.values(), "alexnet", "resnet20"]


# Tests that run OpenVINO in this process go last: in two CI runs here a segmentation fault hit later torch work
# (training tests) after OpenVINO had run in the same process; its cause is not yet found.
IN_PROCESS_OPENVINO = ("test_quantize.py", "test_runtimes.py", "deploy/runtimes", "deploy/quantize.py")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: any(part in item.nodeid for part in IN_PROCESS_OPENVINO))  # stable: order kept
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def make_model(name: str, seed: int = 0) -> torch.nn.Module:
    """A zoo or built-in model with non-trivial BatchNorm statistics, so pruning effects show in the logits."""
    torch.manual_seed(seed)
    size = 32 if name == "resnet20" else 16
    width = {"alexnet": 0.25, "resnet20": 1.0}.get(name)
    model = build_model(name, in_channels=3, num_classes=10, image_size=size, width=width)
    return randomize_batchnorm_(model, seed).eval()


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test: what it computes is tiny, and the machine's cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=ZOO_NAMES, ids=lambda n: n.removeprefix("zoo:"))
def zoo_model(request):
    return make_model(request.param)


@pytest.fixture
def tiny_model():
    """A narrow AlexNet (16x16 images) with non-trivial BatchNorm statistics."""
    return make_model("alexnet")


def kill_channels(model: nn.Module, group, channels: list[int]) -> None:
    """Make group channels contribute nothing downstream: zero every producing conv's filters and every
    BatchNorm's affine terms and running mean at those channels, wherever in the group the BN sits (right
    after the conv, or after a concatenation in a pre-activation net), so each channel is exactly 0."""
    from hybridprune.pruning.graph import dependency_graph

    graph = dependency_graph(model)
    root = model.get_submodule(group.name)
    items = graph.get_pruning_group(root, graph.get_pruner_of_module(root).prune_out_channels, channels)
    with torch.no_grad():
        for item in items:
            module, idxs = item.dep.target.module, list(item.idxs)
            if isinstance(module, nn.Conv2d) and graph.is_out_channel_pruning_fn(item.dep.handler):
                module.weight[idxs] = 0
                if module.bias is not None:
                    module.bias[idxs] = 0
            if isinstance(module, nn.BatchNorm2d):
                module.weight[idxs], module.bias[idxs], module.running_mean[idxs] = 0.0, 0.0, 0.0


def coupled_shapes_match(model: nn.Module) -> None:
    """Every coupled layer agrees on channel counts: the forward pass runs, and every BatchNorm matches its input."""
    shapes = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, inp, n=n: shapes.__setitem__(n, inp[0].shape[1]))
        for n, m in model.named_modules()
        if isinstance(m, (nn.BatchNorm2d, nn.Conv2d))
    ]
    model(torch.rand(2, *model.input_shape))
    for h in hooks:
        h.remove()
    for n, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            assert shapes[n] == m.num_features, n
        if isinstance(m, nn.Conv2d):
            assert shapes[n] == m.in_channels, n
