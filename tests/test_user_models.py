"""Every public step on models the user built (the zoo's classes, torchvision's constructors), never through
build_model: scoring, filter pruning with every allocation, 2:4, permutations, BatchNorm recalibration, the
inference model, ONNX export, bench, and a checkpoint that rebuilds from a fresh instance with identical logits."""

import copy

import pytest
import torch
import torchvision
from torch import nn

import hybridprune as hp
from hybridprune.deploy.bench import Variant, bench
from hybridprune.deploy.export import export_onnx
from hybridprune.deploy.sparse import to_inference_model
from hybridprune.errors import HybridPruneError
from hybridprune.pruning.nm import satisfies_nm
from zoo import ZOO, randomize_batchnorm_

TORCHVISION = {"resnet18": 16, "mobilenet_v2": 32}  # input sizes: small, these are CPU tests


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = ZOO[name]() if name in ZOO else getattr(torchvision.models, name)(num_classes=10)
    return randomize_batchnorm_(net, seed).eval()


def images(name: str, n: int = 4, seed: int = 0) -> torch.Tensor:
    size = TORCHVISION.get(name, 16)
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def cfg(name: str, **kw) -> hp.PruneConfig:
    return hp.PruneConfig(**{"metric": "hybrid", "filter_ratio": 0.5, "round_to": 4 if name in ZOO else 8, **kw})


ALL = [*ZOO, *[pytest.param(n, marks=pytest.mark.slow) for n in TORCHVISION]]


@pytest.mark.parametrize("name", ALL)
def test_prune_2_4_save_and_rebuild_from_a_fresh_instance(name, tmp_path, one_torch_thread):
    net, x = build(name), images(name)
    plan = hp.prune_filters_(net, cfg(name), [x])
    assert any(g.kept < g.original for g in plan.groups) and net.pruning_history
    assert net.pruning_input_shape == tuple(x.shape[1:])
    hp.recalibrate_bn_(net, [images(name, seed=s) for s in range(2)])
    masks = hp.nm_prune_(net)  # the recorded input shape traces it: no example needed again
    first = hp.nm_eligibility(net)[0]
    assert first.kind == "conv" and not first.eligible  # the conv that reads the image stays dense
    assert masks and all(satisfies_nm(net.get_submodule(n).weight) for n in masks)
    path = hp.save_checkpoint(tmp_path / "m.safetensors", net, masks, {"note": name})
    fresh = build(name, seed=1)  # other weights: everything must come from the file
    loaded, loaded_masks, meta = hp.load_checkpoint(path, model=fresh)
    assert loaded is fresh and meta == {"note": name}
    assert torch.equal(loaded(x), net.eval()(x))
    assert loaded.pruning_history == net.pruning_history
    assert all(torch.equal(loaded_masks[n], m) for n, m in masks.items()) and loaded_masks.keys() == masks.keys()


ALLOCATIONS = [(name, "global", {}) for name in ZOO] + [
    ("residual", "sensitivity", {}),
    ("concat", "sensitivity", {}),
    ("residual", "uniform", {"target_macs": 0.6}),
    ("depthwise", "global", {"target_macs": 0.6}),
    ("concat", "uniform", {"steps": 2}),
]  # uniform: every test above


@pytest.mark.parametrize("name,allocation,extra", ALLOCATIONS)
def test_every_allocation_prunes_a_plain_module(name, allocation, extra):
    net, x = build(name), images(name, 8)
    labels = [net(x).argmax(1)]
    dense_macs = hp.model_stats(net, example_inputs=x)["macs"]
    hp.prune_filters_(net, cfg(name, allocation=allocation, **extra), [x], labels=labels)
    assert net(x).shape == (8, 10)
    macs = hp.model_stats(net)["macs"]  # the recorded input shape serves
    assert macs <= extra.get("target_macs", 1.0) * dense_macs and macs < dense_macs


@pytest.mark.parametrize("metric", sorted(hp.METRICS.names()))
def test_every_metric_scores_a_plain_module_on_its_example_input(metric):
    net, x = build("depthwise"), images("depthwise", 2)
    ctx = hp.ScoringContext(net, [x], labels=[torch.tensor([0, 1])], example_inputs=x[:1])
    scores = hp.score_filters(metric, ctx)
    assert scores.keys() == {g.name for g in ctx.groups}
    assert [len(s) for s in scores.values()] == [g.size for g in ctx.groups]


def test_only_the_example_or_only_calibration_images_serve_as_both():
    net, x = build("residual"), images("residual")
    by_example = hp.score_filters("output_l1", hp.ScoringContext(net, example_inputs=x))
    by_images = hp.score_filters("output_l1", hp.ScoringContext(net, [x]))
    assert all(torch.equal(by_example[k], by_images[k]) for k in by_images)


