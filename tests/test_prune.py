import copy

import pytest
import torch
from torch import nn

from conftest import coupled_shapes_match, kill_channels, make_model
from hybridprune.config import PruneConfig
from hybridprune.errors import HybridPruneError
from hybridprune.models.sources import build_model
from hybridprune.pruning.filters import prune_filters_
from hybridprune.pruning.graph import channel_groups, dependency_graph
from hybridprune.pruning.metrics import ScoringContext, score_filters
from hybridprune.pruning.nm import apply_masks_, nm_eligibility, nm_prune_, satisfies_nm
from hybridprune.pruning.plan import FilterPlan, GroupPlan, apply_filter_plan_, kept_count, plan_filter_pruning


@pytest.mark.parametrize(
    "n,ratio,round_to,kept",
    [(64, 0.4, 16, 32), (64, 0.4, 8, 40), (192, 0.4, 16, 112), (64, 0.0, 16, 64), (16, 0.9, 16, 16), (10, 0.5, 16, 10)],
)
def test_kept_count_rounds_to_a_multiple_within_bounds(n, ratio, round_to, kept):
    assert kept_count(n, ratio, round_to) == kept


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan")])
def test_ratios_outside_zero_one_are_refused(ratio):
    with pytest.raises(HybridPruneError, match=r"outside \[0, 1\)"):
        kept_count(64, ratio, 8)


def test_plan_keeps_the_highest_scores_and_reports_the_real_ratio():
    plan = plan_filter_pruning({"a": torch.tensor([0.5, 3.0, 1.0, 2.0, 0.1, 0.2, 0.3, 4.0])}, 0.4, round_to=4)
    group = plan.groups[0]
    assert group.keep == (1, 2, 3, 7)
    assert group.ratio == 0.5  # 40% asked, 50% after rounding to a multiple of 4


def test_a_round_to_that_prunes_nothing_is_refused():
    with pytest.raises(HybridPruneError, match="removes no channel.*smaller --round-to"):
        plan_filter_pruning({"a": torch.rand(16), "b": torch.rand(8)}, 0.4, round_to=32)


def _groups(model):
    return channel_groups(model, dependency_graph(model))


@pytest.mark.parametrize("which", [0, -1])  # the first group, and the last (feeding the head)
def test_removing_channels_that_contribute_nothing_leaves_logits_unchanged(zoo_model, which):
    group = _groups(zoo_model)[which]
    dead = list(range(0, group.size, 2))
    kill_channels(zoo_model, group, dead)
    x = torch.rand(3, *zoo_model.input_shape)
    before = zoo_model(x)
    keep = tuple(c for c in range(group.size) if c not in dead)
    apply_filter_plan_(zoo_model, FilterPlan(0.5, 1, (GroupPlan(group.name, group.size, keep),)))
    assert zoo_model.get_submodule(group.name).out_channels == len(keep)
    torch.testing.assert_close(zoo_model(x), before, rtol=1e-4, atol=1e-5)


def test_removing_live_channels_changes_the_logits(zoo_model):
    """The guard for the test above: the same removal of channels that do contribute must show."""
    group = _groups(zoo_model)[0]
    x = torch.rand(3, *zoo_model.input_shape)
    before = zoo_model(x)
    keep = tuple(range(1, group.size, 2))
    apply_filter_plan_(zoo_model, FilterPlan(0.5, 1, (GroupPlan(group.name, group.size, keep),)))
    assert not torch.allclose(zoo_model(x), before, atol=1e-3)


def test_filter_pruning_then_nm_then_a_step_holds_the_pattern_and_the_shapes(zoo_model):
    params = sum(p.numel() for p in zoo_model.parameters())
    plan = prune_filters_(zoo_model, PruneConfig(metric="hybrid", filter_ratio=0.4, round_to=4), [])
    assert all(zoo_model.get_submodule(g.name).out_channels == g.kept for g in plan.groups)
    assert any(g.kept < g.original for g in plan.groups)
    assert sum(p.numel() for p in zoo_model.parameters()) < params  # physical removal
    coupled_shapes_match(zoo_model)
    masks = nm_prune_(zoo_model)
    assert masks
    zoo_model.train()
    opt = torch.optim.SGD(zoo_model.parameters(), lr=0.1)
    loss = zoo_model(torch.rand(4, *zoo_model.input_shape)).logsumexp(dim=1).mean()
    loss.backward()
    opt.step()
    apply_masks_(zoo_model, masks)
    modules = dict(zoo_model.named_modules())
    assert all(satisfies_nm(modules[n].weight) for n in masks)


