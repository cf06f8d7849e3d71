import pytest
import torch

from hybridprune.errors import HybridPruneError
from hybridprune.metrics import ScoringContext, combine_hybrid, normalized_rank, score_filters
from hybridprune.models import conv_blocks


def _set_conv(model, index, weight):
    name, block = conv_blocks(model)[index]
    with torch.no_grad():
        block.conv.weight.copy_(weight)
    return name


def test_l1_is_the_sum_of_absolute_weights(tiny_model):
    scores = score_filters("l1", ScoringContext(tiny_model))
    name, block = conv_blocks(tiny_model)[1]
    assert torch.allclose(scores[name], block.conv.weight.abs().sum(dim=(1, 2, 3)))
    assert [len(s) for s in scores.values()] == [b.conv.out_channels for _, b in conv_blocks(tiny_model)]


def test_normalized_rank_orders_and_breaks_ties_by_index():
    assert normalized_rank(torch.tensor([3.0, 1.0, 2.0])).tolist() == [1.0, 0.0, 0.5]
    assert normalized_rank(torch.tensor([1.0, 1.0, 0.0])).tolist() == [0.5, 1.0, 0.0]


def test_hybrid_prefers_the_filter_whose_mass_survives_2_to_4(tiny_model):
    # Filter 0: large L1 spread evenly over every group of 4, so 2:4 keeps only half of it (L1 16 -> 8 per
    # position). Filter 1: smaller L1 concentrated in 2 of every 4 channels, so 2:4 keeps all of it (12 -> 12).
    _, block = conv_blocks(tiny_model)[1]
    out, cin, kh, kw = block.conv.weight.shape
    w = torch.full((out, cin, kh, kw), 0.001)
    w[0] = 1.0
    w[1] = 0.0
    w[1, 0::4] = 1.5
    w[1, 1::4] = 1.5
    name = _set_conv(tiny_model, 1, w)
    l1 = score_filters("l1", ScoringContext(tiny_model))[name]
    hybrid = score_filters("hybrid", ScoringContext(tiny_model))[name]
    assert l1[0] > l1[1]  # plain L1 ranks filter 0 first ...
    assert hybrid[1] > hybrid[0]  # ... the hybrid metric keeps filter 1, whose weights survive 2:4
    assert hybrid.argsort()[-1] == 1


def test_hybrid_is_the_minimum_of_the_two_ranks():
    dense = torch.tensor([4.0, 3.0, 2.0, 1.0])
    pruned = torch.tensor([1.0, 4.0, 3.0, 2.0])  # filter 0 ranks top dense but last after 2:4
    score = combine_hybrid(dense, pruned)
    assert score.argsort().tolist() == [0, 3, 2, 1]


def test_output_l1_measures_post_relu_activations(tiny_model):
    name, block = conv_blocks(tiny_model)[0]
    with torch.no_grad():
        block.bn.bias[3] = -100.0  # filter 3's output is always cut by ReLU
    scores = score_filters("output_l1", ScoringContext(tiny_model, [torch.rand(4, 3, 32, 32)]))[name]
    assert scores[3] == 0
    assert (scores[torch.arange(len(scores)) != 3] > 0).all()


def test_hybrid_output_runs_on_calibration_batches(tiny_model):
    ctx = ScoringContext(tiny_model, [torch.rand(4, 3, 32, 32)])
    scores = score_filters("hybrid_output", ctx)
    assert all(torch.isfinite(s).all() for s in scores.values())
    before = [p.clone() for p in tiny_model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, tiny_model.parameters(), strict=True))  # model untouched


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


def test_torch_pruning_baselines_score_every_filter(tiny_model):
    x, y = [torch.rand(4, 3, 32, 32)], [torch.tensor([0, 1, 2, 3])]
    for metric in ("fpgm", "taylor"):
        scores = score_filters(metric, ScoringContext(tiny_model, x, labels=y))
        assert [len(s) for s in scores.values()] == [b.conv.out_channels for _, b in conv_blocks(tiny_model)]
        assert all(torch.isfinite(s).all() and (s >= 0).all() for s in scores.values())
    assert all(p.grad is None for p in tiny_model.parameters())  # taylor cleaned up its gradients


def test_taylor_ranks_a_filter_with_no_effect_on_the_loss_last(tiny_model):
    name, block = conv_blocks(tiny_model)[2]
    with torch.no_grad():  # filter 5 is dead: zero weights and BN pushes its output below ReLU, so w * dL/dw is
        block.conv.weight[5] = 0  # zero in the conv, in its BN and in the next layer's inputs (the whole group)
        block.bn.bias[5] = -100.0
    scores = score_filters(
        "taylor", ScoringContext(tiny_model, [torch.rand(4, 3, 32, 32)], labels=[torch.tensor([0, 1, 2, 3])])
    )[name]
    assert scores.argmin() == 5


def test_fpgm_ranks_the_filter_far_from_all_others_first(tiny_model):
    name, block = conv_blocks(tiny_model)[1]
    with torch.no_grad():
        w = block.conv.weight
        w[:] = w[0].clone()  # every filter the same (so replaceable) ...
        w[3] *= 100  # ... except filter 3, far from the geometric median
    scores = score_filters("fpgm", ScoringContext(tiny_model))[name]
    assert scores.argmax() == 3
