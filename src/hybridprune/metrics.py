"""Filter-importance metrics, registered by name; each returns one score per filter of each conv block.

A higher score means a more important filter: filter pruning removes the lowest-scoring ones.

The hybrid metrics (after Wei, Liu, Hong, Wu and Chen) keep filters that matter for both pruning
steps. For each conv layer with n filters:

    r_dense(f) = rank of f's base score with dense weights, scaled to [0, 1]
    r_nm(f)    = rank of f's base score after N:M pruning, scaled to [0, 1]
    hybrid(f)  = min(r_dense(f), r_nm(f)) + r_nm(f) / (2n)

Ranks are ascending (0 = least important); equal scores rank the lower filter index lower. A
filter is only as important as its weaker rank; the small r_nm term (always smaller than one
rank step, 1 / (n - 1)) breaks ties of the minimum in favour of the filter whose weights
survive N:M pruning, since those are the weights the final model keeps.

- `hybrid`: base score `l1` (sum of |W[f]|); r_nm uses the L1 of W[f] after N:M pruning of that filter.
- `hybrid_output`: base score `output_l1`; r_nm uses the outputs of a copy of the model whose
  eligible layers are all N:M-pruned (what the network computes after step 2).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from .models import conv_blocks, input_shape
from .nm import NMPattern, nm_prune_, nm_prune_weight, reduction_size
from .registry import Registry

Scores = dict[str, torch.Tensor]  # conv block name -> one score per filter


@dataclass
class ScoringContext:
    """What a metric may look at: the model, unlabeled calibration batches, the N:M pattern, a seed.

    `calibration` holds input batches (images in [0, 1]); output-based metrics average over them.
    """

    model: nn.Module
    calibration: list[torch.Tensor] = field(default_factory=list)
    pattern: NMPattern = field(default_factory=NMPattern)
    seed: int = 0
    labels: list[torch.Tensor] = field(default_factory=list)  # only the gradient-based `taylor` needs them


Metric = Callable[[ScoringContext], Scores]
METRICS: Registry[Metric] = Registry("metric")


def score_filters(metric: str, ctx: ScoringContext) -> Scores:
    """Score every filter of every conv block with a registered metric.

    Example:
        >>> from hybridprune.models import alexnet
        >>> scores = score_filters("l1", ScoringContext(alexnet(width=0.125)))
        >>> [len(s) for s in scores.values()]
        [8, 24, 48, 32, 32]
    """
    scores = METRICS.get(metric)(ctx)
    return {name: s.detach().float().cpu() for name, s in scores.items()}


def normalized_rank(scores: torch.Tensor) -> torch.Tensor:
    """Ascending rank of each score scaled to [0, 1]; equal scores rank the lower index lower."""
    n = scores.numel()
    order = torch.argsort(scores, stable=True)
    ranks = torch.empty(n, dtype=torch.float64)
    ranks[order] = torch.arange(n, dtype=torch.float64)
    return ranks / max(n - 1, 1)


def combine_hybrid(dense: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """min of the two normalised ranks, ties broken towards the higher N:M rank (see module docstring)."""
    r_dense, r_nm = normalized_rank(dense), normalized_rank(pruned)
    return torch.minimum(r_dense, r_nm) + r_nm / (2 * dense.numel())


def _weight_scores(ctx: ScoringContext, fn: Callable[[torch.Tensor], torch.Tensor]) -> Scores:
    return {name: fn(block.conv.weight.detach()) for name, block in conv_blocks(ctx.model)}


def _filter_l1(weight: torch.Tensor) -> torch.Tensor:
    return weight.abs().flatten(1).sum(dim=1)


def _nm_filter_l1(weight: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    """L1 of what survives N:M pruning; a layer that cannot take N:M (first conv) keeps all its weights."""
    if reduction_size(weight) % pattern.m:
        return _filter_l1(weight)
    return _filter_l1(nm_prune_weight(weight, pattern))


@torch.no_grad()
def _mean_abs_outputs(model: nn.Module, calibration: list[torch.Tensor]) -> Scores:
    """Mean |activation| of each conv block's output (after BN and ReLU), per channel, over the batches."""
    if not calibration:
        raise ValueError("output-based metrics need calibration batches")
    sums: Scores = {}
    hooks = [block.register_forward_hook(_accumulate(name, sums)) for name, block in conv_blocks(model)]
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        for x in calibration:
            model(x.to(device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {name: s / len(calibration) for name, s in sums.items()}


def _accumulate(name: str, sums: Scores) -> Callable:
    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        value = output.detach().abs().mean(dim=(0, 2, 3)).double().cpu()
        sums[name] = sums.get(name, 0) + value

    return hook


@METRICS.register("l1")
def l1(ctx: ScoringContext) -> Scores:
    """Sum of |W[f]| (Li et al., ICLR 2017)."""
    return _weight_scores(ctx, _filter_l1)


@METRICS.register("l2")
def l2(ctx: ScoringContext) -> Scores:
    """Euclidean norm of W[f]: an extra magnitude baseline."""
    return _weight_scores(ctx, lambda w: w.flatten(1).norm(dim=1))


@METRICS.register("output_l1")
def output_l1(ctx: ScoringContext) -> Scores:
    """Mean |output| of filter f after BN and ReLU, over the calibration batches (model in eval mode)."""
    return _mean_abs_outputs(ctx.model, ctx.calibration)


@METRICS.register("hybrid")
def hybrid(ctx: ScoringContext) -> Scores:
    """Weight-based hybrid: combines the ranks of L1 and of L1 after N:M pruning."""
    dense = l1(ctx)
    pruned = _weight_scores(ctx, lambda w: _nm_filter_l1(w, ctx.pattern))
    return {name: combine_hybrid(dense[name], pruned[name]) for name in dense}


@METRICS.register("hybrid_output")
def hybrid_output(ctx: ScoringContext) -> Scores:
    """Output-based hybrid: combines the ranks of output_l1 with dense weights and with N:M-pruned weights."""
    dense = output_l1(ctx)
    nm_model = copy.deepcopy(ctx.model)
    nm_prune_(nm_model, ctx.pattern)
    pruned = _mean_abs_outputs(nm_model, ctx.calibration)
    return {name: combine_hybrid(dense[name], pruned[name]) for name in dense}


@METRICS.register("random")
def random(ctx: ScoringContext) -> Scores:
    """A seeded random score per filter: the control every metric must beat."""
    gen = torch.Generator().manual_seed(ctx.seed)
    return {name: torch.rand(block.conv.out_channels, generator=gen) for name, block in conv_blocks(ctx.model)}


@METRICS.register("fpgm")
def fpgm(ctx: ScoringContext) -> Scores:
    """Filter Pruning via Geometric Median (He et al., CVPR 2019), Torch-Pruning's implementation: filters
    far from the others are irreplaceable; it scores the whole dependency group (conv, BN, next layer's inputs)."""
    return _torch_pruning_scores(ctx.model, tp.importance.FPGMImportance())


@METRICS.register("taylor")
def taylor(ctx: ScoringContext) -> Scores:
    """First-order Taylor importance |w * dL/dw| (Molchanov et al., 2019), Torch-Pruning's implementation,
    with the loss summed over the labelled calibration batches."""
    if len(ctx.labels) != len(ctx.calibration) or not ctx.calibration:
        raise ValueError("taylor needs labelled calibration batches")
    model = ctx.model
    was_training = model.training
    model.eval()  # gradients without touching BatchNorm statistics
    model.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    try:
        for x, y in zip(ctx.calibration, ctx.labels, strict=True):
            F.cross_entropy(model(x.to(device)), y.to(device)).backward()
        return _torch_pruning_scores(model, tp.importance.TaylorImportance())
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)


def _torch_pruning_scores(model: nn.Module, importance: Callable) -> Scores:
    device = next(model.parameters()).device
    graph = tp.DependencyGraph().build_dependency(
        model, example_inputs=torch.zeros(1, *input_shape(model), device=device), verbose=False
    )
    scores = {}
    for name, block in conv_blocks(model):
        group = graph.get_pruning_group(block.conv, tp.prune_conv_out_channels, list(range(block.conv.out_channels)))
        scores[name] = importance(group)
    return scores


def metric_names() -> list[str]:
    return METRICS.names()
