"""Latency-target allocation: each group's kept count, and each layer's 2:4 on or off, that keep the most
importance within a predicted latency budget (a knapsack, as in HALP, NeurIPS 2022).

Each group g chooses a kept count k_g among its candidates (multiples of the table's step); its value V_g(k_g)
is the importance it keeps: the chosen metric's scores normalised by their mean, as in global allocation (the
sum of its k_g best), or, under sensitivity allocation, minus the accuracy drop its curve gives at that ratio.
Uniform allocation trades nothing: `solve_uniform` keeps the same fraction of every group, the largest that fits.
A layer's latency depends on the counts of the group that sets its output and the groups that feed its input,
so the budget couples neighbouring groups and the problem is not a plain knapsack. The solver:

- is exact when the product of the groups' candidate counts is at most EXACT_LIMIT: it enumerates them all;
- otherwise starts from the dense model and repeatedly takes the move, one group down to any lower candidate,
  that loses the least value per millisecond saved (predicted with every coupled layer's entry, so plateaus
  where a few channels save nothing are crossed by larger moves), until the budget holds; then it spends the
  slack on the moves up that gain the most value per millisecond. This is greedy: close, not proven optimal.

Among answers of equal value both keep the one closest to the budget (more channels for the same importance:
sensitivity curves are flat where pruning costs no measured accuracy).

With an in-context model (`Budget.context`, `pruning.latency_context`: whole-graph measurements, what the tables
of version 3 hold) a model's latency is its prediction, plus, for the layers that run 2:4, their 2:4 entry minus
their dense entry; without one, the rest of the network plus every layer's entry (the per-layer path).

2:4 is decided per layer from the table (`nm_rule`): `auto` runs a layer 2:4 where its 2:4 entry beats dense by
NM_PAYS_MARGIN at the chosen counts; `all` puts masks on every eligible layer (their 2:4 entries, where the
device has a kernel, else dense time); `none` leaves every layer dense.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from hybridprune.config import NM_PAYS_MARGIN
from hybridprune.errors import HybridPruneError
from hybridprune.pruning.graph import ChannelGroup
from hybridprune.pruning.latency import LatencyTable, LayerCoupling, Setup
from hybridprune.pruning.latency_context import ContextModel

EXACT_LIMIT = 20_000

Values = dict[str, dict[int, float]]  # group -> kept count -> value kept


@dataclass(frozen=True)
class Budget:
    """What the solver works against: the table and setup, the rest of the network, the budget in ms."""

    table: LatencyTable
    setup: Setup
    rest_ms: float
    budget_ms: float
    nm_rule: str = "all"  # all | auto | none
    nm_layers: frozenset[str] = frozenset()  # layers that can take 2:4 masks
    context: ContextModel | None = None  # whole-graph measurements in context: the prediction, when present


@dataclass(frozen=True)
class Allocation:
    """The solver's answer: counts, the layers that run 2:4, predicted latency, value kept, and how it was found."""

    counts: dict[str, int]
    sparse: frozenset[str]
    predicted_ms: float
    value: float
    exact: bool


def importance_values(
    groups: list[ChannelGroup], scores: dict[str, torch.Tensor], candidates: dict[str, list[int]]
) -> Values:
    """Value of keeping k channels of a group: the sum of its k best scores, each divided by the group's mean
    score (as global allocation normalises), so groups compare on one scale.

    Example:
        >>> g = ChannelGroup("a", 4, (), ())
        >>> importance_values([g], {"a": torch.tensor([1.0, 1, 3, 3])}, {"a": [2, 4]})
        {'a': {2: 3.0, 4: 4.0}}
    """
    values = {}
    for g in groups:
        s = scores[g.name].double()
        ranked = (s / s.mean().clamp_min(1e-12)).sort(descending=True).values
        values[g.name] = {k: float(ranked[:k].sum()) for k in candidates[g.name]}
    return values


def sensitivity_values(groups: list[ChannelGroup], curves: dict, candidates: dict[str, list[int]]) -> Values:
    """Value of keeping k channels: minus the accuracy drop (points) the group's sensitivity curve gives at ratio
    1 - k/size (linear between probes, its running maximum, as sensitivity allocation reads it)."""
    values = {}
    for g in groups:
        points = sorted(curves[g.name])
        worst = list(itertools.accumulate((d for _, d in points), max))
        ratios = [r for r, _ in points]
        values[g.name] = {k: -_linear(ratios, worst, 1 - k / g.size) for k in candidates[g.name]}
    return values


def _linear(xs: list[float], ys: list[float], x: float) -> float:
    for (x0, y0), (x1, y1) in itertools.pairwise(zip(xs, ys, strict=True)):
        if x <= x1:
            return y0 if x1 == x0 else y0 + (x - x0) / (x1 - x0) * (y1 - y0)
    return ys[-1] + (x - xs[-1]) * 1e3  # beyond the largest probe: never worth it