def test_residual_partners_are_pruned_as_one_group():
    model = make_model("zoo:residual_net")
    groups = {g.name: g for g in _groups(model)}
    tied = next(g for g in groups.values() if "net.b2.shortcut.0" in [p.name for p in g.producers])
    assert {p.name for p in tied.producers} == {"net.b2.shortcut.0", "net.b2.conv2", "net.b3.conv2"}
    plan = prune_filters_(model, PruneConfig(metric="l1", filter_ratio=0.5, round_to=4), [])
    kept = next(g.kept for g in plan.groups if g.name == tied.name)
    for name in ("b2.shortcut.0", "b2.conv2", "b3.conv2", "b3.conv1"):
        conv = model.get_submodule("net." + name)
        assert (conv.in_channels if name == "b3.conv1" else conv.out_channels) == kept
    assert model.net.fc.in_features == kept


def test_concatenated_branches_shrink_the_consumer_by_both_removals():
    model = make_model("zoo:concat_net")
    plan = prune_filters_(model, PruneConfig(metric="l1", filter_ratio=0.5, round_to=4), [])
    kept = {g.name: g.kept for g in plan.groups}
    assert model.net.mix[0].in_channels == kept["net.left.0"] + kept["net.right.0"]


def test_the_head_and_ignored_modules_are_never_pruned():
    model = make_model("resnet20")
    plan = prune_filters_(model, PruneConfig(metric="l1", filter_ratio=0.5, round_to=4, ignore=("layers.8",)), [])
    assert model.net.fc.out_features == 10
    assert model.net.layers[8].conv1.out_channels == 64
    assert "net.layers.8.conv1" not in {g.name for g in plan.groups}
    with pytest.raises(HybridPruneError, match="--ignore names no module nope"):
        prune_filters_(model, PruneConfig(metric="l1", ignore=("nope",)), [])


def test_rounding_keeps_every_layer_after_the_first_2_to_4_eligible(tiny_model):
    prune_filters_(tiny_model, PruneConfig(metric="random", filter_ratio=0.7, round_to=16), [])
    report = nm_eligibility(tiny_model)
    assert [e.eligible for e in report] == [False] + [True] * (len(report) - 1)


def test_the_plan_follows_the_scores(zoo_model):
    ctx = ScoringContext(zoo_model)
    scores = score_filters("l1", ctx)
    plan = plan_filter_pruning(scores, 0.5, round_to=4, groups=ctx.groups)
    for g in plan.groups:
        dropped = sorted(set(range(g.original)) - set(g.keep))
        if dropped:
            assert min(scores[g.name][list(g.keep)]) >= max(scores[g.name][dropped])


def test_a_plan_for_another_model_is_refused(tiny_model):
    with pytest.raises(HybridPruneError, match="does not fit"):
        apply_filter_plan_(tiny_model, FilterPlan(0.5, 1, (GroupPlan("net.features.0.conv", 99, (0,)),)))


def test_a_model_torch_pruning_cannot_trace_stops_with_one_line():
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.fc = nn.Linear(8, 10)

        def forward(self, x):
            y = self.conv(x).detach()  # no autograd path: nothing to trace
            return self.fc(y.mean(dim=(2, 3)))

    import sys

    sys.modules[__name__].Untraceable = Untraceable
    model = build_model(f"{__name__}:Untraceable", image_size=8)
    with pytest.raises(HybridPruneError) as err:
        prune_filters_(model, PruneConfig(metric="l1"), [])
    assert "\n" not in str(err.value)


def test_pruning_history_replays_to_the_same_model(zoo_model):
    reference = copy.deepcopy(zoo_model)
    prune_filters_(zoo_model, PruneConfig(metric="l1", filter_ratio=0.5, round_to=4), [])
    from hybridprune.pruning.plan import replay_history_

    replayed = replay_history_(reference, zoo_model.pruning_history)
    assert [tuple(p.shape) for p in replayed.parameters()] == [tuple(p.shape) for p in zoo_model.parameters()]
    x = torch.rand(2, *zoo_model.input_shape)
    torch.testing.assert_close(replayed(x), zoo_model(x))


