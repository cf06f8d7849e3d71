"""The built-in networks: the small-image AlexNet of the paper, and the CIFAR ResNets and VGG-16 that the
filter-pruning literature measures on. Each is a plain `nn.Module` (no input normalisation: `models.py`
wraps every network, built-in or not, with the dataset's statistics).

Every factory takes `in_channels`, `num_classes`, `image_size` and a `width` multiplier that scales its
default channel counts, rounded to a multiple of 8 so 2:4 and tensor cores stay aligned.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from hybridprune.errors import HybridPruneError

ALEXNET_WIDTHS = (64, 192, 384, 256, 256)
ALEXNET_HIDDEN = (1024, 1024)
RESNET_STAGES = (16, 32, 64)
VGG16_WIDTHS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def scaled(widths: Sequence[int], width: float, multiple: int = 8) -> list[int]:
    """Scale layer widths by a multiplier, rounded to a multiple (tensor cores and 2:4 want aligned widths).

    Example:
        >>> scaled([64, 192], 0.5)
        [32, 96]
    """
    if not (0 < width <= 16):
        raise HybridPruneError(f"width multiplier must be in (0, 16], got {width}")
    return [max(multiple, int(round(w * width / multiple)) * multiple) for w in widths]


class ConvBlock(nn.Sequential):
    """conv -> BatchNorm -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU(inplace=True)


class AlexNet(nn.Module):
    """AlexNet for small images: five conv blocks (3x3 conv, BatchNorm, ReLU), three max-pools, three linears."""

    def __init__(
        self, in_channels: int, num_classes: int, image_size: int, widths: Sequence[int], hidden: Sequence[int]
    ) -> None:
        super().__init__()
        if len(widths) != 5 or len(hidden) != 2:
            raise HybridPruneError(f"alexnet takes 5 conv widths and 2 hidden widths, got {widths} and {hidden}")
        if image_size < 8:
            raise HybridPruneError(f"alexnet needs images of at least 8x8 pixels, got {image_size}")
        c1, c2, c3, c4, c5 = widths
        pool = nn.MaxPool2d(2)
        self.features = nn.Sequential(
            ConvBlock(in_channels, c1), pool, ConvBlock(c1, c2), pool,
            ConvBlock(c2, c3), ConvBlock(c3, c4), ConvBlock(c4, c5), pool,
        )  # fmt: skip
        side = image_size // 8  # three 2x2 max-pools, floored (28 -> 14 -> 7 -> 3)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c5 * side * side, hidden[0]),
            nn.ReLU(inplace=True),
            nn.Linear(hidden[0], hidden[1]),
            nn.ReLU(inplace=True),
            nn.Linear(hidden[1], num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def alexnet(
    in_channels: int = 3,
    num_classes: int = 10,
    image_size: int = 32,
    width: float = 1.0,
    widths: Sequence[int] | None = None,
    hidden: Sequence[int] | None = None,
) -> AlexNet:
    """AlexNet for 28x28/32x32 images; `width` scales the default widths, explicit `widths`/`hidden` win.

    Example:
        >>> alexnet(in_channels=1, image_size=28, width=0.25)(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    return AlexNet(
        in_channels,
        num_classes,
        image_size,
        widths if widths is not None else scaled(ALEXNET_WIDTHS, width),
        hidden if hidden is not None else scaled(ALEXNET_HIDDEN, width),
    )


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN, added to a shortcut: identity, or a strided 1x1 conv + BN where the shape changes
    (He et al.'s option B; option A's zero-padded shortcut would tie channels to no layer and cannot be pruned)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 images (He et al. 2016, section 4.2): a 3x3 stem, three stages of `depth` blocks with
    16/32/64 channels (scaled by width), global average pooling and one linear layer. 6 * depth + 2 layers."""

    def __init__(self, depth: int, in_channels: int, num_classes: int, widths: Sequence[int]) -> None:
        super().__init__()
        self.stem = ConvBlock(in_channels, widths[0])
        blocks, c_in = [], widths[0]
        for stage, c_out in enumerate(widths):
            for i in range(depth):
                blocks.append(BasicBlock(c_in, c_out, stride=2 if stage > 0 and i == 0 else 1))
                c_in = c_out
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


def _cifar_resnet(depth: int, in_channels: int, num_classes: int, width: float) -> CifarResNet:
    return CifarResNet(depth, in_channels, num_classes, scaled(RESNET_STAGES, width))


def resnet20(in_channels: int = 3, num_classes: int = 10, image_size: int = 32, width: float = 1.0) -> CifarResNet:
    """ResNet-20 for CIFAR (0.27M parameters at width 1).

    Example:
        >>> resnet20(width=0.5)(torch.zeros(1, 3, 32, 32)).shape
        torch.Size([1, 10])
    """
    return _cifar_resnet(3, in_channels, num_classes, width)


def resnet56(in_channels: int = 3, num_classes: int = 10, image_size: int = 32, width: float = 1.0) -> CifarResNet:
    """ResNet-56 for CIFAR (0.86M parameters at width 1)."""
    return _cifar_resnet(9, in_channels, num_classes, width)


class CifarVGG(nn.Module):
    """VGG-16 for CIFAR as in Li et al. (ICLR 2017): 13 3x3 conv + BN + ReLU layers, five max-pools, then
    linear 512 -> 512 (BatchNorm, ReLU) -> classes."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int, width: float) -> None:
        super().__init__()
        if image_size < 32:
            raise HybridPruneError(f"vgg16 has five 2x2 max-pools and needs images of at least 32x32, got {image_size}")
        layers: list[nn.Module] = []
        c_in = in_channels
        convs = iter(scaled([w for w in VGG16_WIDTHS if w != "M"], width))
        for w in VGG16_WIDTHS:
            if w == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                c_out = next(convs)
                layers.append(ConvBlock(c_in, c_out))
                c_in = c_out
        self.features = nn.Sequential(*layers)
        hidden = scaled([512], width)[0]
        side = image_size // 32
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c_in * side * side, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def vgg16(in_channels: int = 3, num_classes: int = 10, image_size: int = 32, width: float = 1.0) -> CifarVGG:
    """VGG-16 with BatchNorm for 32x32 images (15M parameters at width 1)."""
    return CifarVGG(in_channels, num_classes, image_size, width)


BUILTIN = {"alexnet": alexnet, "resnet20": resnet20, "resnet56": resnet56, "vgg16": vgg16}
