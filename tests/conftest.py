import pytest
import torch

from hybridprune.models import build_model
from zoo import ZOO_SOURCES, randomize_batchnorm_

# Every property test runs on these: four kinds of channel coupling written as plain user code, and the
# built-in networks. Image size 16 (32 for the CIFAR ResNet, which is built for it).
ZOO_NAMES = [*ZOO_SOURCES.values(), "alexnet", "resnet20"]


def pytest_collection_modifyitems(config, items):
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


@pytest.fixture(params=ZOO_NAMES, ids=lambda n: n.removeprefix("zoo:"))
def zoo_model(request):
    return make_model(request.param)


@pytest.fixture
def tiny_model():
    """A narrow AlexNet (16x16 images) with non-trivial BatchNorm statistics."""
    return make_model("alexnet")
