"""The filter-pruning step: score, allocate, plan and remove filters in place, in one or several steps.

This is where the parts of `pruning` meet: a metric (`metrics`) scores every channel group, an allocation
(`allocate`) decides how many channels each group keeps, a plan (`plan`) picks them, and Torch-Pruning
removes them. With several steps the channels go gradually, rescored on the weights as they are after
each step; what runs between the steps (fine-tuning) is the caller's, passed in as a function, so this
module knows no training.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from hybridprune.config import PruneConfig
from hybridprune.errors import HybridPruneError
from hybridprune.models.sources import Classifier, model_label
from hybridprune.pruning.allocate import counts_at, counts_for_target, measure_sensitivity
from hybridprune.pruning.metrics import ScoringContext, score_filters
from hybridprune.pruning.plan import (
    UNFOLLOWED_NOTE,
    FilterPlan,
    GroupPlan,
    Scores,
    apply_filter_plan_,
    group_step,
    grouping_note,
    kept_count,
    plan_filter_pruning,
    step_counts,
)
from hybridprune.world import World, broadcast


def prune_filters_(
    model: nn.Module,
    cfg: PruneConfig,
    calibration: list[torch.Tensor],
    seed: int = 0,
    labels: list[torch.Tensor] | None = None,
    between: Callable[[nn.Module, int], None] | None = None,
    world: World = World(),
    counts: dict[str, int] | None = None,
    *,
    example_inputs: torch.Tensor | None = None,
    head: str | None = None,
) -> FilterPlan:
    """Score filters with `cfg.metric`, plan the removal, and remove them physically, in place.

    Any nn.Module: `example_inputs` (a batch it takes) is traced to find its channel groups; with only
    calibration images (or only the example) given, one serves as both. The head (`head`, or the last conv or
    linear in forward order) and `cfg.ignore`'s modules stay whole. The removal goes to `model.pruning_history`
    (see `plan.apply_filter_plan_`), so the pruned model can be saved and rebuilt.

    With `cfg.steps` = K > 1 the channels go in K steps (`plan.step_counts`), each scored on the current
    weights; `between(model, step)` runs after every step but the last (fine-tuning goes there). The plan
    returned maps every group's original channels to those kept at the end. `counts` (group -> channels kept in
    the end, e.g. from a latency-target allocation) replaces the allocation at the ratio or MAC target.

    Example:
        >>> from hybridprune.models.sources import build_model
        >>> m = build_model("resnet20", width=0.5)
        >>> plan = prune_filters_(m, PruneConfig(metric="l1", filter_ratio=0.5, round_to=4), [])
        >>> [g.kept for g in plan.groups][:4]
        [4, 4, 4, 4]
        >>> import torchvision
        >>> net = torchvision.models.resnet18(num_classes=10)
        >>> plan = prune_filters_(net, PruneConfig(metric="l1", filter_ratio=0.5), [torch.rand(2, 3, 32, 32)])
        >>> net.layer1[0].conv1.out_channels, len(net.pruning_history) > 0, net.pruning_input_shape
        (32, True, (3, 32, 32))
    """
    ignore = ignored_modules(model, cfg.ignore)

    def context() -> ScoringContext:
        return ScoringContext(
            model, calibration, cfg.pattern, seed, labels or [], ignore=ignore, example_inputs=example_inputs, head=head
        )

    ctx = context()
    groups = {g.name: g for g in ctx.groups}
    scores = score_filters(cfg.metric, ctx)
    final = counts if counts is not None else _final_counts(model, ctx, scores, cfg, labels or [])
    alive = {n: list(range(g.size)) for n, g in groups.items()}  # original index of every channel left
    schedule = step_counts({n: g.size for n, g in groups.items()}, final, cfg.steps, cfg.round_to)
    for step, counts in enumerate(schedule, 1):
        if step > 1:  # rescored on the weights as they are now
            ctx = context()
            scores = score_filters(cfg.metric, ctx)
        plan = broadcast(plan_filter_pruning(scores, cfg.filter_ratio, cfg.round_to, ctx.groups, counts), world)
        apply_filter_plan_(model, plan, ctx.example)  # rank 0 decided the plan: every rank removes the same channels
        for g in plan.groups:
            alive[g.name] = [alive[g.name][k] for k in g.keep]
        if between is not None and step < len(schedule):
            between(model, step)
    return FilterPlan(
        cfg.filter_ratio,
        cfg.round_to,
        tuple(
            GroupPlan(
                n,
                g.size,
                tuple(alive[n]),
                tuple(p.name for p in g.producers),
                grouping_note(g, len(alive[n]), cfg.round_to),
            )
            for n, g in groups.items()
        )
        + tuple(  # reported, not pruned: their channels pass through a split Torch-Pruning cannot follow
            GroupPlan(g.name, g.size, tuple(range(g.size)), tuple(p.name for p in g.producers), UNFOLLOWED_NOTE)
            for g in ctx.unfollowed
        ),
    )


def _final_counts(
    model: nn.Module, ctx: ScoringContext, scores: Scores, cfg: PruneConfig, labels: list[torch.Tensor]
) -> dict[str, int]:
    """Channels each group keeps in the end: `cfg.allocation` at `cfg.filter_ratio`, or at `cfg.target_macs`."""
    groups, curves = ctx.groups, None
    if cfg.allocation == "sensitivity":
        curves = measure_sensitivity(model, groups, scores, ctx.calibration, labels, cfg.round_to)
    if cfg.target_macs is not None:
        target = cfg.target_macs
        return counts_for_target(model, groups, scores, cfg.allocation, target, cfg.round_to, curves, ctx.example)
    counts = counts_at(cfg.filter_ratio, cfg.allocation, groups, scores, cfg.round_to, curves)
    if cfg.allocation == "uniform":
        plan_filter_pruning(scores, cfg.filter_ratio, cfg.round_to, groups)  # refuses a plan that prunes nothing
    return counts


def ignored_modules(model: nn.Module, names: tuple[str, ...]) -> tuple[str, ...]:
    """Full names of the modules to keep unpruned, given as in the user's network (or, in a `Classifier`, with the
    `net.` prefix); unknown names are bad input.

    Example:
        >>> from hybridprune.models.sources import build_model
        >>> ignored_modules(build_model("alexnet", width=0.125), ("features",))
        ('net.features',)
        >>> ignored_modules(nn.Sequential(nn.Conv2d(3, 8, 3)), ("0",))
        ('0',)
    """
    known = {n for n, _ in model.named_modules()}
    prefix = "net." if isinstance(model, Classifier) else ""
    full = tuple(n if n.startswith(prefix) else f"{prefix}{n}" for n in names)
    missing = [n for n, f in zip(names, full, strict=True) if f not in known]
    if missing:
        examples = [n.removeprefix(prefix) for n, _ in model.named_modules() if n.startswith(prefix) and n != prefix]
        examples = [n for n in examples if n and "." not in n]
        raise HybridPruneError(
            f"--ignore names no module {', '.join(missing)}; top-level modules: {', '.join(examples)}"
        )
    return full


def check_prunable(model: nn.Module, cfg: PruneConfig) -> None:
    """Before any work: the model traces, `ignore` names its modules, and the ratio with its rounding
    removes something (a plan that prunes nothing is refused, not run), and a trial removal on a copy runs."""
    ctx = ScoringContext(model, pattern=cfg.pattern, ignore=ignored_modules(model, cfg.ignore))
    if not ctx.groups:
        raise HybridPruneError(f"{model_label(model)} has no prunable conv channel group (all ignored or the head)")
    sizes = {g.name: torch.zeros(g.size) for g in ctx.groups}
    if cfg.target_latency is None:  # a latency target's counts come from the table, not from the ratio
        plan_filter_pruning(sizes, cfg.filter_ratio, cfg.round_to, ctx.groups)
    # a trial removal on a copy: a split or slice that Torch-Pruning cannot follow is refused before any work
    counts = {g.name: kept_count(g.size, max(cfg.filter_ratio, 0.25), group_step(g, cfg.round_to)) for g in ctx.groups}
    apply_filter_plan_(copy.deepcopy(model), plan_filter_pruning(sizes, 0.0, cfg.round_to, ctx.groups, counts))
