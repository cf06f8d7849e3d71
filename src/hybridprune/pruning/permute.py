"""Channel permutations before N:M pruning (after NVIDIA ASP; Pool and Yu, NeurIPS 2021).

N:M groups run along a layer's input channels, so which channels share a group of M decides how much weight
magnitude survives. Reordering the channels of a channel group changes that without changing the function:
every member of the group (the convs and BatchNorms producing the channels, the layers reading them) is
permuted the same way. The permutation is found by greedy swaps between groups of M, each kept only when it
raises the magnitude that survives N:M in the N:M-eligible layers reading the group, so it never lowers it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from hybridprune.config import NMPattern
from hybridprune.errors import HybridPruneError
from hybridprune.pruning.graph import ChannelGroup, channel_groups, dependency_graph
from hybridprune.pruning.nm import eligible_layers, nm_prune_weight


@dataclass(frozen=True)
class PermutationReport:
    """Weight magnitude kept by N:M in one group's reading layers, before and after its permutation."""

    group: str
    layers: tuple[str, ...]
    kept_before: float
    kept_after: float


def kept_magnitude(weights: list[torch.Tensor], pattern: NMPattern) -> float:
    """Total absolute value that N:M pruning of each weight (along its input channels) leaves.

    Example:
        >>> kept_magnitude([torch.tensor([[1.0, -4.0, 2.0, 3.0]])], NMPattern(2, 4))
        7.0
    """
    return float(sum(nm_prune_weight(w, pattern).abs().double().sum() for w in weights))


def _search(weights: list[torch.Tensor], pattern: NMPattern, tries: int, seed: int) -> torch.Tensor:
    """A permutation of the input channels (shared by `weights`) found by improving swaps."""
    n, m = weights[0].shape[1], pattern.m
    perm = torch.arange(n)
    gen = torch.Generator().manual_seed(seed)

    def score(channels: torch.Tensor) -> float:  # kept magnitude of the M-groups holding `channels`
        blocks = torch.unique(channels // m)
        cols = (blocks[:, None] * m + torch.arange(m)).flatten()
        return kept_magnitude([w[:, perm[cols]] for w in weights], pattern)

    for _ in range(tries):
        i, j = torch.randint(0, n, (2,), generator=gen).tolist()
        if i // m == j // m:
            continue
        pair = torch.tensor([i, j])
        before = score(pair)
        perm[[i, j]] = perm[[j, i]]
        if score(pair) <= before + 1e-12:
            perm[[i, j]] = perm[[j, i]]  # no gain: undo
    return perm


def _reindex(member: torch.Tensor, root: torch.Tensor, perm: torch.Tensor, size: int) -> torch.Tensor:
    """Source index of every position of a member's dimension once the group's channels are permuted."""
    src = torch.arange(size)
    slots = [torch.nonzero(root == r).flatten() for r in range(len(perm))]
    for j, old in enumerate(perm.tolist()):
        src[member[slots[j]]] = member[slots[old]]
    return src


def _items(graph: tp.DependencyGraph, model: nn.Module, group: ChannelGroup) -> list:
    """Torch-Pruning's items of a group: every member, its handler, and its indices of the group's channels."""
    root = model.get_submodule(group.name)
    return list(
        graph.get_pruning_group(root, graph.get_pruner_of_module(root).prune_out_channels, list(range(group.size)))
    )


@torch.no_grad()
def _apply(graph: tp.DependencyGraph, items: list, group: ChannelGroup, perm: torch.Tensor) -> None:
    for item in items:
        module, out = item.dep.target.module, graph.is_out_channel_pruning_fn(item.dep.handler)
        if not isinstance(module, nn.Module) or not [*module.parameters(False), *module.buffers(False)]:
            continue  # an operation (add, concat, flatten, activation), not a layer with weights
        member, root_idxs = torch.tensor(item.idxs), torch.tensor(item.root_idxs)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            tensors, dim = [module.weight, module.bias, module.running_mean, module.running_var], 0
        elif isinstance(module, (nn.Conv2d, nn.Linear)):
            depthwise = isinstance(module, nn.Conv2d) and module.groups > 1
            dim = 0 if out or depthwise else 1
            tensors = [module.weight] + ([module.bias] if dim == 0 else [])
        else:
            raise HybridPruneError(f"cannot permute channels through {type(module).__name__} ({group.name})")
        for t in (t for t in tensors if t is not None):
            t.copy_(t.index_select(dim, _reindex(member, root_idxs, perm, t.shape[dim])))


def permute_for_nm_(
    model: nn.Module,
    pattern: NMPattern = NMPattern(),
    tries_per_channel: int = 20,
    seed: int = 0,
    *,
    example_inputs: torch.Tensor | None = None,
) -> list[PermutationReport]:
    """Reorder every channel group's channels, in place, so more magnitude survives N:M in the layers that read
    it; the network computes the same function. Returns, per group, the kept magnitude before and after. Any
    nn.Module, traced on `example_inputs` (a batch it takes) where it knows no input shape.

    Example:
        >>> from hybridprune.models.sources import build_model
        >>> report = permute_for_nm_(build_model("resnet20", width=0.5), tries_per_channel=2)
        >>> all(r.kept_after >= r.kept_before for r in report)
        True
        >>> net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.ReLU(),
        ...                     nn.Conv2d(16, 8, 1))  # a plain module: traced on its example input
        >>> x = torch.rand(2, 3, 12, 12)
        >>> before = net.eval()(x)
        >>> report = permute_for_nm_(net, tries_per_channel=5, example_inputs=x)
        >>> [r.group for r in report], torch.allclose(net(x), before, atol=1e-5)
        (['0', '3'], True)
    """
    eligible = eligible_layers(model, pattern, example_inputs)
    graph = dependency_graph(model, example_inputs)  # one graph for every group: a permutation changes no shape
    reports = []
    for group in channel_groups(model, graph, example=example_inputs):
        items = _items(graph, model, group)
        readers = [n for n in _readers(graph, model, items, group) if n in eligible]
        weights = [model.get_submodule(n).weight.detach() for n in readers]
        if not weights or group.channel_groups > 1:  # a grouped conv's channels cannot move between its conv groups
            continue
        before = kept_magnitude(weights, pattern)
        perm = _search([w.cpu() for w in weights], pattern, tries_per_channel * group.size, seed)
        if not torch.equal(perm, torch.arange(group.size)):
            _apply(graph, items, group, perm)
        after = kept_magnitude([model.get_submodule(n).weight.detach() for n in readers], pattern)
        reports.append(PermutationReport(group.name, tuple(readers), before, after))
    return reports


def _readers(graph: tp.DependencyGraph, model: nn.Module, items: list, group: ChannelGroup) -> list[str]:
    """Convs (groups=1) whose input channels are exactly this group's, so their M-groups are group channels."""
    names = {m: n for n, m in model.named_modules()}
    return [
        names[item.dep.target.module]
        for item in items
        if isinstance(item.dep.target.module, nn.Conv2d)
        and item.dep.target.module.groups == 1
        and graph.is_in_channel_pruning_fn(item.dep.handler)
        and item.dep.target.module.in_channels == group.size
    ]
