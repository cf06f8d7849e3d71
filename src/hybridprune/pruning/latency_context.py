"""Latency measured in context: the whole model as the runtime runs it, with one channel group (or one coupled
pair of groups) pruned at a time, and a pruned model's latency predicted from those measurements.

A layer timed alone is not the layer in the graph: runtimes fuse conv + BatchNorm + activation (+ add), keep a
blocked channel layout between convs (8 or 16 channels a block on x86) and reorder where counts break it, and
pay overheads per graph. So the unit measured here is the whole exported graph, and what a group's pruning
costs or saves is a difference of whole-graph latencies, paid where it occurs (NetAdapt, ECCV 2018, measures
whole networks; nn-Meter, MobiSys 2021, times the runtime's fused kernels). With the model's latency a sum of
fused units, each depending on the counts of the groups that set its input and output (`LayerCoupling`), a
second-order expansion around the dense model is exact:

    T(counts) = T_dense + sum_g D_g(k_g) + sum_(g,h) I_gh(k_g, k_h)

with D_g(k) = T(only g at k) - T_dense and I_gh(a, b) = T(g at a, h at b) - D_g(a) - D_h(b) - T_dense, the
interaction of two groups that meet in one layer (its input and output, or two parts of a concatenation): a conv
whose input and output both shrink saves less than the two savings added, since its work is their product.
Everything the entries do not cover (pooling, adds, reorders, per-graph overhead) stays inside the measured
whole, so nothing is a constant fitted to the dense model alone. A prediction is never below the measured
latency of the smallest model the candidates allow (every group at its smallest count), so it is never
negative, and never claims more than the device delivered.

Latency is a step function of channel counts: `find_block` reads the block size at which it moves from a sweep,
and a count inside a step is read as the step's upper boundary (the runtime pads it there), never interpolated
into a saving. Between measured boundaries (groups with more boundaries than `points`) the reading is linear.
This module is data and arithmetic; measuring is `deploy.profile_context`.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

from hybridprune.errors import HybridPruneError
from hybridprune.pruning.latency import Entry, LatencyTable, LayerCoupling, read_entry

BLOCKS = (4, 8, 16, 32)  # block sizes `find_block` considers
BLOCK_TOLERANCE = 0.05  # a block holds when rounding a count up to it costs at most this (median over blocks)
DEFAULT_STEP = 4  # candidates when no block is found: latency moves with every count the sweep measured


def find_block(counts: list[int], times: list[float], tolerance: float = BLOCK_TOLERANCE) -> int:
    """The largest block b (of BLOCKS) at which latency moves: a count halfway into a block runs no faster than
    the block's boundary (their time ratio, median over the blocks of the sweep, at most 1 + `tolerance`), so
    counts inside a block buy nothing. Counts off the blocks are often slower than the boundary above them (the
    runtime pads and reorders), which is why the halfway counts, not all counts, are the test. DEFAULT_STEP when
    no block holds.

    Example:
        >>> ks = list(range(2, 65, 2))
        >>> find_block(ks, [1.0 + -(-k // 16) for k in ks]), find_block(ks, [float(k) for k in ks])
        (16, 4)
    """
    at = dict(zip(counts, times, strict=True))
    best = DEFAULT_STEP
    for b in BLOCKS:
        ratios = [at[k + b // 2] / at[k] for k in counts if k % b == b // 2 and k + b // 2 in at and at[k] > 0]
        if len(ratios) >= 2 and _median(ratios) <= 1 + tolerance:
            best = max(best, b)
    return best


def _median(values: list[float]) -> float:
    s = sorted(values)
    return (s[(len(s) - 1) // 2] + s[len(s) // 2]) / 2


def boundary_counts(size: int, step: int) -> list[int]:
    """Kept counts a group may take: multiples of `step` up to `size`, and `size` itself.

    Example:
        >>> boundary_counts(40, 16), boundary_counts(12, 16)
        ([16, 32, 40], [12])
    """
    return sorted({*range(step, size + 1, step), size})


def coupled_pairs(couplings: list[LayerCoupling]) -> list[tuple[str, str]]:
    """Pairs of groups that meet in one layer (input and output, or two inputs), each once, sorted.

    Example:
        >>> from hybridprune.pruning.latency import LayerShape
        >>> c = LayerCoupling("l", LayerShape("conv", 8, 8, 4, 4), "b", 8, (("a", 8, 8),))
        >>> coupled_pairs([c])
        [('a', 'b')]
    """
    pairs = set()
    for c in couplings:
        touched = {g for g, _, _ in c.in_parts} | ({c.out_group} if c.out_group else set())
        pairs |= {(a, b) for a in touched for b in touched if a < b}
    return sorted(pairs)


def context_variants(
    sizes: dict[str, int], couplings: list[LayerCoupling], step: int, points: int, pair_points: int,
    group_steps: dict[str, int] | None = None,
) -> list[dict[str, int]]:
    """The models to measure (group -> kept count, others dense): each group alone at `points` of its candidate
    counts below its size, each coupled pair at `pair_points` x `pair_points` of those, and last the smallest
    model (every group at its smallest candidate).

    Example:
        >>> from hybridprune.pruning.latency import LayerShape
        >>> c = [LayerCoupling("l", LayerShape("conv", 32, 32, 4, 4), "b", 32, (("a", 32, 32),))]
        >>> context_variants({"a": 32, "b": 32}, c, 16, 5, 2)
        [{'a': 16}, {'b': 16}, {'a': 16, 'b': 16}, {'a': 16, 'b': 16}]
    """
    steps = {g: (group_steps or {}).get(g, step) for g in sizes}
    single = {g: sampled(boundary_counts(n, steps[g])[:-1], points) for g, n in sizes.items()}
    grid = {g: sampled(ks, pair_points) for g, ks in single.items()}
    variants = [{g: k} for g, ks in single.items() for k in ks]
    variants += [{g: a, h: b} for g, h in coupled_pairs(couplings) if g in sizes and h in sizes
                 for a in grid[g] for b in grid[h]]  # fmt: skip
    return [*variants, {g: boundary_counts(n, steps[g])[0] for g, n in sizes.items()}]


@dataclass
class ContextRecord:
    """One model's in-context measurements on one setup (runtime, batch, dtype): whole-graph latencies of the
    dense model, of the smallest one (`floor`), of each group alone at sampled counts, and of coupled pairs.
    Variant latencies are normalised to the dense median by their ratio to the dense model timed in the same
    interleaved rounds, so a machine that slows down for a while does not move them."""

    sizes: dict[str, int]
    step: int  # candidates are multiples of it
    block: int  # the device's block size found by the sweep (the step unless forced)
    dense: Entry
    floor: Entry
    single: dict[str, dict[int, Entry]] = field(default_factory=dict)
    pairs: dict[tuple[str, str], dict[tuple[int, int], Entry]] = field(default_factory=dict)
    group_steps: dict[str, int] = field(default_factory=dict)  # groups whose counts need a coarser step (grouped convs)

    def candidates(self, group: str) -> list[int]:
        return boundary_counts(self.sizes[group], self.group_steps.get(group, self.step))

    @classmethod
    def of(cls, sizes: dict[str, int], step: int, block: int, variants: list[dict[str, int]], dense: Entry,
           measured: list[Entry], group_steps: dict[str, int] | None = None) -> ContextRecord:  # fmt: skip
        """The record of `context_variants`' models and their measured latencies (the last: the smallest model)."""
        record = cls(sizes, step, block, dense, measured[-1], group_steps={
            g: s for g, s in (group_steps or {}).items() if s != step})  # fmt: skip
        for counts, entry in zip(variants[:-1], measured[:-1], strict=True):
            (g, a), *rest = counts.items()
            if rest:
                record.pairs.setdefault((g, rest[0][0]), {})[(a, rest[0][1])] = entry
            else:
                record.single.setdefault(g, {})[a] = entry
        return record

    def to_dict(self) -> dict[str, Any]:
        return {
            "sizes": self.sizes, "step": self.step, "block": self.block, "group_steps": self.group_steps,
            "dense": _entry_dict(self.dense), "floor": _entry_dict(self.floor),
            "single": {g: {str(k): _entry_dict(e) for k, e in sorted(v.items())} for g, v in self.single.items()},
            "pairs": {f"{g}|{h}": {f"{a}x{b}": _entry_dict(e) for (a, b), e in sorted(v.items())}
                      for (g, h), v in self.pairs.items()},
        }  # fmt: skip


def _entry_dict(e: Entry) -> dict[str, Any]:
    return {"median_ms": e.median_ms, "p10_ms": e.p10_ms, "p90_ms": e.p90_ms, "repeats": e.repeats}


def context_record(table: LatencyTable, key: str) -> ContextRecord | None:
    """The table's in-context record for `key` (a model on a setup, `deploy.profile.rest_key`), checked, or None."""
    raw = table.models.get(key)
    return None if raw is None else record_from_dict(raw, f"latency table record {key!r}")


def record_from_dict(raw: Any, where: str) -> ContextRecord:
    """A record read back from a table's JSON; every problem is one line."""

    def entry(value: Any, name: str) -> Entry:
        return read_entry(value, name)

    try:
        sizes = {str(g): int(n) for g, n in raw["sizes"].items()}
        single = {g: {int(k): entry(e, f"{where} {g}={k}") for k, e in v.items()} for g, v in raw["single"].items()}
        pairs = {}
        for gh, grid in raw["pairs"].items():
            g, h = gh.split("|")
            pairs[(g, h)] = {tuple(int(c) for c in ab.split("x")): entry(e, f"{where} {gh}={ab}")
                             for ab, e in grid.items()}  # fmt: skip
        record = ContextRecord(sizes, int(raw["step"]), int(raw["block"]), entry(raw["dense"], f"{where} dense"),
                               entry(raw["floor"], f"{where} floor"), single, pairs,
                               {str(g): int(n) for g, n in raw.get("group_steps", {}).items()})  # fmt: skip
    except HybridPruneError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise HybridPruneError(f"{where} is not an in-context record ({type(e).__name__}): profile again") from None
    unknown = [g for g in [*single, *(x for p in pairs for x in p)] if g not in sizes]
    if unknown or record.dense.median_ms <= 0 or record.floor.median_ms <= 0 or record.step < 1:
        raise HybridPruneError(f"{where}: groups, dense or floor latency or step out of range: profile again")
    return record


RIDGE = 0.1  # pull of the fitted unit costs towards the MAC-proportional ones, relative to the data's scale


def unit_work(coupling: LayerCoupling, counts: dict[str, int], block: int) -> float:
    """A fused unit's work at `counts`: its MACs with channel counts padded up to the device's block, as the
    runtime's blocked layout pads them (per image)."""
    s = coupling.shape(counts)
    c_in, c_out = (-(-c // block) * block for c in (s.c_in, s.c_out))
    per_group = c_in if s.groups == 1 else max(1, s.c_in // s.groups)
    h, w = (s.h // s.stride[0], s.w // s.stride[1]) if s.kind == "conv" else (1, 1)
    return float(per_group * c_out * s.kernel[0] * s.kernel[1] * max(1, h) * max(1, w))


def fit_units(record: ContextRecord, couplings: list[LayerCoupling]) -> dict[str, float]:
    """Each fused unit's in-context cost at dense counts (ms), fitted to every whole-model measurement of the
    record: latency(v) - latency(dense) = sum_l w_l (work_l(v) / work_l(dense) - 1), least squares with a ridge
    towards MAC-proportional costs, w >= 0. One measurement carries the noise of the whole model; a fit over all
    of them averages it, where the exact expansion adds one noisy difference per group and pair."""
    import torch

    variants = [({g: k}, e) for g, ks in record.single.items() for k, e in ks.items()]
    variants += [({g: a, h: b}, e) for (g, h), grid in record.pairs.items() for (a, b), e in grid.items()]
    variants.append(({g: record.candidates(g)[0] for g in record.sizes}, record.floor))
    dense = [unit_work(c, {}, record.block) or 1.0 for c in couplings]
    a = torch.tensor([[unit_work(c, v, record.block) / d - 1 for c, d in zip(couplings, dense, strict=True)]
                      for v, _ in variants], dtype=torch.float64)  # fmt: skip
    y = torch.tensor([e.median_ms - record.dense.median_ms for _, e in variants], dtype=torch.float64)
    share = torch.tensor(dense, dtype=torch.float64) / sum(dense)
    x = a @ share
    scale = float((x @ y) / (x @ x).clamp_min(1e-12)) if len(variants) else 0.0
    prior = share * max(scale, 0.0)
    # no variant changes any unit's padded work (every candidate inside one block): the prior alone, not a
    # singular system
    lam = max(RIDGE * float((a * a).sum()) / max(1, len(couplings)), 1e-12)
    w = torch.linalg.solve(a.T @ a + lam * torch.eye(len(couplings), dtype=torch.float64), a.T @ y + lam * prior)
    return {c.name: max(0.0, float(v)) for c, v in zip(couplings, w, strict=True)}


class ContextModel:
    """Predicted latency of a model at any kept counts, from its in-context record: with `couplings`, the fitted
    unit costs (`fit_units`, the default); without, the exact second-order expansion.

    Example:
        >>> e = lambda t: Entry(t, t, t, 1)
        >>> r = ContextRecord({"a": 32, "b": 32}, 16, 16, e(10.0), e(4.0), {"a": {16: e(8.0)}, "b": {16: e(7.0)}},
        ...                   {("a", "b"): {(16, 16): e(6.0)}})
        >>> m = ContextModel(r)
        >>> m.predict({"a": 16}), m.predict({"a": 16, "b": 16}), m.predict({"a": 20})
        (8.0, 6.0, 10.0)
    """

    def __init__(self, record: ContextRecord, couplings: list[LayerCoupling] | None = None) -> None:
        self.record = record
        self.couplings = couplings
        self.units = fit_units(record, couplings) if couplings else None
        self._dense_work = {c.name: unit_work(c, {}, record.block) or 1.0 for c in couplings or ()}
        self._cache: dict[tuple, float] = {}
        self._works: dict[tuple, float] = {}

    def single(self, group: str, count: int) -> float:
        """Whole-model latency with only `group` at `count` (its step's boundary; linear between boundaries
        that were sampled out)."""
        r = self.record
        size = r.sizes[group]
        k = self.boundary(group, count)
        if k >= size:
            return r.dense.median_ms
        measured = {c: e.median_ms for c, e in r.single.get(group, {}).items()} | {size: r.dense.median_ms}
        return _linear(measured, k)

    def interaction(self, g: str, h: str, a: int, b: int) -> float:
        """The pair's interaction at counts (a, b): bilinear over its measured grid, zero at either dense count."""
        r = self.record
        grid = r.pairs.get((g, h))
        a, b = self.boundary(g, a), self.boundary(h, b)
        if not grid or a >= r.sizes[g] or b >= r.sizes[h]:
            return 0.0
        base = r.dense.median_ms
        values = {(x, y): e.median_ms - self.single(g, x) - self.single(h, y) + base for (x, y), e in grid.items()}
        xs = sorted({x for x, _ in grid} | {r.sizes[g]})
        ys = sorted({y for _, y in grid} | {r.sizes[h]})

        def at(x: int, y: int) -> float:
            return 0.0 if x >= r.sizes[g] or y >= r.sizes[h] else values.get((x, y), 0.0)

        (x0, x1, u), (y0, y1, v) = _bracket(xs, a), _bracket(ys, b)
        return (1 - u) * ((1 - v) * at(x0, y0) + v * at(x0, y1)) + u * ((1 - v) * at(x1, y0) + v * at(x1, y1))

    def boundary(self, group: str, count: int) -> int:
        """The count the device runs `count` as: the next candidate at or above it (a step's upper boundary)."""
        cands = self.record.candidates(group)
        i = bisect.bisect_left(cands, count)
        return cands[min(i, len(cands) - 1)]

    def fitted(self, counts: dict[str, int]) -> float:
        """The fitted unit model itself, before the floor: dense plus each unit's cost times its change of work."""
        if self.units is None:
            return self.expansion(counts)
        return self.record.dense.median_ms + sum(
            self.units[c.name] * (self._work(c, counts) / self._dense_work[c.name] - 1) for c in self.couplings
        )

    def _work(self, c: LayerCoupling, counts: dict[str, int]) -> float:
        key = (c.name, counts.get(c.out_group), *(counts.get(g) for g, _, _ in c.in_parts))
        if key not in self._works:  # the solver asks for the same layer at the same counts many times
            self._works[key] = unit_work(c, counts, self.record.block)
        return self._works[key]

    def expansion(self, counts: dict[str, int]) -> float:
        """The second-order expansion itself, before the floor (for checks)."""
        r = self.record
        full = {g: min(counts.get(g, n), n) for g, n in r.sizes.items()}
        total = r.dense.median_ms
        total += sum(self.single(g, k) - r.dense.median_ms for g, k in full.items() if k < r.sizes[g])
        total += sum(self.interaction(g, h, full[g], full[h]) for g, h in r.pairs)
        return total

    def predict(self, counts: dict[str, int]) -> float:
        """Predicted latency (ms): the expansion, never below the smallest model's measured latency."""
        key = tuple(sorted((g, self.boundary(g, k)) for g, k in counts.items() if g in self.record.sizes))
        if key not in self._cache:
            self._cache[key] = max(self.fitted(dict(key)), self.record.floor.median_ms)
        return self._cache[key]

    def indistinguishable(self, candidates: dict[str, list[int]]) -> dict[str, list[int]]:
        """Per group, the candidate counts the table cannot tell from a larger one: inside one of the device's
        blocks (a forced step finer than the block), they run as the block's boundary does."""
        block = self.record.block
        return {g: [k for k in ks if k % block and k < self.record.sizes[g] and -(-k // block) * block in ks]
                for g, ks in candidates.items() if g in self.record.sizes}  # fmt: skip


def _linear(points: dict[int, float], x: int) -> float:
    xs = sorted(points)
    lo, hi, u = _bracket(xs, x)
    return points[lo] + u * (points[hi] - points[lo])


def _bracket(xs: list[int], x: int) -> tuple[int, int, float]:
    """The neighbours of x among sorted xs and x's fraction between them (clamped to the ends)."""
    if x <= xs[0]:
        return xs[0], xs[0], 0.0
    if x >= xs[-1]:
        return xs[-1], xs[-1], 0.0
    i = bisect.bisect_left(xs, x)
    if xs[i] == x:
        return x, x, 0.0
    lo, hi = xs[i - 1], xs[i]
    return lo, hi, (x - lo) / (hi - lo)


def sampled(values: list[int], points: int) -> list[int]:
    """At most `points` of sorted `values`, evenly spaced, both ends included (all when fewer).

    Example:
        >>> sampled([16, 32, 48, 64, 80], 3)
        [16, 48, 80]
    """
    if len(values) <= points:
        return list(values)
    if points == 1:
        return [values[0]]
    return [values[i] for i in sorted({round(j * (len(values) - 1) / (points - 1)) for j in range(points)})]

