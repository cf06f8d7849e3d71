"""How many channels each group keeps: the same fraction everywhere, or a global ranking; at a filter ratio
or at a MAC target.

- `uniform`: every group keeps `1 - ratio` of its channels (rounded to `round_to`).
- `global`: channels compete across groups on normalised scores (each group's scores divided by their mean,
  as Torch-Pruning's global pruning does), and the lowest `ratio` of all go; groups that matter less lose more.

With a MAC target (a fraction of the dense model's MACs), a bisection finds the mildest ratio whose pruned
model needs at most that many MACs, measured on a pruned copy, so the target is met within one `round_to`
step per group.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .errors import HybridPruneError
from .graph import ChannelGroup
from .prune import Scores, apply_filter_plan_, kept_count, plan_filter_pruning

ALLOCATIONS = ("uniform", "global")
BISECTION_STEPS = 14


def counts_at(
    ratio: float, allocation: str, groups: list[ChannelGroup], scores: Scores, round_to: int
) -> dict[str, int]:
    """Channels kept per group when `ratio` of the channels go under `allocation`.

    Example:
        >>> from hybridprune.graph import ChannelGroup
        >>> gs = [ChannelGroup("a", 4, (), ()), ChannelGroup("b", 4, (), ())]
        >>> s = {"a": torch.tensor([1.0, 1, 1, 1]), "b": torch.tensor([0.1, 0.1, 4, 4])}
        >>> counts_at(0.25, "uniform", gs, s, 1), counts_at(0.25, "global", gs, s, 1)
        ({'a': 3, 'b': 3}, {'a': 4, 'b': 2})
    """
    if allocation == "uniform":
        return {g.name: kept_count(g.size, ratio, round_to) for g in groups}
    normalised = {g.name: scores[g.name].double() / scores[g.name].double().mean().clamp_min(1e-12) for g in groups}
    everything = torch.cat(list(normalised.values()))
    drop = int(round(ratio * len(everything)))
    if drop == 0:
        return {g.name: g.size for g in groups}
    threshold = everything.sort().values[drop - 1]  # the last channel that goes
    counts = {}
    for g in groups:
        kept = int((normalised[g.name] > threshold).sum())
        rounded = int(round(kept / round_to)) * round_to
        counts[g.name] = min(g.size, max(round_to, rounded))
    return counts


def macs_after(model: nn.Module, groups: list[ChannelGroup], scores: Scores, counts: dict[str, int]) -> int:
    """MACs per image of a copy of the model pruned to `counts` (the model itself is untouched)."""
    from .stats import layer_macs

    pruned = copy.deepcopy(model)
    apply_filter_plan_(pruned, plan_filter_pruning(scores, 0.0, 1, groups, counts))
    return sum(layer_macs(pruned).values())


def counts_for_target(
    model: nn.Module,
    groups: list[ChannelGroup],
    scores: Scores,
    allocation: str,
    target: float,
    round_to: int,
) -> dict[str, int]:
    """The mildest allocation whose pruned model needs at most `target` x the dense model's MACs."""
    from .stats import layer_macs

    budget = target * sum(layer_macs(model).values())
    low, high, best = 0.0, 0.99, None
    for _ in range(BISECTION_STEPS):
        mid = (low + high) / 2
        counts = counts_at(mid, allocation, groups, scores, round_to)
        if macs_after(model, groups, scores, counts) <= budget:
            best, high = counts, mid
        else:
            low = mid
    if best is None:
        counts = counts_at(high, allocation, groups, scores, round_to)
        if macs_after(model, groups, scores, counts) > budget:
            raise HybridPruneError(
                f"--target-macs {target} cannot be reached with --round-to {round_to} (the smallest model this "
                "allocation can make is larger); raise the target or lower --round-to"
            )
        best = counts
    return best
