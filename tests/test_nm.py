import pytest
import torch
from torch import nn

from hybridprune.config import NMPattern
from hybridprune.errors import HybridPruneError
from hybridprune.pruning.nm import apply_masks_, compute_masks, nm_eligibility, nm_mask, nm_prune_, satisfies_nm


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (2, 8)])
def test_conv_mask_keeps_exactly_n_per_group_along_input_channels(n, m):
    w = torch.randn(6, 16, 3, 3)
    mask = nm_mask(w, NMPattern(n, m))
    # groups run along `in` for each (out, kh, kw)
    groups = mask.permute(0, 2, 3, 1).reshape(6, 3, 3, 16 // m, m)
    assert (groups.sum(dim=-1) == n).all()


def test_conv_mask_keeps_the_largest_magnitudes_of_each_group():
    w = torch.zeros(1, 4, 1, 2)
    w[0, :, 0, 0] = torch.tensor([0.1, -5.0, 3.0, 0.2])  # keep channels 1 and 2 at position (0, 0)
    w[0, :, 0, 1] = torch.tensor([9.0, 0.0, 0.0, -8.0])  # keep channels 0 and 3 at position (0, 1)
    mask = nm_mask(w)
    assert mask[0, :, 0, 0].tolist() == [False, True, True, False]
    assert mask[0, :, 0, 1].tolist() == [True, False, False, True]


def test_linear_mask_groups_run_along_input_features():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0, -8.0, 7.0, 0.0, 0.0]])
    assert nm_mask(w).tolist() == [[False, False, True, True, True, True, False, False]]


def test_ties_keep_the_lower_index_deterministically():
    assert nm_mask(torch.ones(1, 4)).tolist() == [[True, True, False, False]]


def test_satisfies_nm_detects_violations():
    w = torch.randn(4, 8)
    assert not satisfies_nm(w)
    assert satisfies_nm(w * nm_mask(w))


def test_eligibility_keeps_first_conv_and_unaligned_layers_dense_with_a_reason():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 6, 3), nn.Conv2d(6, 4, 1), nn.Flatten(), nn.Linear(4, 2))
    report = {e.name: e for e in nm_eligibility(model)}
    assert not report["0"].eligible and "reads the image" in report["0"].reason
    assert report["1"].eligible
    assert not report["2"].eligible and "6 input channels" in report["2"].reason
    assert report["4"].eligible
    assert set(compute_masks(model)) == {"1", "4"}


def test_nm_prune_applies_masks_in_place(tiny_model):
    masks = nm_prune_(tiny_model)
    modules = dict(tiny_model.named_modules())
    assert masks and all(satisfies_nm(modules[name].weight) for name in masks)
    assert "net.features.0.conv" not in masks  # the first conv stays dense


class _StemRegisteredLast(nn.Module):
    """The conv that reads the image is registered after another conv: order must come from the forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.stem = nn.Conv2d(4, 8, 3, padding=1)  # 4 input channels: 2:4-shaped, so only the rule keeps it dense
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.body(self.depthwise(self.stem(x))).mean(dim=(2, 3)))


def test_the_conv_that_reads_the_image_is_found_in_forward_order_not_registration_order():
    from hybridprune.models.sources import build_model

    model = build_model("test_nm:_StemRegisteredLast", in_channels=4, num_classes=3, image_size=8)
    report = {e.name: e for e in nm_eligibility(model)}
    assert "reads the image" in report["net.stem"].reason
    assert report["net.body"].eligible
    assert "depthwise" in report["net.depthwise"].reason
    assert set(compute_masks(model)) == {"net.body", "net.head"}


def test_every_zoo_model_gets_masks_exactly_where_the_rule_says(zoo_model):
    masks = nm_prune_(zoo_model)
    report = nm_eligibility(zoo_model)
    assert set(masks) == {e.name for e in report if e.eligible}
    first_conv = next(e for e in report if e.kind == "conv")
    assert not first_conv.eligible and "reads the image" in first_conv.reason
    modules = dict(zoo_model.named_modules())
    for e in report:
        if e.kind == "conv" and modules[e.name].groups > 1:
            assert not e.eligible and "conv (groups=" in e.reason


def test_apply_masks_rejects_a_mask_of_another_shape():
    with pytest.raises(HybridPruneError, match="does not fit"):
        apply_masks_(nn.Sequential(nn.Linear(8, 4)), {"0": torch.ones(4, 4, dtype=torch.bool)})


@pytest.mark.parametrize("text", ["4:4", "3:2", "0:4", "a:b", "2-4"])
def test_bad_patterns_fail_with_a_clear_message(text):
    with pytest.raises(HybridPruneError, match="N:M"):
        NMPattern.parse(text)


def test_mask_of_unaligned_weight_is_refused():
    with pytest.raises(HybridPruneError, match="multiple of M=4"):
        nm_mask(torch.randn(4, 6))