def layer_time(coupling: LayerCoupling, counts: dict[str, int], budget: Budget) -> tuple[float, bool]:
    """A layer's predicted time at `counts`, and whether it runs 2:4 under the budget's nm rule."""
    s, shape = budget.setup, coupling.shape(counts)
    dense = budget.table.lookup(shape, s.batch, s.dtype, s.runtime, "dense")
    if dense is None:
        raise HybridPruneError(f"the latency table has no entry near {coupling.name} at {shape.c_in}x{shape.c_out} "
                               "channels; profile the model again with the same --latency-step")  # fmt: skip
    if budget.nm_rule == "none" or coupling.name not in budget.nm_layers:
        return dense, False
    sparse = budget.table.lookup(shape, s.batch, s.dtype, s.runtime, "2:4")
    if budget.nm_rule == "all":
        return (dense if sparse is None else sparse), True
    pays = sparse is not None and sparse <= dense * (1 - NM_PAYS_MARGIN)
    return (sparse if pays else dense), pays


def sparse_time(coupling: LayerCoupling, counts: dict[str, int], budget: Budget) -> tuple[float, bool]:
    """With an in-context model: what running this layer 2:4 adds (its 2:4 entry minus its dense one, <= 0 where
    it pays), and whether it runs 2:4 under the nm rule; layers without a dense entry (no 2:4 kernel) add 0."""
    if budget.nm_rule == "none" or coupling.name not in budget.nm_layers:
        return 0.0, False
    s, shape = budget.setup, coupling.shape(counts)
    dense = budget.table.lookup(shape, s.batch, s.dtype, s.runtime, "dense")
    sparse = budget.table.lookup(shape, s.batch, s.dtype, s.runtime, "2:4")
    if dense is None or sparse is None:
        return 0.0, budget.nm_rule == "all"
    if budget.nm_rule == "all":
        return sparse - dense, True
    pays = sparse <= dense * (1 - NM_PAYS_MARGIN)
    return (sparse - dense if pays else 0.0), pays


def predict(couplings: list[LayerCoupling], counts: dict[str, int], budget: Budget) -> tuple[float, frozenset[str]]:
    """Predicted model latency at `counts` (in context, or the rest of the network plus every layer), and the
    layers run 2:4."""
    if budget.context is not None:
        total, sparse = budget.context.predict(counts), set()
        if not budget.table.entries:  # no per-layer entries: no layer has a 2:4 kernel measured on this device
            on = {c.name for c in couplings if c.name in budget.nm_layers} if budget.nm_rule == "all" else set()
            return total, frozenset(on)
        for c in couplings:
            t, on = sparse_time(c, counts, budget)
            total += t
            if on:
                sparse.add(c.name)
        return max(total, 0.0), frozenset(sparse)
    total, sparse = budget.rest_ms, set()
    for c in couplings:
        t, on = layer_time(c, counts, budget)
        total += t
        if on:
            sparse.add(c.name)
    return total, frozenset(sparse)


def solve(couplings: list[LayerCoupling], values: Values, budget: Budget) -> Allocation:
    """The counts (and 2:4 layers) that keep the most value within `budget.budget_ms`; one line if none can.

    Example:
        >>> from hybridprune.pruning.latency import Entry, LayerShape
        >>> t = LatencyTable("cpu")
        >>> for k in (2, 4):
        ...     t.add(LayerShape("linear", k, 4).key(1, "float32", "torch", "dense"), Entry(k, k, k, 1))
        >>> c = [LayerCoupling("fc", LayerShape("linear", 4, 4), None, 4, (("g", 4, 4),))]
        >>> a = solve(c, {"g": {2: 1.0, 4: 2.0}}, Budget(t, Setup("torch", 1, "float32"), 0.0, 3.0))
        >>> a.counts, a.predicted_ms, a.exact
        ({'g': 2}, 2.0, True)
    """
    groups = sorted(values)
    if math.prod(len(values[g]) for g in groups) <= EXACT_LIMIT:
        return _enumerate(couplings, values, budget, groups)
    return _greedy(couplings, values, budget, groups)


