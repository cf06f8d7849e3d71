"""Filter-importance metrics, registered by name; each returns one score per channel of each channel group.

A higher score means a more important channel: filter pruning removes the lowest-scoring ones. A
channel group (see `graph.py`) may be produced by several convs (a residual add ties the convs whose
outputs are added): each metric combines them as its docstring says.

The hybrid metrics (after Wei, Liu, Hong, Wu and Chen) keep channels that matter for both pruning
steps. For each group with n channels:

    r_dense(c) = rank of c's base score with dense weights, scaled to [0, 1]
    r_nm(c)    = rank of c's base score after N:M pruning, scaled to [0, 1]
    hybrid(c)  = min(r_dense(c), r_nm(c)) + r_nm(c) / (2n)

Ranks are ascending (0 = least important); equal scores rank the lower index lower. A channel is only
as important as its weaker rank; the small r_nm term (always smaller than one rank step, 1 / (n - 1))
breaks ties of the minimum in favour of the channel whose weights survive N:M pruning.

- `hybrid`: base score `l1`; r_nm uses the L1 of what survives N:M pruning of each producing conv
  (a conv that cannot take N:M, by `nm.nm_eligibility`, keeps all its weights).
- `hybrid_output`: base score `output_l1`; r_nm uses the outputs of a copy of the model whose eligible
  layers are all N:M-pruned (what the network computes after step 2).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from hybridprune.config import AUX_LOSS_WEIGHT, METRIC_NAMES, NMPattern
from hybridprune.pruning.graph import (
    ChannelGroup,
    as_example,
    channel_groups,
    dependency_graph,
    followers,
    output_tensors,
    training_pass,
)
from hybridprune.pruning.nm import eligible_layers, nm_prune_, nm_prune_weight
from hybridprune.pruning.plan import Scores
from hybridprune.registry import Registry


@dataclass
class ScoringContext:
    """What a metric may look at: the model (any nn.Module), unlabeled calibration batches, the N:M pattern, a seed.

    `calibration` holds input batches (images in [0, 1]); output-based metrics average over them.
    `example_inputs` is a batch the model takes, traced to find its structure; with only one of the two given,
    it serves as both (a plain module needs one; a `Classifier` knows its input shape).
    `ignore` names modules whose output channels are never pruned, nor is the classifier head: `head` when
    named, else the last conv or linear in forward order.

    Example:
        >>> import torchvision
        >>> net = torchvision.models.resnet18(num_classes=10)
        >>> ctx = ScoringContext(net, example_inputs=torch.zeros(1, 3, 32, 32))
        >>> [g.name for g in ctx.groups][:3]
        ['conv1', 'layer1.0.conv1', 'layer1.1.conv1']
    """

    model: nn.Module
    calibration: list[torch.Tensor] = field(default_factory=list)
    pattern: NMPattern = field(default_factory=NMPattern)
    seed: int = 0
    labels: list[torch.Tensor] = field(default_factory=list)  # only the gradient-based `taylor` needs them
    ignore: tuple[str, ...] = ()
    _groups: list[ChannelGroup] | None = None
    _unfollowed: list[ChannelGroup] = field(default_factory=list, init=False, repr=False)
    example_inputs: torch.Tensor | None = None
    head: str | None = None

    def __post_init__(self) -> None:
        if self.example_inputs is not None:
            self.example_inputs = as_example(self.example_inputs)
            self.calibration = self.calibration or [self.example_inputs]

    @property
    def example(self) -> torch.Tensor | None:
        """What tracing runs on: `example_inputs`, else the first calibration batch (None: the model's known shape)."""
        return self.example_inputs if self.example_inputs is not None else next(iter(self.calibration), None)

    @property
    def groups(self) -> list[ChannelGroup]:
        """The model's prunable channel groups (traced once)."""
        if self._groups is None:
            graph = dependency_graph(self.model, self.example)
            self._unfollowed = []
            self._groups = channel_groups(self.model, graph, self.ignore, self.example, self.head, self._unfollowed)
        return self._groups

    @property
    def unfollowed(self) -> list[ChannelGroup]:
        """Groups kept whole because Torch-Pruning cannot follow their channels (see `graph.channel_groups`)."""
        _ = self.groups
        return self._unfollowed


Metric = Callable[[ScoringContext], Scores]
METRICS: Registry[Metric] = Registry("metric", METRIC_NAMES)


def score_filters(metric: str, ctx: ScoringContext) -> Scores:
    """Score every channel of every prunable channel group with a registered metric.

    Example:
        >>> from hybridprune.models.sources import build_model
        >>> scores = score_filters("l1", ScoringContext(build_model("alexnet", width=0.125)))
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


def _per_group(ctx: ScoringContext, per_conv: Callable[[str, nn.Conv2d], torch.Tensor]) -> Scores:
    """Sum a per-output-channel value of every conv producing a group, placed at the group's channels."""
    scores = {}
    for g in ctx.groups:
        total = torch.zeros(g.size, dtype=torch.float64)
        for p in g.producers:
            value = per_conv(p.name, ctx.model.get_submodule(p.name)).double().cpu()
            total.index_add_(0, torch.tensor(p.root_idxs), value[list(p.idxs)])
        scores[g.name] = total
    return scores


def _filter_l1(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().abs().flatten(1).sum(dim=1)


@METRICS.register("l1")
def l1(ctx: ScoringContext) -> Scores:
    """Sum of |W[f]| (Li et al., ICLR 2017), summed over every conv producing the channel."""
    return _per_group(ctx, lambda name, conv: _filter_l1(conv.weight))


@METRICS.register("l2")
def l2(ctx: ScoringContext) -> Scores:
    """Euclidean norm of the channel's filters, taken over every conv producing it: an extra magnitude baseline."""
    squares = _per_group(ctx, lambda name, conv: conv.weight.detach().flatten(1).pow(2).sum(dim=1))
    return {name: s.sqrt() for name, s in squares.items()}


@METRICS.register("hybrid")
def hybrid(ctx: ScoringContext) -> Scores:
    """Weight-based hybrid: combines the ranks of L1 and of L1 after N:M pruning (summed over producers)."""
    eligible = eligible_layers(ctx.model, ctx.pattern, ctx.example)

    def nm_l1(name: str, conv: nn.Conv2d) -> torch.Tensor:
        w = conv.weight.detach()
        return _filter_l1(nm_prune_weight(w, ctx.pattern) if name in eligible else w)

    dense, pruned = l1(ctx), _per_group(ctx, nm_l1)
    return {name: combine_hybrid(dense[name], pruned[name]) for name in dense}


@torch.no_grad()
def _mean_abs_outputs(model: nn.Module, groups: list[ChannelGroup], calibration: list[torch.Tensor]) -> Scores:
    """Mean |activation| of each group channel where its producing convs make it (see `output_l1`); convs that
    run only in training (auxiliary heads) are read in a training-mode pass, the model left unchanged."""
    if not calibration:
        raise ValueError("output-based metrics need calibration batches")
    producers = {p.name for g in groups for p in g.producers}
    means = _mean_abs_pass(model, producers, calibration, training=False)
    if producers - means.keys():
        means |= _mean_abs_pass(model, producers - means.keys(), calibration, training=True)
    ctx = ScoringContext(model, _groups=groups)
    return _per_group(ctx, lambda name, conv: means[name])


def _mean_abs_pass(model: nn.Module, producers: set[str], calibration: list[torch.Tensor], training: bool) -> Scores:
    follow = followers(model, calibration[0])
    modules = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}
    hooks = []
    for p in producers:
        site = follow.bn.get(p, p)
        act = modules[follow.act[site]] if site in follow.act else None
        hooks.append(modules[site].register_forward_hook(_accumulate(p, act, sums)))
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        with training_pass(model) if training else contextlib.nullcontext():
            for x in calibration:
                model(x.to(device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {name: s / len(calibration) for name, s in sums.items()}


def _accumulate(name: str, act: nn.Module | None, sums: dict[str, torch.Tensor]) -> Callable:
    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        out = output.detach()
        if act is not None:
            out = act(out.clone())  # the activation that follows (a clone: it may work in place)
        sums[name] = sums.get(name, 0) + out.abs().mean(dim=(0, 2, 3)).double().cpu()

    return hook


@METRICS.register("output_l1")
def output_l1(ctx: ScoringContext) -> Scores:
    """Mean |output| of each channel over the calibration batches (model in eval mode), summed over the convs
    producing it. Each conv's output is read after the BatchNorm that directly follows it, passed through
    the activation module that directly follows that (none when the BN output first meets a residual add);
    without a BatchNorm, at the conv's own output."""
    return _mean_abs_outputs(ctx.model, ctx.groups, ctx.calibration)


@METRICS.register("hybrid_output")
def hybrid_output(ctx: ScoringContext) -> Scores:
    """Output-based hybrid: combines the ranks of output_l1 with dense weights and with N:M-pruned weights."""
    dense = output_l1(ctx)
    nm_model = copy.deepcopy(ctx.model)
    nm_prune_(nm_model, ctx.pattern, example_inputs=ctx.example)
    pruned = _mean_abs_outputs(nm_model, ctx.groups, ctx.calibration)
    return {name: combine_hybrid(dense[name], pruned[name]) for name in dense}


@METRICS.register("random")
def random(ctx: ScoringContext) -> Scores:
    """A seeded random score per channel: the control every metric must beat."""
    gen = torch.Generator().manual_seed(ctx.seed)
    return {g.name: torch.rand(g.size, generator=gen) for g in ctx.groups}


@METRICS.register("fpgm")
def fpgm(ctx: ScoringContext) -> Scores:
    """Filter Pruning via Geometric Median (He et al., CVPR 2019), Torch-Pruning's implementation: channels
    far from the others are irreplaceable; it scores the whole group (convs, BNs, next layers' inputs)."""
    return _torch_pruning_scores(ctx, tp.importance.FPGMImportance())


@METRICS.register("taylor")
def taylor(ctx: ScoringContext) -> Scores:
    """First-order Taylor importance |w * dL/dw| (Molchanov et al., 2019), Torch-Pruning's implementation,
    over the whole group, with the loss summed over the labelled calibration batches (in eval mode; a model with
    auxiliary heads adds their weighted losses from a training-mode pass, so every layer has a gradient)."""
    if len(ctx.labels) != len(ctx.calibration) or not ctx.calibration:
        raise ValueError("taylor needs labelled calibration batches")
    model = ctx.model
    was_training = model.training
    model.eval()  # gradients without touching BatchNorm statistics
    model.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    try:
        batches = [(x.to(device), y.to(device)) for x, y in zip(ctx.calibration, ctx.labels, strict=True)]
        with torch.enable_grad():
            for x, y in batches:
                F.cross_entropy(model(x), y).backward()
            if any(m.weight.grad is None for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))):
                with training_pass(model):  # layers that run only in training: the auxiliary losses, as trained
                    for x, y in batches:
                        _, *aux = output_tensors(model(x))
                        sum(AUX_LOSS_WEIGHT * F.cross_entropy(a, y) for a in aux).backward()
        return _torch_pruning_scores(ctx, tp.importance.TaylorImportance())
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)


def _torch_pruning_scores(ctx: ScoringContext, importance: Callable) -> Scores:
    graph = dependency_graph(ctx.model, ctx.example)
    scores = {}
    for g in ctx.groups:
        root = ctx.model.get_submodule(g.name)
        pruner = graph.get_pruner_of_module(root)
        scores[g.name] = importance(graph.get_pruning_group(root, pruner.prune_out_channels, list(range(g.size))))
    return scores


def metric_names() -> list[str]:
    return METRICS.names()
