"""Measuring latency in context: the device's step structure (a sweep of one representative layer's output count
inside a small graph, in the target runtime), then the whole model as deployed with one group, or one coupled
pair of groups, pruned at a time, each timed interleaved with the dense model (`pruning.latency_context` says
how they predict).

What is measured per model: every group alone at `points` of its candidate counts (evenly spaced, smallest and
largest included), every coupled pair at `pair_points` x `pair_points` of those, and the smallest model. Each
chunk of variants is timed round-robin together with the dense model, and a variant's latency is its median
ratio to the dense model in the same rounds times the dense median: noise that slows a whole round cancels.
A record already in the table for the same model, setup and candidates is reused, not measured again.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from tqdm.auto import tqdm

from hybridprune.deploy.quantize import precision_call
from hybridprune.deploy.runtimes import interleaved_times
from hybridprune.deploy.sparse import to_inference_model
from hybridprune.deploy.timing import time_calls
from hybridprune.errors import HybridPruneError
from hybridprune.pruning.graph import ChannelGroup
from hybridprune.pruning.latency import Entry, LatencyTable, LayerCoupling, LayerShape
from hybridprune.pruning.latency_context import ContextRecord, context_record, context_variants, find_block

VARIANTS_PER_CHUNK = 6  # model variants alive and timed together with the dense model
SWEEP_MAX = 64  # the step sweep measures output counts 2, 4, ..., SWEEP_MAX
MIN_TIMING_MS = 0.5  # one timing covers enough back-to-back calls to outlast the clock's resolution


def sweep_key(settings, shape: LayerShape) -> str:  # noqa: ANN001 - ProfileSettings (deploy.profile imports us)
    """Which sweep a table holds: setup and the swept layer's input count, spatial size and kernel."""
    s, (kh, kw) = settings.setup, shape.kernel
    return f"{s.runtime}|b{s.batch}|{s.dtype}|conv|hw{shape.h}x{shape.w}|k{kh}x{kw}|in{shape.c_in}"


def representative_layer(couplings: list[LayerCoupling]) -> LayerShape:
    """The layer the step sweep varies: the plain conv with the most work (MACs) whose output a group sets."""
    convs = [c.dense for c in couplings if c.dense.kind == "conv" and c.dense.groups == 1 and c.out_group]
    if not convs:
        return LayerShape("conv", 32, 32, 16, 16, (3, 3), (1, 1), (1, 1))
    return max(convs, key=lambda s: s.c_in * s.c_out * s.kernel[0] * s.kernel[1] * s.h * s.w)


def measure_steps(
    table: LatencyTable, settings, device: torch.device, shape: LayerShape, progress: bool = True  # noqa: ANN001
) -> dict:
    """Sweep the output count of `shape` (2, 4, ..., SWEEP_MAX) inside a conv -> conv graph that keeps the
    runtime's layout on both sides, and store where latency moves (`find_block`); reused when in the table."""
    key = sweep_key(settings, shape)
    if key in table.steps:
        return table.steps[key]
    counts = list(range(2, SWEEP_MAX + 1, 2))
    x = torch.rand(settings.setup.batch, shape.c_in, shape.h, shape.w, device=device, dtype=settings.torch_dtype)
    calls = [_chain_call(shape, k, x, settings, device) for k in tqdm(counts, desc="step sweep", disable=not progress)]
    times = [_median(t) for t in _timed(calls, settings.rounds, device)]
    table.steps[key] = {"block": find_block(counts, times), "counts": counts, "ms": times}
    return table.steps[key]


def _chain_call(shape: LayerShape, k: int, x: torch.Tensor, settings, device: torch.device):  # noqa: ANN001, ANN202
    pad = shape.padding
    chain = nn.Sequential(
        nn.Conv2d(shape.c_in, k, shape.kernel, 1, pad), nn.BatchNorm2d(k), nn.ReLU(),
        nn.Conv2d(k, shape.c_in, shape.kernel, 1, pad), nn.BatchNorm2d(shape.c_in), nn.ReLU(),
    ).eval()  # fmt: skip
    chain.input_shape = tuple(x.shape[1:])
    return _deployed_call(chain, x, settings, device)


def profile_context(
    model: nn.Module,
    groups: list[ChannelGroup],
    couplings: list[LayerCoupling],
    table: LatencyTable,
    settings,  # noqa: ANN001 - ProfileSettings
    device: torch.device,
    key: str,
    points: int = 5,
    pair_points: int = 2,
    progress: bool = True,
) -> ContextRecord:
    """Measure (or reuse) the model's in-context record into `table.models[key]`; the step is the settings' step
    when forced, else the block the sweep finds. Returns the record."""
    sweep = measure_steps(table, settings, device, representative_layer(couplings), progress)
    step = settings.step or sweep["block"]
    from hybridprune.pruning.plan import group_step

    sizes = {g.name: g.size for g in groups}
    steps = {g.name: group_step(g, step) for g in groups}  # a grouped conv's groups keep equal counts
    old = context_record(table, key)
    if old is not None and old.step == step and old.sizes == sizes:
        return old
    variants = context_variants(sizes, couplings, step, points, pair_points, steps)
    dense, measured = measure_variants(model, groups, variants, settings, device, progress)
    record = ContextRecord.of(sizes, step, sweep["block"], variants, dense, measured, steps)
    table.models[key] = record.to_dict()
    return record


