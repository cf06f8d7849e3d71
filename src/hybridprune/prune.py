"""Filter pruning: which filters go (the plan) and their physical removal (via Torch-Pruning).

Kept filter counts are rounded to a multiple of `round_to` so that the next layer's input
channels stay aligned: 2:4 groups need a multiple of 4, and cuSPARSELt in fp16/bf16 needs both
GEMM dimensions of the sparse weight to be multiples of 16 (`kh * kw * in` is a multiple of 16
for every kernel size only when `in` is).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from .errors import HybridPruneError
from .metrics import Scores
from .models import conv_blocks, input_shape

DEFAULT_ROUND_TO = 16


@dataclass(frozen=True)
class LayerPlan:
    """One conv layer's filters: how many it had and which it keeps (sorted indices)."""

    name: str
    original: int
    keep: tuple[int, ...]

    @property
    def kept(self) -> int:
        return len(self.keep)

    @property
    def ratio(self) -> float:
        """The real fraction of filters removed, after rounding."""
        return 1 - self.kept / self.original


@dataclass(frozen=True)
class FilterPlan:
    """Which filters every conv layer keeps, and the settings that chose them."""

    ratio: float
    round_to: int
    layers: tuple[LayerPlan, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "ratio": self.ratio,
            "round_to": self.round_to,
            "layers": [{**asdict(lp), "keep": list(lp.keep), "real_ratio": lp.ratio} for lp in self.layers],
        }


def validate_ratio(ratio: float, what: str = "filter ratio") -> float:
    if not (0 <= ratio < 1) or math.isnan(ratio):
        raise HybridPruneError(f"{what} {ratio} is outside [0, 1) (e.g. 0.4 removes 40% of filters)")
    return ratio


def kept_count(n: int, ratio: float, round_to: int) -> int:
    """Filters to keep out of n: n * (1 - ratio) rounded to the nearest multiple of round_to, within [round_to, n].

    Example:
        >>> kept_count(64, 0.4, 16), kept_count(192, 0.4, 16), kept_count(10, 0.4, 16)
        (32, 112, 10)
    """
    validate_ratio(ratio)
    if round_to < 1:
        raise HybridPruneError(f"round-to must be a positive integer, got {round_to}")
    k = int(math.floor(n * (1 - ratio) / round_to + 0.5)) * round_to
    return min(n, max(k, round_to))


def plan_filter_pruning(scores: Scores, ratio: float, round_to: int = DEFAULT_ROUND_TO) -> FilterPlan:
    """Keep the highest-scoring filters of each layer (equal scores: the higher index is kept).

    Example:
        >>> plan = plan_filter_pruning({"conv": torch.tensor([3.0, 1.0, 2.0, 0.5])}, 0.5, round_to=1)
        >>> plan.layers[0].keep
        (0, 2)
    """
    layers = []
    for name, s in scores.items():
        k = kept_count(s.numel(), ratio, round_to)
        keep = torch.argsort(s, stable=True)[s.numel() - k :]
        layers.append(LayerPlan(name, s.numel(), tuple(sorted(keep.tolist()))))
    return FilterPlan(ratio, round_to, tuple(layers))


def apply_filter_plan_(model: nn.Module, plan: FilterPlan) -> nn.Module:
    """Remove the planned filters physically, in place: each conv, its BatchNorm and the next layer's inputs
    shrink (the last conv's removal reaches through the flatten into the first linear layer).

    Example:
        >>> from hybridprune.models import alexnet
        >>> from hybridprune.metrics import ScoringContext, score_filters
        >>> m = alexnet(width=0.25)
        >>> plan = plan_filter_pruning(score_filters("l1", ScoringContext(m)), 0.5, round_to=8)
        >>> apply_filter_plan_(m, plan).spec()["widths"]
        [8, 24, 48, 32, 32]
    """
    device = next(model.parameters()).device
    example = torch.zeros(1, *input_shape(model), device=device)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)
    blocks = dict(conv_blocks(model))
    for layer in plan.layers:
        if layer.name not in blocks or blocks[layer.name].conv.out_channels != layer.original:
            raise HybridPruneError(f"filter plan does not fit the model: layer {layer.name!r} missing or resized")
        keep = set(layer.keep)
        drop = [i for i in range(layer.original) if i not in keep]
        if drop:
            graph.get_pruning_group(blocks[layer.name].conv, tp.prune_conv_out_channels, idxs=drop).prune()
    return model
