"""Channel permutations before N:M: the network computes the same function, more magnitude survives."""

import json

import torch

from conftest import make_model
from hybridprune.cli import main
from hybridprune.config import NMPattern
from hybridprune.pruning.nm import eligible_layers, nm_prune_weight
from hybridprune.pruning.permute import kept_magnitude, permute_for_nm_


def _kept_everywhere(model) -> float:
    return sum(
        float(nm_prune_weight(model.get_submodule(n).weight.detach(), NMPattern()).abs().sum())
        for n in eligible_layers(model)
    )


def test_a_permuted_model_computes_the_same_logits_and_keeps_more_magnitude(zoo_model):
    x = torch.rand(4, *zoo_model.input_shape)
    before_logits, before_kept = zoo_model(x), _kept_everywhere(zoo_model)
    reports = permute_for_nm_(zoo_model, tries_per_channel=5)
    torch.testing.assert_close(zoo_model(x), before_logits, rtol=1e-5, atol=1e-6)
    assert reports and all(r.kept_after >= r.kept_before for r in reports)  # swaps are kept only when they gain
    assert any(r.kept_after > r.kept_before for r in reports)
    assert _kept_everywhere(zoo_model) >= before_kept


def test_the_report_is_the_magnitude_n_m_keeps_in_the_reading_layers():
    model = make_model("zoo:residual_net")
    reports = {r.group: r for r in permute_for_nm_(model, tries_per_channel=5)}
    for r in reports.values():
        weights = [model.get_submodule(n).weight.detach() for n in r.layers]
        assert abs(kept_magnitude(weights, NMPattern()) - r.kept_after) < 1e-3 * r.kept_after


def test_run_with_permute_records_the_magnitude_before_and_after(tmp_path):
    out = tmp_path / "run"
    args = ["run", "--model", "zoo:residual_net", "--train-size", "64", "--test-size", "32", "--epochs", "1"]
    args += ["--finetune-epochs", "1", "--batch-size", "32", "--round-to", "4", "--metric", "l1", "--permute"]
    assert main([*args, "--no-progress", "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    for stage in (result["results"][0]["hybrid"], result["nm"]):
        assert stage["permutation"] and all(p["kept_after"] >= p["kept_before"] for p in stage["permutation"])
    assert "permutation" not in result["results"][0]["filter"]
