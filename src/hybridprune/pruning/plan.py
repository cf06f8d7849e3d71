"""Filter pruning over coupled channel groups: which channels go (the plan) and their physical removal.

The unit is a channel group (`graph.ChannelGroup`): a conv's output channels together with every layer
tied to them (a residual add ties several convs into one group). A plan keeps, per group, the
highest-scoring channels; the kept count is rounded to a multiple of `round_to` so that the layers
reading the group stay aligned: 2:4 groups need a multiple of 4, and cuSPARSELt in fp16/bf16 needs both
GEMM dimensions of the sparse weight to be multiples of 16 (`kh * kw * in` is a multiple of 16 for every
kernel size only when `in` is). Removal goes through Torch-Pruning, and its history (module names and
integer indices) is kept on the model, so a checkpoint can replay it on a freshly built original: on a
`Classifier` in `pruning_history`; on any other nn.Module in the same attribute, created by the first removal,
together with `pruning_input_shape` (the shape of one input it was traced with, so it can be traced again
without an example, saved, and rebuilt from a fresh instance).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from hybridprune.config import DEFAULT_ROUND_TO, validate_ratio
from hybridprune.errors import HybridPruneError, first_line
from hybridprune.pruning.graph import (
    ChannelGroup,
    dependency_graph,
    example_input,
    known_input_shape,
    training_forward,
)

Scores = dict[str, torch.Tensor]  # group name -> one score per channel of the group


@dataclass(frozen=True)
class GroupPlan:
    """One channel group: how many channels it had, which it keeps (sorted indices), and the convs producing it."""

    name: str
    original: int
    keep: tuple[int, ...]
    members: tuple[str, ...] = ()
    note: str = ""  # how grouped convs shaped the count (see `grouping_note`); "" for an ordinary group

    @property
    def kept(self) -> int:
        return len(self.keep)

    @property
    def ratio(self) -> float:
        """The real fraction of channels removed, after rounding."""
        return 1 - self.kept / self.original


@dataclass(frozen=True)
class FilterPlan:
    """Which channels every group keeps, and the settings that chose them."""

    ratio: float
    round_to: int
    groups: tuple[GroupPlan, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "ratio": self.ratio,
            "round_to": self.round_to,
            "groups": [
                {**asdict(g), "keep": list(g.keep), "members": list(g.members), "real_ratio": g.ratio}
                for g in self.groups
            ],
        }


def kept_count(n: int, ratio: float, round_to: int) -> int:
    """Channels to keep out of n: n * (1 - ratio) rounded to the nearest multiple of round_to, within [round_to, n].

    Example:
        >>> kept_count(64, 0.4, 16), kept_count(192, 0.4, 16), kept_count(10, 0.4, 16)
        (32, 112, 10)
    """
    validate_ratio(ratio)
    if round_to < 1:
        raise HybridPruneError(f"round-to must be a positive integer, got {round_to}")
    k = int(math.floor(n * (1 - ratio) / round_to + 0.5)) * round_to
    return min(n, max(k, round_to))


def group_step(group: ChannelGroup, round_to: int) -> int:
    """What a group's kept count must be a multiple of: `round_to`; for a group split into G conv groups (grouped
    convs, see `graph.ChannelGroup`), a multiple of G too (every conv group keeps as many channels), and of G
    alone when no reader can take N:M (all readers are grouped convs, which stay dense).

    Example:
        >>> group_step(ChannelGroup("a", 400, (), (), channel_groups=25), 16)
        400
        >>> group_step(ChannelGroup("a", 400, (), (), channel_groups=25, aligned=False), 16)
        25
    """
    g = group.channel_groups
    return round_to if g == 1 else math.lcm(g, round_to) if group.aligned else g


def snap_count(group: ChannelGroup, k: int) -> int:
    """A kept count made valid for a grouped group: the nearest multiple of its conv groups, within [G, size]."""
    g = group.channel_groups
    return k if g == 1 else min(group.size, max(g, int(math.floor(k / g + 0.5)) * g))


# the note of a group that filter pruning cannot cut (`graph.channel_groups`' unfollowed groups)
UNFOLLOWED_NOTE = "kept whole: its channels pass through a split or slice that Torch-Pruning cannot follow"


def grouping_note(group: ChannelGroup, kept: int, round_to: int) -> str:
    """What grouped convs did to a group's count, for the layer table: channels cut within each conv group (the
    same positions in every one), or the group kept whole and why; "" for an ordinary group.

    Example:
        >>> grouping_note(ChannelGroup("a", 128, (), (), channel_groups=32), 64, 16)
        'grouped: 32 conv groups keep 2 of 4 channels each'
    """
    g = group.channel_groups
    if g == 1:
        return ""
    if g == group.size:
        return f"grouped: kept whole ({group.size} channels cannot be split into equal conv groups)"
    per = group.size // g
    if kept < group.size:
        return f"grouped: {g} conv groups keep {kept // g} of {per} channels each"
    step = group_step(group, round_to)
    why = (
        f"--round-to {round_to} with {g} conv groups needs a multiple of {step}"
        if step >= group.size
        else "the ratio rounds to all"
    )
    return f"grouped: {g} conv groups of {per} kept whole ({why})"


def step_counts(sizes: dict[str, int], final: dict[str, int], steps: int, round_to: int) -> list[dict[str, int]]:
    """Channels each group keeps after each of `steps` pruning steps: a linear path from its size to its final
    count, rounded to multiples of `round_to`, never growing, ending exactly at `final`.

    Example:
        >>> step_counts({"a": 64}, {"a": 32}, 4, 8)
        [{'a': 56}, {'a': 48}, {'a': 40}, {'a': 32}]
    """
    schedule, current = [], dict(sizes)
    for i in range(1, steps + 1):
        target = {}
        for name, n in sizes.items():
            k = final[name] if i == steps else int(round((n - (n - final[name]) * i / steps) / round_to)) * round_to
            target[name] = min(current[name], max(final[name], k))
        schedule.append(target)
        current = target
    return schedule


def plan_filter_pruning(
    scores: Scores,
    ratio: float,
    round_to: int = DEFAULT_ROUND_TO,
    groups: list[ChannelGroup] | None = None,
    counts: dict[str, int] | None = None,
) -> FilterPlan:
    """Keep the highest-scoring channels of each group (equal scores: the higher index is kept): `counts[group]`
    of them when given (one step of an iterative schedule), else `kept_count(size, ratio, round_to)`.

    A plan that removes nothing although `ratio` > 0 (every group smaller than `round_to`) is bad input.

    Example:
        >>> plan = plan_filter_pruning({"conv": torch.tensor([3.0, 1.0, 2.0, 0.5])}, 0.5, round_to=1)
        >>> plan.groups[0].keep
        (0, 2)
    """
    known = {g.name: g for g in groups or []}
    plans = []
    for name, s in scores.items():
        group = known.get(name, ChannelGroup(name, s.numel(), (), ()))
        k = counts[name] if counts is not None else kept_count(s.numel(), ratio, group_step(group, round_to))
        keep = _top_channels(s, snap_count(group, k), group.channel_groups)
        members = tuple(p.name for p in group.producers)
        plans.append(GroupPlan(name, s.numel(), keep, members, grouping_note(group, len(keep), round_to)))
    if counts is None and ratio > 0 and plans and all(p.kept == p.original for p in plans):
        sizes = sorted({p.original for p in plans})
        raise HybridPruneError(
            f"filter ratio {ratio} with --round-to {round_to} removes no channel: every group keeps all of its "
            f"{', '.join(map(str, sizes))} channels; use a smaller --round-to (e.g. {max(1, min(sizes) // 4)})"
        )
    return FilterPlan(ratio, round_to, tuple(plans))


def _top_channels(scores: torch.Tensor, k: int, split: int) -> tuple[int, ...]:
    """The k highest-scoring channels (sorted); split into `split` equal conv groups, the same k / split positions
    in every one, chosen by the mean score of each position over the conv groups (as Torch-Pruning does)."""
    if split == 1 or k == scores.numel():
        return tuple(sorted(torch.argsort(scores, stable=True)[scores.numel() - k :].tolist()))
    per = scores.numel() // split
    positions = _top_channels(scores.reshape(split, per).mean(dim=0), k // split, 1)
    return tuple(j * per + p for j in range(split) for p in positions)


def apply_filter_plan_(model: nn.Module, plan: FilterPlan, example_inputs: torch.Tensor | None = None) -> nn.Module:
    """Remove the planned channels physically, in place, through Torch-Pruning: every member of each group
    shrinks with it (BatchNorm, the next layers' inputs, residual partners, the flatten into a linear).
    The removal is appended to `model.pruning_history` (created on a plain module, with `pruning_input_shape`,
    the shape of one of `example_inputs`: see the module docstring).

    Example:
        >>> from hybridprune.models.sources import build_model
        >>> from hybridprune.pruning.metrics import ScoringContext, score_filters
        >>> m = build_model("alexnet", width=0.25)
        >>> plan = plan_filter_pruning(score_filters("l1", ScoringContext(m)), 0.5, round_to=8)
        >>> _ = apply_filter_plan_(m, plan)
        >>> [m.get_submodule(g.name).out_channels for g in plan.groups]
        [8, 24, 48, 32, 32]
    """
    example = example_input(model, example=example_inputs)
    graph = dependency_graph(model, example)
    for group in plan.groups:
        root = _root_conv(model, group)
        drop = [i for i in range(group.original) if i not in set(group.keep)]
        if drop:
            pruner = graph.get_pruner_of_module(root)
            try:
                graph.get_pruning_group(root, pruner.prune_out_channels, idxs=drop).prune()
            except Exception as e:  # noqa: BLE001 - Torch-Pruning's index mapping fails inside; the user needs one line
                raise HybridPruneError(
                    f"{_label(model)} cannot be filter-pruned: Torch-Pruning fails removing channels of the group of "
                    f"{group.name} ({first_line(e)}), a split, slice or reshape of channels it cannot map"
                ) from None
    check_runs(model, example)
    _remember(model, [_plain(entry) for entry in graph.pruning_history()], example)
    return model


def _label(model: nn.Module) -> str:
    return getattr(getattr(model, "source", None), "label", type(model).__name__)


@torch.no_grad()
def check_runs(model: nn.Module, example: torch.Tensor) -> None:
    """After channels went: the model still takes its input, in eval and in training mode, or one line names the
    module that fails on it (one that splits or slices channels by sizes it stores, which Torch-Pruning does not
    update: timm's MixedConv2d)."""
    running: list[str] = []
    handles = []
    for name, module in list(model.named_modules())[1:]:
        handles.append(module.register_forward_pre_hook(lambda *_, n=name: running.append(n)))
        handles.append(module.register_forward_hook(lambda *_: (running.pop(), None)[1]))  # None: output unchanged
    was_training = model.training
    try:
        model.eval()(example)
        training_forward(model, example)  # branches that run only in training (auxiliary heads) must take it too
    except Exception as e:  # noqa: BLE001 - whatever fails, the module and the first line of why
        where = f"{running[-1]} ({type(model.get_submodule(running[-1])).__name__})" if running else "its forward"
        raise HybridPruneError(
            f"{_label(model)} cannot be filter-pruned: after its channels were removed, {where} fails "
            f"({first_line(e)}); it splits, slices or sizes channels by numbers it stores, which Torch-Pruning "
            "does not update"
        ) from None
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def _remember(model: nn.Module, entries: list, example: torch.Tensor) -> None:
    """Append removals to the model's history; a plain module also learns the input shape it was traced with."""
    if not entries:
        return
    if known_input_shape(model) is None:
        model.pruning_input_shape = tuple(example.shape[1:])
    if getattr(model, "pruning_history", None) is None:
        model.pruning_history = []
    model.pruning_history.extend(entries)


def _root_conv(model: nn.Module, group: GroupPlan) -> nn.Conv2d:
    try:
        root = model.get_submodule(group.name)
    except AttributeError:
        root = None
    if not isinstance(root, nn.Conv2d) or root.out_channels != group.original:
        found = "missing" if not isinstance(root, nn.Conv2d) else f"has {root.out_channels} channels"
        raise HybridPruneError(
            f"filter plan does not fit the model: group {group.name!r} plans {group.original} channels, "
            f"the model's layer {found} (was the plan made for another model or already applied?)"
        )
    return root


def _plain(entry: list) -> list:
    """A history entry as plain JSON: [module name, prunes out channels, [indices]]."""
    name, is_out, idxs = entry
    return [str(name), bool(is_out), [int(i) for i in idxs]]


def replay_history_(model: nn.Module, history: list, example_inputs: torch.Tensor | None = None) -> nn.Module:
    """Redo a recorded pruning history on a freshly built original model (traced on `example_inputs` when it is
    a plain module), in place; a history that does not fit the model is bad input (one line).

    Example:
        >>> import torchvision
        >>> net, x = torchvision.models.resnet18(num_classes=10), torch.zeros(1, 3, 32, 32)
        >>> _ = apply_filter_plan_(net, FilterPlan(0.5, 1, (GroupPlan("layer1.0.conv1", 64, tuple(range(32))),)), x)
        >>> fresh = replay_history_(torchvision.models.resnet18(num_classes=10), net.pruning_history, x)
        >>> fresh.layer1[0].conv1.out_channels, fresh.pruning_input_shape
        (32, (3, 32, 32))
    """
    if not history:
        return model
    example = example_input(model, example=example_inputs)
    graph = dependency_graph(model, example)
    for name, is_out, idxs in history:
        module = _module_or_none(model, name)
        pruner = None if module is None else graph.get_pruner_of_module(module)
        channels = None if pruner is None else (pruner.get_out_channels if is_out else pruner.get_in_channels)(module)
        if (
            channels is None
            or not idxs
            or len(set(idxs)) != len(idxs)
            or max(idxs) >= channels
            or len(idxs) >= channels
        ):
            raise HybridPruneError(
                f"pruning history does not fit this model: {name!r} "
                + ("is not a prunable layer" if channels is None else f"has {channels} channels, history names {idxs}")
            )
        fn = pruner.prune_out_channels if is_out else pruner.prune_in_channels
        graph.get_pruning_group(module, fn, list(idxs)).prune(record_history=False)
    model.pruning_history = []
    _remember(model, [_plain(entry) for entry in history], example)
    return model


def _module_or_none(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None
