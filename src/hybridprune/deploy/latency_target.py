"""Pruning to a measured speed: profile the model on this device in context (the whole graph with one group or
one coupled pair pruned at a time, `deploy.profile_context`; candidate counts at the device's block unless
`latency_step` forces one), solve for the counts and 2:4 layers that keep
the most importance within `target_latency` x the dense model's measured latency, measure the pruned model,
and, when it misses the target by more than LATENCY_TOLERANCE, scale the budget by target / measured and solve
again (at most LATENCY_CORRECTIONS times). The counts go back to the caller, who prunes with them
(`pruning.filters.prune_filters_(..., counts=...)`), with fine-tuning, steps and distillation as usual.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hybridprune.config import LATENCY_CORRECTIONS, LATENCY_TOLERANCE, PruneConfig
from hybridprune.deploy.profile import (
    ProfileSettings,
    check_device,
    measure_deployed,
    new_table,
    profile_in_context,
    profile_model,
    resolve_settings,
)
from hybridprune.deploy.runtimes import device_name
from hybridprune.pruning.allocate import measure_sensitivity
from hybridprune.pruning.budget import (
    Allocation,
    Budget,
    importance_values,
    predict,
    sensitivity_values,
    solve,
    solve_uniform,
)
from hybridprune.pruning.filters import ignored_modules
from hybridprune.pruning.graph import example_input
from hybridprune.pruning.latency import LatencyTable, layer_couplings, load_table
from hybridprune.pruning.latency_context import ContextModel, ContextRecord
from hybridprune.pruning.metrics import ScoringContext, score_filters
from hybridprune.pruning.nm import eligible_layers
from hybridprune.pruning.plan import apply_filter_plan_, plan_filter_pruning


@dataclass
class LatencyReport:
    """What a latency-target run records: the setup, the dense and pruned latencies predicted and measured,
    every solve, and per group the kept count and predicted saving."""

    device: str
    runtime: str
    batch: int
    dtype: str
    threads: int | None
    target: float
    nm_rule: str
    dense_ms: dict[str, float] = field(default_factory=dict)  # median, p10, p90 measured; predicted
    target_ms: float = 0.0
    pruned_ms: dict[str, float] = field(default_factory=dict)
    solves: list[dict[str, float]] = field(default_factory=list)
    exact: bool = False
    sparse_layers: list[str] = field(default_factory=list)
    groups: list[dict[str, Any]] = field(default_factory=list)
    notice: str = ""
    step: int = 0  # candidate counts are multiples of it
    block: int = 0  # the device's block size the step sweep found
    corrections: int = 0  # solves after the first (the correction loop is a guard: 0 when the table held)
    first_solve_error: float = 0.0  # the first solve's measured latency / target - 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def allocate_for_latency(
    model: nn.Module,
    cfg: PruneConfig,
    calibration: list[torch.Tensor],
    labels: list[torch.Tensor],
    device: torch.device,
    table_out: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    record: bool = False,
) -> tuple[Allocation, LatencyReport]:
    """Counts and 2:4 layers for `cfg.target_latency` on `device`; the table is saved to `table_out` (`record`:
    listed among a run folder's files)."""
    settings = resolve_settings(cfg.latency_runtime, cfg.latency_batch, cfg.latency_dtype, device, cfg.latency_step,
                                points=cfg.latency_points)  # fmt: skip
    table = load_table(cfg.latency_table, device_name(device)) if cfg.latency_table else new_table(device)
    check_device(table, device)
    ctx = ScoringContext(model, calibration, cfg.pattern, seed, labels, ignore=ignored_modules(model, cfg.ignore))
    scores = score_filters(cfg.metric, ctx)
    couplings = layer_couplings(model, ctx.groups, example_input(model))
    nm_layers = frozenset(eligible_layers(model, cfg.pattern))
    context = profile_in_context(model, ctx.groups, couplings, table, settings, device, nm_layers, progress)
    if table_out is not None:
        table.save(table_out, record=record)
    candidates = {g.name: context.candidates(g.name) for g in ctx.groups}
    if cfg.allocation == "sensitivity":
        curves = measure_sensitivity(model, ctx.groups, scores, calibration, labels, context.step)
        solver = partial(solve, couplings, sensitivity_values(ctx.groups, curves, candidates))
    elif cfg.allocation == "uniform":  # the same fraction of every group: the ratio the measured budget allows
        solver = partial(solve_uniform, couplings, candidates)
    else:
        solver = partial(solve, couplings, importance_values(ctx.groups, scores, candidates))
    report = _report(cfg, settings, device, table, context)
    model_ = ContextModel(context, couplings)
    budget = Budget(table, settings.setup, 0.0, 0.0, cfg.nm_rule, nm_layers, model_)
    dense_counts = {g.name: g.size for g in ctx.groups}
    report.dense_ms["predicted"] = predict(couplings, dense_counts, budget)[0]
    allocation = _solve_and_correct(model, solver, budget, report, scores, ctx.groups, settings, device)
    report.groups = [
        {"group": g.name, "size": g.size, "kept": allocation.counts[g.name],
         "predicted_saving_ms": _saving(couplings, budget, allocation.counts, g.name, g.size)}
        for g in ctx.groups
    ]  # fmt: skip
    report.exact, report.sparse_layers = allocation.exact, sorted(allocation.sparse)
    if cfg.nm_rule == "auto" and not allocation.sparse:
        report.notice = _no_sparse_reason(device)
    inside = {g: ks for g, ks in model_.indistinguishable(candidates).items() if ks}
    if inside:
        report.notice = " ".join(filter(None, (report.notice, _inside_steps(inside, context))))
    return allocation, report


def _inside_steps(inside: dict[str, list[int]], record: ContextRecord) -> str:
    g, ks = next(iter(inside.items()))
    return (f"--latency-step {record.step} offers counts inside the device's blocks of {record.block} channels "
            f"({sum(map(len, inside.values()))} in {len(inside)} groups, e.g. {ks[:3]} of {g}): the table cannot "
            "tell them from the block's boundary, so it predicts them no saving")  # fmt: skip


def _solve_and_correct(model, solver, budget, report, scores, groups, settings, device) -> Allocation:  # noqa: ANN001
    """Solve, measure, correct the budget by target / measured, until within tolerance or out of tries; keep the
    measured best (within tolerance, else the closest below the target, else the closest)."""
    target = report.target_ms
    budget_ms, tried = target, []
    for _ in range(1 + LATENCY_CORRECTIONS):
        allocation = solver(Budget(**{**budget.__dict__, "budget_ms": budget_ms}))
        measured = measure_deployed(
            _pruned_copy(model, scores, groups, allocation), allocation.sparse, settings, device
        )
        tried.append((allocation, measured))
        report.solves.append({"budget_ms": budget_ms, "predicted_ms": allocation.predicted_ms,
                              "measured_ms": measured.median_ms, "value": allocation.value})  # fmt: skip
        if abs(measured.median_ms - target) <= LATENCY_TOLERANCE * target:
            break
        budget_ms *= target / measured.median_ms
    report.corrections = len(tried) - 1
    report.first_solve_error = tried[0][1].median_ms / target - 1
    allocation, measured = min(tried, key=lambda t: _miss(t[1].median_ms, target))
    report.pruned_ms = {"median": measured.median_ms, "p10": measured.p10_ms, "p90": measured.p90_ms,
                        "predicted": allocation.predicted_ms}  # fmt: skip
    return allocation


def _miss(measured: float, target: float) -> tuple[int, float]:
    """Order of preference: within tolerance first, then below the target, then by distance."""
    within = abs(measured - target) <= LATENCY_TOLERANCE * target
    return (0 if within else 1 if measured < target else 2, abs(measured - target))


def _pruned_copy(model: nn.Module, scores: dict, groups: list, allocation: Allocation) -> nn.Module:
    pruned = copy.deepcopy(model)
    apply_filter_plan_(pruned, plan_filter_pruning(scores, 0.0, 1, groups, allocation.counts))
    return pruned


def _saving(couplings, budget: Budget, counts: dict[str, int], group: str, size: int) -> float:  # noqa: ANN001
    """Predicted ms saved by this group's pruning alone (the others as chosen)."""
    return predict(couplings, {**counts, group: size}, budget)[0] - predict(couplings, counts, budget)[0]


def _report(cfg: PruneConfig, settings: ProfileSettings, device: torch.device, table: LatencyTable,
            context: ContextRecord) -> LatencyReport:  # fmt: skip
    report = LatencyReport(device_name(device), settings.setup.runtime, settings.setup.batch, settings.setup.dtype,
                           table.threads, cfg.target_latency, cfg.nm_rule, step=context.step, block=context.block)
    dense = context.dense
    report.dense_ms = {"median": dense.median_ms, "p10": dense.p10_ms, "p90": dense.p90_ms}
    report.target_ms = cfg.target_latency * dense.median_ms
    return report


def _no_sparse_reason(device: torch.device) -> str:
    if device.type != "cuda":
        return f"{device.type}: no 2:4 kernel (sparse tensor cores need a CUDA GPU), so --nm-where auto applies no 2:4"
    return "--nm-where auto: no layer's 2:4 entry beat its dense entry by the margin, so no layer takes 2:4"


def layers_where_2to4_pays(
    model: nn.Module,
    cfg: PruneConfig,
    device: torch.device,
    table_out: str | Path | None = None,
    progress: bool = True,
    record: bool = False,
) -> tuple[frozenset[str], str]:
    """The layers of `model` at its current widths whose 2:4 entry beats dense by the margin on `device` (the
    table is measured at these widths only), and a one-line notice when there are none."""
    settings = resolve_settings(cfg.latency_runtime, cfg.latency_batch, cfg.latency_dtype, device, step=1 << 30)
    table = load_table(cfg.latency_table, device_name(device)) if cfg.latency_table else new_table(device)
    ctx = ScoringContext(model, pattern=cfg.pattern)
    couplings = layer_couplings(model, ctx.groups, example_input(model))
    nm_layers = frozenset(eligible_layers(model, cfg.pattern))
    rest, _ = profile_model(model, ctx.groups, couplings, table, settings, device, nm_layers, progress)
    if table_out is not None:
        table.save(table_out, record=record)
    sparse = predict(couplings, {}, Budget(table, settings.setup, rest.median_ms, float("inf"), "auto", nm_layers))[1]
    return sparse, "" if sparse else _no_sparse_reason(device)
