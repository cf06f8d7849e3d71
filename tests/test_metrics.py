import pytest
import torch

from conftest import make_model
from hybridprune.errors import HybridPruneError
from hybridprune.pruning.metrics import METRICS, ScoringContext, combine_hybrid, normalized_rank, score_filters


def _ctx(model, batches=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = [torch.rand(4, *model.input_shape, generator=gen) for _ in range(batches)]
    return ScoringContext(model, x, labels=[torch.tensor([0, 1, 2, 3])] * batches, seed=seed)


@pytest.mark.parametrize("metric", METRICS.names())
def test_every_metric_scores_every_channel_of_every_group_on_every_model(zoo_model, metric):
    ctx = _ctx(zoo_model)
    before = {k: v.clone() for k, v in zoo_model.state_dict().items()}
    scores = score_filters(metric, ctx)
    assert list(scores) == [g.name for g in ctx.groups] and scores
    assert [len(s) for s in scores.values()] == [g.size for g in ctx.groups]
    assert all(torch.isfinite(s).all() for s in scores.values())
    after = zoo_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # scoring never changes the model
    assert all(p.grad is None for p in zoo_model.parameters())
    assert not zoo_model.training


def test_l1_sums_over_every_conv_that_produces_a_residual_group():
    model = make_model("zoo:residual_net")
    ctx = _ctx(model)
    tied = next(g for g in ctx.groups if len(g.producers) == 3)
    expected = sum(model.get_submodule(p.name).weight.abs().sum(dim=(1, 2, 3)) for p in tied.producers)
    torch.testing.assert_close(score_filters("l1", ctx)[tied.name], expected.float())


def test_l1_is_the_sum_of_absolute_weights_of_a_single_conv(tiny_model):
    ctx = _ctx(tiny_model)
    scores = score_filters("l1", ctx)
    conv = tiny_model.net.features[2].conv
    assert torch.allclose(scores["net.features.2.conv"], conv.weight.abs().sum(dim=(1, 2, 3)))


def test_normalized_rank_orders_and_breaks_ties_by_index():
    assert normalized_rank(torch.tensor([3.0, 1.0, 2.0])).tolist() == [1.0, 0.0, 0.5]
    assert normalized_rank(torch.tensor([1.0, 1.0, 0.0])).tolist() == [0.5, 1.0, 0.0]


@pytest.mark.parametrize("name", ["alexnet", "zoo:plain_net"])
def test_hybrid_prefers_the_filter_whose_mass_survives_2_to_4(name):
    # Filter 0: large L1 spread evenly over every group of 4, so 2:4 keeps only half of it. Filter 1: smaller
    # L1 concentrated in 2 of every 4 input channels, so 2:4 keeps all of it.
    model = make_model(name)
    ctx = _ctx(model)
    group = next(g for g in ctx.groups[1:] if len(g.producers) == 1)
    conv = model.get_submodule(group.producers[0].name)
    w = torch.full_like(conv.weight, 0.001)
    w[0] = 1.0
    w[1] = 0.0
    w[1, 0::4] = 1.5
    w[1, 1::4] = 1.5
    with torch.no_grad():
        conv.weight.copy_(w)
    l1 = score_filters("l1", ctx)[group.name]
    hybrid = score_filters("hybrid", ctx)[group.name]
    assert l1[0] > l1[1]  # plain L1 ranks filter 0 first ...
    assert hybrid[1] > hybrid[0]  # ... the hybrid metric keeps filter 1, whose weights survive 2:4
    assert hybrid.argsort()[-1] == 1


def test_hybrid_is_the_minimum_of_the_two_ranks():
    dense = torch.tensor([4.0, 3.0, 2.0, 1.0])
    pruned = torch.tensor([1.0, 4.0, 3.0, 2.0])  # filter 0 ranks top dense but last after 2:4
    score = combine_hybrid(dense, pruned)
    assert score.argsort().tolist() == [0, 3, 2, 1]


def test_output_l1_reads_after_the_activation_that_follows_the_batchnorm(tiny_model):
    with torch.no_grad():
        tiny_model.net.features[0].bn.bias[3] = -100.0  # filter 3's output is always cut by ReLU
    scores = score_filters("output_l1", _ctx(tiny_model))["net.features.0.conv"]
    assert scores[3] == 0
    assert (scores[torch.arange(len(scores)) != 3] > 0).all()


def test_output_l1_in_a_residual_block_reads_the_last_batchnorm_before_the_add():
    model = make_model("zoo:residual_net")
    ctx = _ctx(model)
    with torch.no_grad():
        model.net.b1.bn1.bias[3] = -100.0  # followed by ReLU: channel 3 is cut to 0
        model.net.b3.bn2.bias[5] = -100.0  # meets the add before any ReLU: read as it is, |-100| is large
    scores = score_filters("output_l1", ctx)
    assert scores["net.b1.conv1"][3] == 0
    tied = next(g for g in ctx.groups if len(g.producers) == 3)
    assert scores[tied.name][5] > 50


def test_hybrid_output_scores_the_nm_pruned_copy_and_leaves_the_model_untouched(tiny_model):
    before = [p.detach().clone() for p in tiny_model.parameters()]
    ctx = _ctx(tiny_model)
    hybrid = score_filters("hybrid_output", ctx)
    dense = score_filters("output_l1", ctx)
    assert all(torch.equal(a, b) for a, b in zip(before, tiny_model.parameters(), strict=True))
    from hybridprune.pruning.metrics import normalized_rank as rank

    # a group after an N:M layer ranks differently once its inputs are 2:4-pruned
    assert any(not torch.equal(rank(dense[n]).argsort(), hybrid[n].argsort()) for n in list(dense)[1:])


def test_output_metrics_need_calibration_data(tiny_model):
    with pytest.raises(ValueError, match="calibration"):
        score_filters("output_l1", ScoringContext(tiny_model))


def test_random_is_seeded(tiny_model):
    a = score_filters("random", ScoringContext(tiny_model, seed=1))
    b = score_filters("random", ScoringContext(tiny_model, seed=1))
    c = score_filters("random", ScoringContext(tiny_model, seed=2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_unknown_metric_lists_the_valid_ones(tiny_model):
    with pytest.raises(HybridPruneError, match="valid names: .*hybrid"):
        score_filters("l3", ScoringContext(tiny_model))


def test_taylor_ranks_a_filter_with_no_effect_on_the_loss_last(tiny_model):
    block = tiny_model.net.features[4]
    with torch.no_grad():  # filter 5 is dead: zero weights and BN pushes its output below ReLU, so w * dL/dw is
        block.conv.weight[5] = 0  # zero in the conv, in its BN and in the next layer's inputs (the whole group)
        block.bn.bias[5] = -100.0
    scores = score_filters("taylor", _ctx(tiny_model))["net.features.4.conv"]
    assert scores.argmin() == 5


def test_fpgm_ranks_the_filter_far_from_all_others_first(tiny_model):
    conv = tiny_model.net.features[2].conv
    with torch.no_grad():
        conv.weight[:] = conv.weight[0].clone()  # every filter the same (so replaceable) ...
        conv.weight[3] *= 100  # ... except filter 3, far from the geometric median
    scores = score_filters("fpgm", ScoringContext(tiny_model))["net.features.2.conv"]
    assert scores.argmax() == 3
