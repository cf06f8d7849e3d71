"""How many channels each group keeps: the same fraction everywhere, or a global ranking; at a filter ratio
or at a MAC target.

- `uniform`: every group keeps `1 - ratio` of its channels (rounded to `round_to`).
- `global`: channels compete across groups on normalised scores (each group's scores divided by their mean,
  as Torch-Pruning's global pruning does), and the lowest `ratio` of all go; groups that matter less lose more.
- `sensitivity`: each group is pruned alone, one-shot, at a few probe ratios, and the accuracy drop on the
  calibration images (training images) is measured (Li et al., ICLR 2017, section 4.1). Every group then
  takes the largest ratio whose drop stays under one shared tolerance, and the tolerance is the smallest
  that removes `ratio` of all channels: sensitive groups lose little, robust ones a lot.

With a MAC target (a fraction of the dense model's MACs), a bisection finds the mildest ratio whose pruned
model needs at most that many MACs, measured on a pruned copy, so the target is met within one `round_to`
step per group.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from hybridprune.config import SENSITIVITY_PROBES
from hybridprune.errors import HybridPruneError
from hybridprune.pruning.graph import ChannelGroup
from hybridprune.pruning.plan import Scores, apply_filter_plan_, group_step, kept_count, plan_filter_pruning

BISECTION_STEPS = 14
TIE_SLOPE = 1e-3  # points of accuracy per unit ratio added to every curve, see `tolerated_ratio`

# group -> [(ratio, accuracy drop in points)], starting at (0, 0); measured by `measure_sensitivity`
Curves = dict[str, list[tuple[float, float]]]


def counts_at(
    ratio: float,
    allocation: str,
    groups: list[ChannelGroup],
    scores: Scores,
    round_to: int,
    curves: Curves | None = None,
) -> dict[str, int]:
    """Channels kept per group when `ratio` of the channels go under `allocation`.

    Example:
        >>> from hybridprune.pruning.graph import ChannelGroup
        >>> gs = [ChannelGroup("a", 4, (), ()), ChannelGroup("b", 4, (), ())]
        >>> s = {"a": torch.tensor([1.0, 1, 1, 1]), "b": torch.tensor([0.1, 0.1, 4, 4])}
        >>> counts_at(0.25, "uniform", gs, s, 1), counts_at(0.25, "global", gs, s, 1)
        ({'a': 3, 'b': 3}, {'a': 4, 'b': 2})
    """
    if allocation == "uniform":
        return {g.name: kept_count(g.size, ratio, group_step(g, round_to)) for g in groups}
    if allocation == "sensitivity":
        if curves is None:
            raise ValueError("sensitivity allocation needs the curves of measure_sensitivity")  # a caller's bug
        return _sensitivity_counts(ratio, groups, curves, round_to)
    normalised = {g.name: scores[g.name].double() / scores[g.name].double().mean().clamp_min(1e-12) for g in groups}
    everything = torch.cat(list(normalised.values()))
    drop = int(round(ratio * len(everything)))
    if drop == 0:
        return {g.name: g.size for g in groups}
    threshold = everything.sort().values[drop - 1]  # the last channel that goes
    counts = {}
    for g in groups:
        kept = int((normalised[g.name] > threshold).sum())
        step = group_step(g, round_to)
        counts[g.name] = min(g.size, max(step, int(round(kept / step)) * step))
    return counts


def macs_after(
    model: nn.Module,
    groups: list[ChannelGroup],
    scores: Scores,
    counts: dict[str, int],
    example: torch.Tensor | None = None,
) -> int:
    """MACs per image of a copy of the model pruned to `counts` (the model itself is untouched); `example`: a
    batch a plain module takes."""
    from hybridprune.models.counts import layer_macs

    pruned = copy.deepcopy(model)
    apply_filter_plan_(pruned, plan_filter_pruning(scores, 0.0, 1, groups, counts), example)
    return sum(layer_macs(pruned, example).values())


def counts_for_target(
    model: nn.Module,
    groups: list[ChannelGroup],
    scores: Scores,
    allocation: str,
    target: float,
    round_to: int,
    curves: Curves | None = None,
    example: torch.Tensor | None = None,
) -> dict[str, int]:
    """The mildest allocation whose pruned model needs at most `target` x the dense model's MACs; `example`: a
    batch a plain module takes."""
    from hybridprune.models.counts import layer_macs

    budget = target * sum(layer_macs(model, example).values())
    low, high, best = 0.0, 0.99, None
    for _ in range(BISECTION_STEPS):
        mid = (low + high) / 2
        counts = counts_at(mid, allocation, groups, scores, round_to, curves)
        if macs_after(model, groups, scores, counts, example) <= budget:
            best, high = counts, mid
        else:
            low = mid
    if best is None:
        counts = counts_at(high, allocation, groups, scores, round_to, curves)
        if macs_after(model, groups, scores, counts, example) > budget:
            raise HybridPruneError(
                f"--target-macs {target} cannot be reached with --round-to {round_to} (the smallest model this "
                "allocation can make is larger); raise the target or lower --round-to"
            )
        best = counts
    return best


def measure_sensitivity(
    model: nn.Module,
    groups: list[ChannelGroup],
    scores: Scores,
    images: list[torch.Tensor],
    labels: list[torch.Tensor],
    round_to: int,
    probes: tuple[float, ...] = SENSITIVITY_PROBES,
) -> Curves:
    """Per group, the top-1 accuracy drop (points) on `images` when that group alone loses its lowest-scored
    channels at each probe ratio, one-shot (no fine-tuning, no BatchNorm recalibration), on pruned copies."""
    if not labels:
        raise HybridPruneError("sensitivity allocation measures accuracy: give calibration images and their labels")
    base = _accuracy(model, images, labels)
    curves: Curves = {}
    for g in groups:
        curve = [(0.0, 0.0)]
        for ratio in probes:
            counts = {h.name: h.size for h in groups} | {g.name: kept_count(g.size, ratio, group_step(g, round_to))}
            if counts[g.name] == g.size:  # rounding keeps every channel: nothing to measure
                curve.append((ratio, curve[-1][1]))
                continue
            pruned = copy.deepcopy(model)
            apply_filter_plan_(pruned, plan_filter_pruning(scores, 0.0, 1, groups, counts), images[0])
            curve.append((ratio, base - _accuracy(pruned, images, labels)))
        curves[g.name] = curve
    return curves


@torch.no_grad()
def _accuracy(model: nn.Module, images: list[torch.Tensor], labels: list[torch.Tensor]) -> float:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = sum(
        int((model(x.to(device)).argmax(1) == y.to(device)).sum()) for x, y in zip(images, labels, strict=True)
    )
    model.train(was_training)
    return 100.0 * correct / sum(len(y) for y in labels)


def tolerated_ratio(curve: list[tuple[float, float]], tolerance: float) -> float:
    """The largest ratio on a sensitivity curve whose drop stays within `tolerance`, interpolating linearly.

    The curve is read as its running maximum (a drop that dips at a larger ratio is noise, not a licence)
    plus a slope of TIE_SLOPE points per unit ratio, so flat stretches (groups pruning does not hurt at all on
    the probe images) are shared out evenly as the tolerance grows instead of all taken at a tolerance of 0.

    Example:
        >>> round(tolerated_ratio([(0, 0), (0.2, 1.0), (0.4, 3.0), (0.6, 2.0)], 2.0), 3)
        0.3
    """
    points, worst = [], 0.0
    for r, d in curve:
        worst = max(worst, d)
        points.append((r, worst + TIE_SLOPE * r))
    for (r1, d1), (r2, d2) in zip(points, points[1:], strict=False):
        if d2 > tolerance:
            return r1 + (r2 - r1) * max(0.0, tolerance - d1) / (d2 - d1)
    return points[-1][0]


def _sensitivity_counts(ratio: float, groups: list[ChannelGroup], curves: Curves, round_to: int) -> dict[str, int]:
    """Channels kept per group at the smallest shared tolerance that removes `ratio` of all channels (or as
    near as the largest probe ratio allows)."""
    total = sum(g.size for g in groups)

    def counts(tolerance: float) -> dict[str, int]:
        return {
            g.name: kept_count(g.size, tolerated_ratio(curves[g.name], tolerance), group_step(g, round_to))
            for g in groups
        }

    def removed(c: dict[str, int]) -> float:
        return 1 - sum(c.values()) / total

    low, high = 0.0, max(d for c in curves.values() for _, d in c) + 1.0
    if removed(counts(high)) < ratio:
        return counts(high)
    for _ in range(40):
        mid = (low + high) / 2
        low, high = (low, mid) if removed(counts(mid)) >= ratio else (mid, high)
    return counts(high)
