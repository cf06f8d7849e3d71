"""Tiny CNNs that every property test runs on: each one exercises a different kind of channel coupling.

They are plain user code (no hybridprune classes), built in milliseconds, and take 3x16x16 images.
`ZOO` maps a name to a factory with the signature hybridprune passes to user factories.
"""

from __future__ import annotations

import torch
from torch import nn


def _bn_relu(c: int) -> list[nn.Module]:
    return [nn.BatchNorm2d(c), nn.ReLU(inplace=True)]


class PlainNet(nn.Module):
    """conv + BN + ReLU stacks, a dilated conv, a reflect-padded strided conv, flatten into a linear head."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.body = nn.Sequential(
            nn.Conv2d(16, 32, 3, padding=2, dilation=2, bias=False),
            *_bn_relu(32),
            nn.Conv2d(32, 32, 3, stride=2, padding=1, padding_mode="reflect"),
            *_bn_relu(32),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(torch.relu(self.bn0(self.stem(x)))))


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return self.relu(out)


class ResidualNet(nn.Module):
    """Three residual blocks: the adds tie the outputs of several convs into one group."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), *_bn_relu(16))
        self.b1 = BasicBlock(16, 16)
        self.b2 = BasicBlock(16, 32, stride=2)
        self.b3 = BasicBlock(32, 32)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.b3(self.b2(self.b1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class ConcatNet(nn.Module):
    """Two branches concatenated along channels (an inception / dense-net pattern)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), *_bn_relu(16))
        self.left = nn.Sequential(nn.Conv2d(16, 16, 1, bias=False), *_bn_relu(16))
        self.right = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1, bias=False), *_bn_relu(32))
        self.mix = nn.Sequential(nn.Conv2d(48, 32, 3, stride=2, padding=1, bias=False), *_bn_relu(32))
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.mix(torch.cat([self.left(x), self.right(x)], dim=1))
        return self.fc(x.mean(dim=(2, 3)))


class DepthwiseNet(nn.Module):
    """Depthwise-separable blocks (MobileNet): a depthwise conv shares its channels with the conv before it."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), *_bn_relu(16)]
        for c_in, c_out, stride in ((16, 32, 1), (32, 32, 2)):
            layers += [nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False), *_bn_relu(c_in)]
            layers += [nn.Conv2d(c_in, c_out, 1, bias=False), *_bn_relu(c_out)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class AuxNet(nn.Module):
    """A trunk and, in training mode only, an auxiliary classifier reading the middle of it (GoogLeNet's pattern):
    returns (logits, aux logits) while training, the logits in eval mode."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 32, 3, padding=1, bias=False), *_bn_relu(32))
        self.body = nn.Sequential(nn.Conv2d(32, 32, 3, stride=2, padding=1, bias=False), *_bn_relu(32))
        self.aux = nn.Sequential(
            nn.Conv2d(32, 16, 1), *_bn_relu(16), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, num_classes)
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        middle = self.stem(x)
        logits = self.head(self.body(middle))
        return (logits, self.aux(middle)) if self.training else logits


def aux_net(in_channels: int = 3, num_classes: int = 10) -> nn.Module:
    return AuxNet(in_channels, num_classes)


def plain_net(in_channels: int = 3, num_classes: int = 10) -> nn.Module:
    return PlainNet(in_channels, num_classes)


def residual_net(in_channels: int = 3, num_classes: int = 10) -> nn.Module:
    return ResidualNet(in_channels, num_classes)


def concat_net(in_channels: int = 3, num_classes: int = 10) -> nn.Module:
    return ConcatNet(in_channels, num_classes)


def depthwise_net(in_channels: int = 3, num_classes: int = 10) -> nn.Module:
    return DepthwiseNet(in_channels, num_classes)


ZOO = {"plain": plain_net, "residual": residual_net, "concat": concat_net, "depthwise": depthwise_net}
ZOO_SOURCES = {name: f"zoo:{fn.__name__}" for name, fn in ZOO.items()}  # `module:factory` names (tests/ on path)


def randomize_batchnorm_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine terms, so pruning and folding effects show in the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.rand(c, generator=gen) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(c, generator=gen) * 0.2 - 0.1)
    return model
