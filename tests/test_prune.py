import pytest
import torch

from hybridprune.config import PruneConfig
from hybridprune.errors import HybridPruneError
from hybridprune.metrics import ScoringContext, score_filters
from hybridprune.models import conv_blocks
from hybridprune.nm import nm_eligibility
from hybridprune.pipeline import prune_filters_
from hybridprune.prune import FilterPlan, LayerPlan, apply_filter_plan_, kept_count, plan_filter_pruning


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
    layer = plan.layers[0]
    assert layer.keep == (1, 2, 3, 7)
    assert layer.ratio == 0.5  # 40% asked, 50% after rounding to a multiple of 4


def _zero_filter(block, f):
    """Make filter f contribute nothing downstream: zero weights, and BN shifts its output below ReLU."""
    with torch.no_grad():
        block.conv.weight[f] = 0
        block.bn.bias[f] = -1.0
        block.bn.running_mean[f] = 0.0


@pytest.mark.parametrize("layer", [0, 2, 4])  # 4: the last conv, whose outputs feed the classifier
def test_removing_filters_that_contribute_nothing_leaves_logits_unchanged(tiny_model, layer):
    name, block = conv_blocks(tiny_model)[layer]
    n = block.conv.out_channels
    dead = list(range(0, n, 2))
    for f in dead:
        _zero_filter(block, f)
    x = torch.rand(3, 3, 32, 32)
    before = tiny_model(x)
    keep = tuple(f for f in range(n) if f not in dead)
    apply_filter_plan_(tiny_model, FilterPlan(0.5, 1, (LayerPlan(name, n, keep),)))
    assert block.conv.out_channels == len(keep) and block.bn.num_features == len(keep)
    torch.testing.assert_close(tiny_model(x), before, rtol=1e-5, atol=1e-5)


def test_pruning_is_physical_and_shrinks_the_next_layer(tiny_model):
    params_before = sum(p.numel() for p in tiny_model.parameters())
    plan = prune_filters_(tiny_model, PruneConfig(metric="l1", filter_ratio=0.4, round_to=8), [])
    widths = [b.conv.out_channels for _, b in conv_blocks(tiny_model)]
    assert widths == [lp.kept for lp in plan.layers] == [8, 32, 56, 40, 40]
    ins = [b.conv.in_channels for _, b in conv_blocks(tiny_model)][1:]
    assert ins == widths[:-1]
    assert tiny_model.classifier[1].in_features == widths[-1] * 4 * 4
    assert sum(p.numel() for p in tiny_model.parameters()) < params_before
    assert tiny_model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert tiny_model.spec()["widths"] == widths


def test_rounding_keeps_every_layer_after_the_first_2_to_4_eligible(tiny_model):
    prune_filters_(tiny_model, PruneConfig(metric="random", filter_ratio=0.7, round_to=16), [])
    report = nm_eligibility(tiny_model)
    assert [e.eligible for e in report] == [False] + [True] * (len(report) - 1)


def test_the_plan_follows_the_scores(tiny_model):
    scores = score_filters("l1", ScoringContext(tiny_model))
    name = next(iter(scores))
    plan = plan_filter_pruning(scores, 0.5, round_to=8)
    kept = set(plan.layers[0].keep)
    dropped = set(range(len(scores[name]))) - kept
    assert min(scores[name][list(kept)]) >= max(scores[name][list(dropped)])


def test_a_plan_for_another_model_is_refused(tiny_model):
    with pytest.raises(HybridPruneError, match="does not fit"):
        apply_filter_plan_(tiny_model, FilterPlan(0.5, 1, (LayerPlan("features.0", 99, (0,)),)))
