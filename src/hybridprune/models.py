"""Registered model factories that take explicit per-layer widths.

A pruned model is the same architecture with other widths, so it is described by a small dict
(`model_spec`) and rebuilt through its factory: checkpoints never need pickled modules.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .errors import HybridPruneError
from .registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")

ALEXNET_WIDTHS = (64, 192, 384, 256, 256)
ALEXNET_HIDDEN = (1024, 1024)


class ConvBlock(nn.Sequential):
    """conv -> BatchNorm -> ReLU: the unit that filter pruning scores and shrinks."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU(inplace=True)


class Normalize(nn.Module):
    """Per-channel input normalisation held as buffers, so a checkpoint carries its dataset's statistics."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean)).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std)).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class AlexNet(nn.Module):
    """AlexNet for small images: five conv blocks (3x3 conv, BatchNorm, ReLU), three max-pools, three linears.

    `widths` are the five conv output channel counts, `hidden` the two hidden linear widths.
    Input: `in_channels` x `image_size` x `image_size` images in [0, 1] (normalised inside).
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        image_size: int = 32,
        widths: Sequence[int] = ALEXNET_WIDTHS,
        hidden: Sequence[int] = ALEXNET_HIDDEN,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if len(widths) != 5 or len(hidden) != 2:
            raise HybridPruneError(f"alexnet takes 5 conv widths and 2 hidden widths, got {widths} and {hidden}")
        if image_size < 8:
            raise HybridPruneError(f"alexnet needs images of at least 8x8 pixels, got {image_size}")
        c1, c2, c3, c4, c5 = widths
        self.config = {"in_channels": in_channels, "num_classes": num_classes, "image_size": image_size}
        self.normalize = Normalize(mean or [0.5] * in_channels, std or [0.25] * in_channels)
        pool = nn.MaxPool2d(2)
        self.features = nn.Sequential(
            ConvBlock(in_channels, c1),
            pool,
            ConvBlock(c1, c2),
            pool,
            ConvBlock(c2, c3),
            ConvBlock(c3, c4),
            ConvBlock(c4, c5),
            pool,
        )
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
        return self.classifier(self.features(self.normalize(x)))

    def spec(self) -> dict[str, Any]:
        """The architecture as plain data, read from the live modules (so it follows physical pruning)."""
        convs = [b.conv.out_channels for b in self.features if isinstance(b, ConvBlock)]
        linears = [m.out_features for m in self.classifier if isinstance(m, nn.Linear)]
        return {"name": "alexnet", **self.config, "widths": convs, "hidden": linears[:2]}


def scaled(widths: Sequence[int], width: float, multiple: int = 8) -> list[int]:
    """Scale layer widths by a multiplier, rounded to a multiple (tensor cores and 2:4 want aligned widths)."""
    return [max(multiple, int(round(w * width / multiple)) * multiple) for w in widths]


@MODELS.register("alexnet")
def alexnet(
    in_channels: int = 3,
    num_classes: int = 10,
    image_size: int = 32,
    width: float = 1.0,
    widths: Sequence[int] | None = None,
    hidden: Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> AlexNet:
    """AlexNet for 28x28/32x32 images; `width` scales the default widths, explicit `widths`/`hidden` win.

    Example:
        >>> m = alexnet(in_channels=1, image_size=28, width=0.25)
        >>> m(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    if width <= 0:
        raise HybridPruneError(f"width multiplier must be positive, got {width}")
    return AlexNet(
        in_channels,
        num_classes,
        image_size,
        widths if widths is not None else scaled(ALEXNET_WIDTHS, width),
        hidden if hidden is not None else scaled(ALEXNET_HIDDEN, width),
        mean,
        std,
    )


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model; None-valued arguments are dropped so CLI defaults never override the model's."""
    return MODELS.get(name)(**{k: v for k, v in kwargs.items() if v is not None})


def model_spec(model: nn.Module) -> dict[str, Any]:
    """The architecture of a registered model as plain data; `build_model(**spec)` rebuilds it."""
    if not hasattr(model, "spec"):
        raise HybridPruneError(f"{type(model).__name__} has no spec(); register it through hybridprune.models")
    return model.spec()


def rebuild(spec: dict[str, Any]) -> nn.Module:
    """Rebuild a model from `model_spec` output (weights left at their initial values)."""
    spec = dict(spec)
    return build_model(spec.pop("name"), **spec)


def conv_blocks(model: nn.Module) -> list[tuple[str, ConvBlock]]:
    """The model's conv blocks in forward order, by qualified name: the layers filter pruning acts on."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ConvBlock)]


def input_shape(model: nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) of the model's input, from its spec."""
    spec = model_spec(model)
    return spec["in_channels"], spec["image_size"], spec["image_size"]
