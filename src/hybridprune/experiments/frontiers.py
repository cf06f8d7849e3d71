"""Allocations compared at equal measured latency: accuracy-versus-measured-latency frontiers, one per allocation
and seed (its runs at several targets; uniform pruning at several targets or ratios), and each allocation's
accuracy read beside uniform's at the same measured latency by interpolation along uniform's frontier, paired by
seed. Equal targets are not equal latencies: a run lands off its target, uniform pruning in steps (a median 8%
below it on CIFAR-10 at batch 64), so comparing at equal targets credits whichever ran slower.

Pure functions of plain points: nothing here trains or measures.
"""

from __future__ import annotations

from typing import Any

from hybridprune.experiments.statistics import mean_std, paired_test

Frontier = list[tuple[float, float]]  # (measured latency in ms, accuracy), any order


def accuracy_at_latency(frontier: Frontier, latency: float) -> float | None:
    """The accuracy a frontier reaches at `latency`: linear between its measured points, read off its upper
    envelope (a point slower than another but less accurate is dominated: the faster one's accuracy holds), and
    None outside the measured range (no extrapolation).

    Example:
        >>> accuracy_at_latency([(5.0, 70.0), (10.0, 80.0)], 7.5), accuracy_at_latency([(5.0, 70.0)], 6.0)
        (75.0, None)
        >>> accuracy_at_latency([(5.0, 70.0), (8.0, 60.0), (10.0, 80.0)], 9.0)
        75.0
    """
    points = sorted(frontier)
    if not points or not points[0][0] <= latency <= points[-1][0]:
        return None
    envelope, best = [], float("-inf")
    for ms, acc in points:
        best = max(best, acc)
        envelope.append((ms, best))
    for (x0, y0), (x1, y1) in zip(envelope, envelope[1:], strict=False):
        if x0 <= latency <= x1:
            return y0 if x1 == x0 else y0 + (latency - x0) / (x1 - x0) * (y1 - y0)
    return envelope[0][1]


def equal_latency_comparison(points: list[dict[str, Any]], baseline: str = "uniform") -> list[dict[str, Any]]:
    """Each allocation's accuracy minus `baseline`'s at the same measured latency, paired by seed.

    `points`: runs with `metric`, `allocation`, `seed`, `target`, `measured_ms` and `accuracy`. For each run of
    an allocation other than the baseline, the baseline's frontier of the same metric and seed (its runs at every
    target) is read at the run's measured latency. Per (metric, allocation, target): mean measured latency, mean
    accuracy, mean baseline accuracy at those latencies, the paired difference (mean, std, p) over the seeds whose
    baseline frontier covers the latency, and how many did not (outside its measured range).

    Example:
        >>> runs = [{"metric": "l1", "allocation": "uniform", "seed": 0, "target": t, "measured_ms": ms,
        ...          "accuracy": acc} for t, ms, acc in ((0.5, 5.0, 70.0), (0.7, 10.0, 80.0))]
        >>> runs.append({"metric": "l1", "allocation": "global", "seed": 0, "target": 0.6, "measured_ms": 7.5,
        ...              "accuracy": 78.0})
        >>> row = equal_latency_comparison(runs)[0]
        >>> row["baseline_accuracy"], row["difference"], row["pairs"]
        (75.0, 3.0, 1)
    """
    frontiers: dict[tuple, Frontier] = {}
    for p in points:
        if p["allocation"] == baseline:
            frontiers.setdefault((p["metric"], p["seed"]), []).append((p["measured_ms"], p["accuracy"]))
    cells: dict[tuple, list[tuple[dict[str, Any], float | None]]] = {}
    for p in points:
        if p["allocation"] != baseline:
            base = accuracy_at_latency(frontiers.get((p["metric"], p["seed"]), []), p["measured_ms"])
            cells.setdefault((p["metric"], p["allocation"], p["target"]), []).append((p, base))
    rows = []
    for (metric, allocation, target), pairs in sorted(cells.items(), key=lambda kv: tuple(map(str, kv[0]))):
        covered = [(p, b) for p, b in pairs if b is not None]
        row = {"metric": metric, "allocation": allocation, "target": target,
               "measured_ms": mean_std([p["measured_ms"] for p, _ in pairs]),
               "accuracy": mean_std([p["accuracy"] for p, _ in pairs]),
               "baseline_accuracy": None, "difference": None, "std": None, "p": None,
               "pairs": len(covered), "outside": len(pairs) - len(covered)}  # fmt: skip
        if covered:
            mine, base = [p["accuracy"] for p, _ in covered], [b for _, b in covered]
            diff, std, p_value = paired_test(mine, base)
            row |= {"baseline_accuracy": mean_std(base)[0], "difference": diff, "std": std, "p": p_value}
        rows.append(row)
    return rows
