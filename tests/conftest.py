import pytest
import torch

from hybridprune.models import alexnet


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tiny_model():
    """A narrow AlexNet with non-trivial BatchNorm statistics, so pruning effects show in the logits."""
    torch.manual_seed(0)
    model = alexnet(in_channels=3, num_classes=10, image_size=32, width=0.25)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    return model.eval()