@pytest.mark.parametrize("steps", [1, 2, 3, 5])
def test_the_step_schedule_shrinks_monotonically_to_the_one_step_counts(steps):
    from hybridprune.pruning.plan import step_counts

    sizes = {"a": 64, "b": 16, "c": 100}
    final = {n: kept_count(s, 0.6, 8) for n, s in sizes.items()}
    schedule = step_counts(sizes, final, steps, 8)
    assert len(schedule) == steps and schedule[-1] == final
    for name, size in sizes.items():
        path = [size] + [s[name] for s in schedule]
        assert all(a >= b for a, b in zip(path, path[1:], strict=False)), path
        assert all(c % 8 == 0 or c in (size, final[name]) for c in path)


@pytest.mark.parametrize("steps", [2, 3])
def test_iterative_pruning_removes_exactly_the_planned_counts_and_maps_to_original_channels(zoo_model, steps):
    original = copy.deepcopy(zoo_model)
    one_step = prune_filters_(copy.deepcopy(zoo_model), PruneConfig(metric="l1", filter_ratio=0.5, round_to=4), [])
    seen = []
    cfg = PruneConfig(metric="l1", filter_ratio=0.5, round_to=4, steps=steps)
    plan = prune_filters_(zoo_model, cfg, [], between=lambda m, step: seen.append(step))
    assert seen == list(range(1, steps))  # called between steps, not after the last
    assert [(g.name, g.original, g.kept) for g in plan.groups] == [
        (g.name, g.original, g.kept) for g in one_step.groups
    ]
    for g in plan.groups:
        assert zoo_model.get_submodule(g.name).out_channels == g.kept
    first = plan.groups[0]  # the group fed by the image: its filters keep all their input channels
    conv = first.members[0]
    kept = original.get_submodule(conv).weight[list(first.keep)]
    assert torch.equal(zoo_model.get_submodule(conv).weight, kept)


@pytest.mark.slow
def test_iterative_pruning_spends_the_same_fine_tuning_epochs(monkeypatch, tmp_path):
    from hybridprune.cli import main
    from hybridprune.experiments import job as pipeline

    epochs = []
    real_fit = pipeline.fit

    def counting_fit(model, data, cfg, *args, desc="", **kwargs):
        if "l1 filter" in desc or "l1 step" in desc:
            epochs.append(cfg.epochs)
        return real_fit(model, data, cfg, *args, desc=desc, **kwargs)

    monkeypatch.setattr(pipeline, "fit", counting_fit)
    args = ["run", "--model", "resnet20", "--width", "0.5", "--train-size", "64", "--test-size", "32", "--epochs", "0"]
    args += ["--finetune-epochs", "3", "--prune-steps", "2", "--round-to", "4", "--metric", "l1", "--no-progress"]
    assert main([*args, "--batch-size", "32", "--out", str(tmp_path / "run")]) == 0
    assert epochs == [2, 1]  # after step 1, then the stage's own fine-tune: 3 in all, as with one step