def measure_variants(
    model: nn.Module, groups: list[ChannelGroup], variants: list[dict[str, int]], settings, device, progress: bool  # noqa: ANN001
) -> tuple[Entry, list[Entry]]:
    """The dense model's latency and each variant's (groups cut to its counts), chunk by chunk, each chunk
    interleaved with the dense model; a variant's times are its ratios to the dense model's in the same rounds,
    times the dense median."""
    x = torch.rand(settings.setup.batch, *model.input_shape, device=device, dtype=settings.torch_dtype)
    dense_call = _deployed_call(model, x, settings, device)
    dense_times: list[float] = []
    out: list[Entry] = []
    bar = tqdm(total=len(variants), desc="profile in context", unit="model", disable=not progress)
    chunks = [variants[i : i + VARIANTS_PER_CHUNK] for i in range(0, len(variants), VARIANTS_PER_CHUNK)]
    for chunk in chunks or [[]]:  # no variant (`--check-ratios ''`): the dense model is still measured
        calls = [_deployed_call(pruned_copy(model, groups, c), x, settings, device) for c in chunk]
        times = _timed([dense_call, *calls], settings.rounds, device)
        dense_times += times[0]
        out += [_ratios(t, times[0]) for t in times[1:]]
        bar.update(len(chunk))
    bar.close()
    dense = _entry(dense_times)
    scale = dense.median_ms
    return dense, [Entry(r.median_ms * scale, r.p10_ms * scale, r.p90_ms * scale, r.repeats) for r in out]


def pruned_copy(model: nn.Module, groups: list[ChannelGroup], counts: dict[str, int]) -> nn.Module:
    """A copy of `model` with each group in `counts` cut to that many channels (which ones does not matter for
    latency: the first); the model itself is untouched."""
    from hybridprune.pruning.plan import apply_filter_plan_, plan_filter_pruning

    pruned = copy.deepcopy(model)
    full = {g.name: counts.get(g.name, g.size) for g in groups}
    plan = plan_filter_pruning({g.name: torch.zeros(g.size) for g in groups}, 0.0, 1, groups, full)
    apply_filter_plan_(pruned, plan)
    pruned.input_shape = model.input_shape
    return pruned


def _deployed_call(model: nn.Module, x: torch.Tensor, settings, device: torch.device):  # noqa: ANN001, ANN202
    """The model as deployed in the settings' runtime: its own graph (which folds BatchNorm), or for PyTorch the
    folded inference model."""
    net = copy.deepcopy(model).to(device)
    if settings.setup.runtime == "torch":
        net = to_inference_model(net, {}, device, settings.torch_dtype).model
    net = net.to(device=device, dtype=settings.torch_dtype).eval()
    return precision_call(net, x, settings.setup.runtime, settings.precision, settings.threads)


def _timed(calls: list, rounds: int, device: torch.device) -> list[list[float]]:
    """Interleaved timings, each covering enough back-to-back calls to outlast the clock's resolution; the order
    rotates every round, since the call that opens a round measured 3-8% slower here (ONNX Runtime, 2 cores)."""
    probe = interleaved_times(calls, 2, device, warmup=2)
    per_round = max(1, math.ceil(MIN_TIMING_MS / max(min(min(t) for t in probe), 1e-3)))
    times: list[list[float]] = [[] for _ in calls]
    for r in range(rounds):
        for i in (*range(r % len(calls), len(calls)), *range(r % len(calls))):
            times[i].append(time_calls(_repeated(calls[i], per_round), 1, device, warmup=0)[0] / per_round)
    return times


def _repeated(call, n: int):  # noqa: ANN001, ANN202
    return call if n == 1 else lambda: [call() for _ in range(n)]


def _ratios(times: list[float], dense: list[float]) -> Entry:
    return _entry([t / d for t, d in zip(times, dense, strict=True) if d > 0])


def _entry(values: list[float]) -> Entry:
    if not values:
        raise HybridPruneError("no timing came back; profile again")
    t = torch.tensor(values, dtype=torch.float64)
    return Entry(float(t.quantile(0.5)), float(t.quantile(0.1)), float(t.quantile(0.9)), len(values))


def _median(values: list[float]) -> float:
    return float(torch.tensor(values, dtype=torch.float64).median())