def solve_uniform(couplings: list[LayerCoupling], candidates: dict[str, list[int]], budget: Budget) -> Allocation:
    """The same kept fraction f of every group (each count the candidate nearest f x size), the largest f whose
    predicted latency fits `budget.budget_ms`: uniform allocation at the ratio the budget allows. Exact over f:
    the counts change only where f x size crosses a midpoint between two candidates, so every fraction at and
    just below each such point is tried, from the largest down (`value` is the fraction kept).

    Example:
        >>> from hybridprune.pruning.latency import Entry, LayerShape
        >>> t = LatencyTable("cpu")
        >>> for k in (2, 4):
        ...     t.add(LayerShape("linear", k, 4).key(1, "float32", "torch", "dense"), Entry(k, k, k, 1))
        >>> c = [LayerCoupling("fc", LayerShape("linear", 4, 4), None, 4, (("g", 4, 4),))]
        >>> solve_uniform(c, {"g": [2, 4]}, Budget(t, Setup("torch", 1, "float32"), 0.0, 3.0)).counts
        {'g': 2}
    """
    points = {(a + b) / 2 / max(ks) for ks in candidates.values() for a, b in itertools.pairwise(sorted(ks))}
    fractions = sorted({1.0, 0.0, *points, *(p - 1e-9 for p in points)}, reverse=True)
    fastest, seen = math.inf, set()
    for f in fractions:
        counts = {g: min(ks, key=lambda k: (abs(k - f * max(ks)), -k)) for g, ks in candidates.items()}
        if (key := tuple(sorted(counts.items()))) in seen:
            continue
        seen.add(key)
        time, sparse = predict(couplings, counts, budget)
        fastest = min(fastest, time)
        if time <= budget.budget_ms:
            return Allocation(counts, sparse, time, f, exact=True)
    raise _unreachable(budget, fastest)


def _unreachable(budget: Budget, fastest: float) -> HybridPruneError:
    return HybridPruneError(
        f"the latency target ({budget.budget_ms:.3f} ms predicted) cannot be reached: the fastest model the candidate "
        f"counts allow predicts {fastest:.3f} ms ({_floor_note(budget)}); raise --target-latency"
    )


def _floor_note(budget: Budget) -> str:
    if budget.context is not None:
        return f"the smallest model measured {budget.context.record.floor.median_ms:.3f} ms in context"
    return f"of which {budget.rest_ms:.3f} ms is the rest of the network; or lower --latency-step"


def _enumerate(couplings: list[LayerCoupling], values: Values, budget: Budget, groups: list[str]) -> Allocation:
    best, fastest = None, math.inf
    for combo in itertools.product(*(sorted(values[g]) for g in groups)):
        counts = dict(zip(groups, combo, strict=True))
        value = sum(values[g][k] for g, k in counts.items())
        time, sparse = predict(couplings, counts, budget)
        fastest = min(fastest, time)
        if time <= budget.budget_ms and (best is None or (value, time) > (best[0], best[1])):
            best = (value, time, counts, sparse)
    if best is None:
        raise _unreachable(budget, fastest)
    value, time, counts, sparse = best
    return Allocation(counts, sparse, time, value, exact=True)


def _greedy(couplings: list[LayerCoupling], values: Values, budget: Budget, groups: list[str]) -> Allocation:
    touching = {g: [c for c in couplings if c.out_group == g or any(p[0] == g for p in c.in_parts)] for g in groups}
    counts = {g: max(values[g]) for g in groups}
    time = predict(couplings, counts, budget)[0]

    def delta(g: str, k: int) -> tuple[float, float]:  # (value change, time change) of moving g to k
        moved = {**counts, g: k}
        if budget.context is not None:  # whole-model prediction: cheap, and its interactions are not per layer
            dt = predict(couplings, moved, budget)[0] - predict(couplings, counts, budget)[0]
        else:
            dt = sum(layer_time(c, moved, budget)[0] - layer_time(c, counts, budget)[0] for c in touching[g])
        return values[g][k] - values[g][counts[g]], dt

    while time > budget.budget_ms:  # down: least value lost per ms saved
        moves = [(-dv / -dt, g, k, dt) for g in groups for k in values[g] if k < counts[g]
                 for dv, dt in [delta(g, k)] if dt < 0]  # fmt: skip
        if not moves:
            break
        _, g, k, dt = min(moves)
        counts[g], time = k, time + dt
    if time > budget.budget_ms:  # no single move saves time any more: the smallest model, if it fits
        smallest = {g: min(values[g]) for g in groups}
        floor = predict(couplings, smallest, budget)[0]
        if floor > budget.budget_ms:
            raise _unreachable(budget, min(time, floor))
        counts, time = smallest, floor
    while True:  # up: spend the slack where it buys the most value per ms (at equal value: more channels)
        moves = [(dv / max(dt, 1e-9), g, k, dt) for g in groups for k in values[g] if k > counts[g]
                 for dv, dt in [delta(g, k)] if dv >= 0 and time + dt <= budget.budget_ms]  # fmt: skip
        if not moves:
            break
        _, g, k, dt = max(moves)
        counts[g], time = k, time + dt
    time, sparse = predict(couplings, counts, budget)
    return Allocation(dict(counts), sparse, time, sum(values[g][counts[g]] for g in groups), exact=False)