def _self_labelled(model: nn.Module, batches: int = 2) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Random images labelled with the model's own predictions: its accuracy starts at 100%, and a drop
    measures how much pruning changes its answers."""
    torch.manual_seed(0)
    images = [torch.randn(32, *model.input_shape) for _ in range(batches)]
    with torch.no_grad():
        labels = [model.eval()(x).argmax(1) for x in images]
    return images, labels


# sensitivity measures an accuracy curve per group on pruned copies: the slow part of this test
@pytest.mark.parametrize("allocation", ["uniform", "global", pytest.param("sensitivity", marks=pytest.mark.slow)])
@pytest.mark.parametrize("target", [0.3, 0.6])
def test_a_mac_target_is_met_within_one_rounding_step(zoo_model, allocation, target):
    """At most `target` x the dense MACs, and pruned no further than one `round_to` step per group past it:
    giving every group one rounding step of channels back (up to its size) goes over the target."""
    from hybridprune.models.counts import layer_macs
    from hybridprune.pruning.allocate import macs_after

    dense = copy.deepcopy(zoo_model)
    budget = target * sum(layer_macs(dense).values())
    cfg = PruneConfig(metric="l1", round_to=4, allocation=allocation, target_macs=target)
    images, labels = _self_labelled(zoo_model)
    try:
        plan = prune_filters_(zoo_model, cfg, images, labels=labels)
    except HybridPruneError as e:  # a model too small to reach the target says so in one line
        assert "cannot be reached" in str(e) and target == 0.3
        return
    assert sum(layer_macs(zoo_model).values()) <= budget
    one_step_back = {g.name: min(g.original, g.kept + cfg.round_to) for g in plan.groups}
    ctx = ScoringContext(dense)  # which channels come back does not change the MACs, only how many
    assert macs_after(dense, ctx.groups, score_filters("l1", ctx), one_step_back) > budget, plan.groups


def test_global_allocation_prunes_the_groups_that_matter_less_more():
    from hybridprune.pruning.allocate import counts_at

    model = make_model("zoo:plain_net")
    ctx = ScoringContext(model)
    scores = score_filters("l1", ctx)
    quiet = ctx.groups[1].name
    scores[quiet] = scores[quiet] * torch.linspace(0.01, 1, len(scores[quiet]))  # spread: many weak channels
    uniform = counts_at(0.4, "uniform", ctx.groups, scores, 4)
    global_ = counts_at(0.4, "global", ctx.groups, scores, 4)
    assert global_[quiet] < uniform[quiet]
    assert sum(global_.values()) == pytest.approx(sum(uniform.values()), abs=3 * 4)
    with pytest.raises(HybridPruneError, match="unknown allocation 'greedy'; valid: uniform, global, sensitivity"):
        PruneConfig(allocation="greedy")
    with pytest.raises(HybridPruneError, match="at most 0.8 .its largest probe"):
        PruneConfig(allocation="sensitivity", filter_ratio=0.85)
    assert PruneConfig(allocation="sensitivity", filter_ratio=0.85, target_macs=0.2).target_macs == 0.2


def _fitted_to_random_labels(model: nn.Module, steps: int = 40) -> nn.Module:
    """An untrained net answers one class for every image, so no pruning changes its accuracy; a few steps on
    random labels make its answers differ, and removing live channels then changes some of them."""
    torch.manual_seed(0)
    x, y = torch.randn(64, *model.input_shape), torch.randint(0, 10, (64,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("name", ["zoo:plain_net", "zoo:residual_net", "zoo:concat_net"])
def test_sensitivity_allocation_spares_the_sensitive_group_and_takes_from_the_robust_one(name):
    from hybridprune.pruning.allocate import counts_at, measure_sensitivity

    model = _fitted_to_random_labels(make_model(name))  # so its answers differ between images
    ctx = ScoringContext(model)
    robust = ctx.groups[1]
    kill_channels(model, robust, list(range(robust.size * 3 // 4)))  # 3/4 of it computes nothing
    images, labels = _self_labelled(model)
    scores = score_filters("l1", ScoringContext(model))  # the dead channels score 0: they go first
    curves = measure_sensitivity(model, ctx.groups, scores, images, labels, round_to=4)
    assert [d for r, d in curves[robust.name] if r <= 0.6] == [0.0] * 4  # dead channels cost nothing
    assert any(d > 0 for c in curves.values() for _, d in c)  # and other groups do cost something
    uniform = counts_at(0.4, "uniform", ctx.groups, scores, 4)
    sensitive = counts_at(0.4, "sensitivity", ctx.groups, scores, 4, curves)
    assert sensitive[robust.name] < uniform[robust.name]
    assert sum(sensitive.values()) <= sum(uniform.values()) + 4  # the same overall ratio, within rounding
    others = [g.name for g in ctx.groups if g.name != robust.name]
    assert sum(sensitive[n] for n in others) > sum(uniform[n] for n in others)


def test_sensitivity_tolerance_is_the_smallest_that_reaches_the_ratio():
    from hybridprune.pruning.allocate import counts_at, tolerated_ratio
    from hybridprune.pruning.graph import ChannelGroup

    groups = [ChannelGroup("a", 10, (), ()), ChannelGroup("b", 10, (), ())]
    curves = {"a": [(0, 0), (0.5, 1.0), (0.8, 2.0)], "b": [(0, 0), (0.2, 10.0), (0.8, 20.0)]}
    assert counts_at(0.4, "sensitivity", groups, {}, 1, curves) == {"a": 2, "b": 10}  # a alone gives 0.8 of itself
    assert counts_at(0.5, "sensitivity", groups, {}, 1, curves) == {"a": 2, "b": 8}  # then b, as little as needed
    assert tolerated_ratio([(0, 0), (0.4, 5.0), (0.8, 1.0)], 2.0) == pytest.approx(
        0.16, abs=1e-3
    )  # a dip is no licence