def test_the_head_is_found_by_tracing_or_named():
    net, x = build("plain"), images("plain")
    traced = hp.ScoringContext(net, example_inputs=x).groups
    named = hp.ScoringContext(net, example_inputs=x, head="body.3").groups  # the last conv, named as the head
    assert "body.3" in [g.name for g in traced] and "body.3" not in [g.name for g in named]
    with pytest.raises(HybridPruneError, match="head 'nope' is not a conv or linear"):
        _ = hp.ScoringContext(net, example_inputs=x, head="nope").groups
    plan = hp.prune_filters_(net, cfg("plain", ignore=("stem",)), [x])
    assert "stem" not in [g.name for g in plan.groups]  # a plain module's own names, without `net.`


@pytest.mark.parametrize("name", ["residual", "concat"])
def test_permutation_inference_model_export_and_bench_take_a_plain_module(name, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    net, x = build(name), images(name)
    reference = net(x)
    hp.permute_for_nm_(net, tries_per_channel=2, example_inputs=x)
    assert torch.allclose(net(x), reference, atol=1e-5)  # the same function
    masks = hp.nm_prune_(net, example_inputs=x)
    inference = to_inference_model(net, masks, torch.device("cpu"), torch.float32, choose="gemm", example_inputs=x)
    assert torch.allclose(inference.model(x), net(x), atol=1e-4)
    path = export_onnx(net, tmp_path / "m.onnx", example_inputs=x)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})[0]
    assert torch.allclose(torch.from_numpy(got), net(x), atol=1e-4)
    result = bench([Variant("nm", net, masks)], torch.device("cpu"), [torch.float32], [2], rounds=1, calls=1,
                   warmup=0, progress=False, example_inputs=x)  # fmt: skip
    assert result["runs"] and result["layers"]


def test_a_plain_module_without_an_example_is_asked_for_one():
    with pytest.raises(HybridPruneError, match="pass example_inputs="):
        hp.prune_filters_(build("plain"), cfg("plain"), [])


def test_an_example_the_model_cannot_take_is_one_line():
    net = build("plain")
    with pytest.raises(HybridPruneError, match=r"cannot take an input of shape \(1, 1, 16, 16\)") as e:
        hp.prune_filters_(net, cfg("plain"), [torch.rand(2, 1, 16, 16)])
    assert "\n" not in str(e.value)
    with pytest.raises(HybridPruneError, match="example_inputs must be a non-empty batch"):
        hp.nm_prune_(net, example_inputs="images")


def test_a_history_that_does_not_fit_the_instance_is_one_line(tmp_path):
    net, x = build("residual"), images("residual")
    hp.prune_filters_(net, cfg("residual"), [x])
    path = hp.save_checkpoint(tmp_path / "m.safetensors", net)
    with pytest.raises(HybridPruneError, match="pruning history does not fit") as e:
        hp.load_checkpoint(path, model=build("plain"))
    assert "zoo.ResidualNet" in str(e.value) and "PlainNet" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(HybridPruneError, match="unpruned instance; this ResidualNet is pruned"):
        hp.load_checkpoint(path, model=net)
    with pytest.raises(HybridPruneError, match=r"load_checkpoint\(path, model="):
        hp.load_checkpoint(path)
    other = ZOO["residual"](num_classes=7)  # the same history fits, the head's weights do not
    with pytest.raises(HybridPruneError, match="weights do not match the model"):
        hp.load_checkpoint(path, model=other)


def test_a_dense_plain_module_round_trips_and_a_classifier_checkpoint_wants_a_classifier(tmp_path):
    net, x = build("depthwise"), images("depthwise")
    masks = hp.nm_prune_(net, example_inputs=x)
    path = hp.save_checkpoint(tmp_path / "nm.safetensors", copy.deepcopy(net), masks)
    loaded, loaded_masks, _ = hp.load_checkpoint(path, model=build("depthwise", seed=3))
    assert torch.equal(loaded(x), net(x)) and loaded_masks.keys() == masks.keys()
    classifier = hp.build_model("zoo:depthwise_net", image_size=16)
    saved = hp.save_checkpoint(tmp_path / "c.safetensors", classifier)
    with pytest.raises(HybridPruneError, match="wrapped by hybridprune"):
        hp.load_checkpoint(saved, model=build("depthwise"))
    assert hp.load_checkpoint(saved, model="zoo:depthwise_net")[0].source.name == "zoo:depthwise_net"
    fresh = hp.build_model("zoo:depthwise_net", image_size=16)
    assert hp.load_checkpoint(saved, model=fresh)[0] is fresh
