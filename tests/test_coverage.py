"""Every CNN family a user brings: the smallest member of each CNN family in torchvision's classification
registry and a dozen timm families, through the whole chain at a small input (build, prune 40% of every
channel group with l1, 2:4, one optimizer step with the masks held, the pattern, a checkpoint round trip to
identical logits, the inference model's outputs). A model is supported or refused in one line, and only the
refusals listed in REFUSED are allowed. Transformers (ViT, Swin, MaxViT) are out of scope: see EXCLUDED.

The large models run in the slow part (plain pytest, as CI does); `-m "not slow"` keeps to about three
minutes on two CPU cores.
"""

import pytest
import torch

from helpers import call
from hybridprune.config import ModelSource, PruneConfig, TrainConfig
from hybridprune.data.images import Dataset, ImageSet
from hybridprune.deploy.sparse import to_inference_model
from hybridprune.errors import HybridPruneError
from hybridprune.models.counts import model_stats
from hybridprune.models.sources import build_model
from hybridprune.pruning.checkpoint import load_checkpoint, save_checkpoint
from hybridprune.pruning.filters import prune_filters_
from hybridprune.pruning.nm import nm_eligibility, nm_prune_, satisfies_nm
from hybridprune.pruning.permute import permute_for_nm_
from hybridprune.training.loop import fit
from hybridprune.training.masks import hold_masks

slow = pytest.mark.slow

# (model, input side); the smallest member of each family at the smallest side its layers take
TORCHVISION = [
    pytest.param("torchvision:alexnet", 64, marks=slow),
    pytest.param("torchvision:vgg11_bn", 32, marks=slow),
    pytest.param("torchvision:resnet18", 32, marks=slow),
    pytest.param("torchvision:resnext50_32x4d", 32, marks=slow),
    pytest.param("torchvision:wide_resnet50_2", 32, marks=slow),
    ("torchvision:squeezenet1_0", 32),
    pytest.param("torchvision:densenet121", 32, marks=slow),
    pytest.param("torchvision:googlenet", 32, marks=slow),
    pytest.param("torchvision:inception_v3", 75, marks=slow),  # its smallest side: too small for its aux head
    pytest.param("torchvision:mobilenet_v2", 32, marks=slow),
    ("torchvision:mobilenet_v3_small", 32),
    ("torchvision:mnasnet0_5", 32),
    ("torchvision:shufflenet_v2_x0_5", 32),
    pytest.param("torchvision:efficientnet_b0", 32, marks=slow),
    pytest.param("torchvision:efficientnet_v2_s", 32, marks=slow),
    pytest.param("torchvision:regnet_x_400mf", 32, marks=slow),
    pytest.param("torchvision:regnet_y_400mf", 32, marks=slow),
    pytest.param("torchvision:convnext_tiny", 32, marks=slow),
]
# transformers: attention, not conv channel groups; out of scope
EXCLUDED = ["vit_b_16 and the other ViTs", "swin_t, swin_v2_t", "maxvit_t"]
TIMM = [
    ("timm:resnet10t", 32),  # residual
    pytest.param("timm:resnext26ts", 32, marks=slow),  # grouped
    ("timm:regnetx_002", 32),  # grouped
    ("timm:mobilenetv3_small_050", 32),  # depthwise, SE, hard-swish
    ("timm:tinynet_e", 32),  # EfficientNet family
    ("timm:lcnet_050", 32),  # depthwise
    ("timm:ghostnet_050", 32),  # ghost modules
    pytest.param("timm:densenet121", 32, marks=slow),  # dense
    pytest.param("timm:cspresnet50", 32, marks=slow),  # cross-stage partial
    pytest.param("timm:dla34", 32, marks=slow),  # deep layer aggregation
    ("timm:ese_vovnet19b_slim_dw", 32),  # one-shot aggregation
    pytest.param("timm:res2net50_14w_8s", 32, marks=slow),  # split into scales
    pytest.param("timm:resnest14d", 32, marks=slow),  # split attention
    ("timm:convnext_atto", 32),  # LayerNorm, 7x7 depthwise
    ("timm:mixnet_s", 32),  # mixed kernels over channel splits
]
# the only models refused, each with what its one line must say
REFUSED = {
    "torchvision:shufflenet_v2_x0_5": "a reshape or view (a channel shuffle",
    # after removal a module fails: sizes or slices of channels that Torch-Pruning does not update
    "timm:ghostnet_050": "net.blocks.3.0.ghost1.primary_conv.0 (Conv2d) fails",
    "timm:mixnet_s": "(MixedConv2d) fails (RuntimeError: split_with_sizes",
    "timm:cspresnet50": "net.stages.0.blocks.0.conv1.conv (Conv2d) fails",
    "timm:res2net50_14w_8s": "net.layer1.0.convs.0 (Conv2d) fails",
}


@pytest.mark.parametrize("name, size", TORCHVISION + TIMM)
def test_every_cnn_family_prunes_through_the_whole_chain_or_is_refused_in_one_line(name, size, tmp_path):
    if name.startswith("timm:"):
        pytest.importorskip("timm")
    torch.manual_seed(0)
    model = build_model(name, image_size=size).eval()
    x = torch.rand(2, 3, size, size)
    dense_macs = model_stats(model)["macs"]
    try:
        plan = prune_filters_(model, PruneConfig(metric="l1", filter_ratio=0.4, round_to=16), [x])
    except HybridPruneError as e:
        assert name in REFUSED, f"{name} refused: {e}"
        assert REFUSED[name] in str(e) and "\n" not in str(e)
        return
    assert name not in REFUSED, f"{name} is listed as refused but prunes now: take it off REFUSED"
    assert model_stats(model)["macs"] < 0.8 * dense_macs

    masks = nm_prune_(model)
    assert masks
    # the step runs in eval mode: BatchNorm on the 1x1 maps of a small input, over a batch of 2, normalises by
    # near-zero variances in training mode and one step blows the weights up (the pattern is what is checked)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    handle = hold_masks(model, masks, opt)
    model(x).logsumexp(dim=1).mean().backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # a random deep net's logits can be huge
    opt.step()
    handle.remove()
    assert all(satisfies_nm(model.get_submodule(n).weight) for n in masks)
    convs = [model.get_submodule(n) for n in masks if isinstance(model.get_submodule(n), torch.nn.Conv2d)]
    assert all(conv.groups == 1 for conv in convs)  # grouped and depthwise convs stay dense

    path = save_checkpoint(tmp_path / "model.safetensors", model, masks)
    loaded, loaded_masks, _ = load_checkpoint(path)
    with torch.no_grad():
        logits = model(x)
        assert torch.equal(loaded(x), logits)
        inference = to_inference_model(loaded, loaded_masks, torch.device("cpu"), torch.float32)
        torch.testing.assert_close(inference.model(x), logits, rtol=1e-3, atol=1e-3)
    assert all(g.kept % 16 == 0 or g.note or g.kept == g.original for g in plan.groups)


def grouped_net() -> torch.nn.Module:
    """conv -> grouped conv (3 conv groups of 16) -> dense 1x1 -> head: the shape of a ResNeXt or RegNet block."""
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(3, 48, 3, padding=1), nn.BatchNorm2d(48), nn.ReLU(),
        nn.Conv2d(48, 48, 3, padding=1, groups=3), nn.BatchNorm2d(48), nn.ReLU(),
        nn.Conv2d(48, 16, 1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )  # fmt: skip


@pytest.mark.parametrize("round_to, kept, whole", [(4, (24, 24, 8), False), (16, (24, 48, 16), True)])
def test_a_grouped_conv_keeps_the_same_positions_in_every_conv_group(round_to, kept, whole, tmp_path):
    torch.manual_seed(0)
    net, x = grouped_net().eval(), torch.rand(2, 3, 8, 8)
    plan = prune_filters_(net, PruneConfig(metric="l1", filter_ratio=0.5, round_to=round_to), [x])
    assert tuple(g.kept for g in plan.groups) == kept
    feeding, grouped, _ = plan.groups  # read by the grouped conv only: a multiple of 3; by the 1x1: of 3 and 16
    positions = [{k % 16 for k in feeding.keep if k // 16 == j} for j in range(3)]
    assert all(p == positions[0] for p in positions) and "3 conv groups keep 8 of 16" in feeding.note
    assert ("kept whole" in grouped.note) == whole and ("--round-to 16" in grouped.note) == whole
    assert (net[3].groups, net[3].in_channels, net[3].out_channels) == (3, 24, kept[1])
    assert net(x).shape == (2, 10)
    assert "net.3" not in {e.name for e in nm_eligibility(net, example_inputs=x) if e.eligible}
    path = save_checkpoint(tmp_path / "g.safetensors", net)
    loaded, _, _ = load_checkpoint(path, model=grouped_net())
    assert torch.equal(loaded(x), net(x))


@slow
def test_grouped_convs_keep_equal_conv_groups_and_say_when_they_stay_whole():
    """RegNet-X 400MF: its 400-channel stage has 25 conv groups of 16; the convs that feed a grouped conv are cut
    within every conv group alike, and a grouped conv read by a dense 1x1 stays whole at --round-to 16, saying so."""
    model = build_model("torchvision:regnet_x_400mf", image_size=32).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        permute_for_nm_(model, tries_per_channel=1)  # no channel moves between the conv groups of a grouped conv
        torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-5)
    plan = prune_filters_(model, PruneConfig(metric="l1", filter_ratio=0.4, round_to=16), [torch.rand(2, 3, 32, 32)])
    by_name = {g.name.removeprefix("net."): g for g in plan.groups}
    feeding = by_name["trunk_output.block4.block4-0.f.a.0"]
    assert feeding.kept == 250 and "25 conv groups keep 10 of 16" in feeding.note
    per_group = [{k % 16 for k in feeding.keep if k // 16 == j} for j in range(25)]
    assert all(p == per_group[0] for p in per_group)  # the same positions in every conv group
    whole = by_name["trunk_output.block4.block4-0.f.b.0"]
    assert whole.kept == 400 and "kept whole" in whole.note and "--round-to 16" in whole.note
    conv = model.get_submodule("net.trunk_output.block4.block4-0.f.b.0")
    assert (conv.groups, conv.in_channels, conv.out_channels) == (25, 250, 400)


AUX_MODELS = [  # (model, input side, {auxiliary head's first layer: the layer whose output it reads})
    ("zoo:aux_net", 16, {"net.aux.0": "net.stem.0"}),
    ("torchvision:googlenet", 32, {"net.aux1.conv.conv": "net.inception4a", "net.aux2.conv.conv": "net.inception4d"}),
    pytest.param("torchvision:inception_v3", 299, {"net.AuxLogits.conv0.conv": "net.Mixed_6e"}, marks=slow),
]


@pytest.mark.parametrize("name, size, reads", AUX_MODELS)
def test_auxiliary_heads_are_pruned_with_the_layers_they_read_and_trained(name, size, reads, tmp_path):
    """Heads that run only in training: traced in training mode, their inputs shrink with the layers they read,
    their outputs (the classes) stay whole, their losses train them, and a checkpoint replays the same network."""
    torch.manual_seed(0)
    model = build_model(name, image_size=size)
    x = torch.rand(2, 3, size, size)
    eval_out = {}
    hooks = [model.get_submodule(r).register_forward_hook(lambda m, i, o, r=r: eval_out.__setitem__(r, o))
             for r in reads.values()]  # fmt: skip
    prune_filters_(model, PruneConfig(metric="l1", filter_ratio=0.4), [x])
    model.eval()(x)
    for h in hooks:
        h.remove()
    for aux, read in reads.items():
        conv = model.get_submodule(aux)
        assert conv.in_channels == eval_out[read].shape[1] < build_model(name, image_size=size).get_submodule(
            aux).in_channels  # fmt: skip
    model.train()
    logits, *aux_logits = model(x)
    assert aux_logits and all(a.shape == logits.shape == (2, 10) for a in aux_logits)  # heads' classes whole

    aux_params = [p for n, p in model.named_parameters()
                  if p.dim() > 1 and any(n.startswith(a.rsplit(".", 1)[0]) for a in reads)]  # fmt: skip
    before = [p.clone() for p in aux_params]
    images = (torch.rand(8, 3, size, size) * 255).to(torch.uint8)
    data = Dataset("toy", ImageSet(images, torch.arange(8) % 10, 10), ImageSet(images, torch.arange(8) % 10, 10), False)
    fit(model, data, TrainConfig(epochs=1, batch_size=4, lr=0.01), torch.device("cpu"), progress=False)
    assert all(not torch.equal(b, p) for b, p in zip(before, aux_params, strict=True))  # the aux losses trained them

    user_model = name if name.startswith("zoo:") else None
    loaded, _, _ = load_checkpoint(save_checkpoint(tmp_path / "m.safetensors", model), model=user_model)
    assert {a: loaded.get_submodule(a).in_channels for a in reads} == {a: model.get_submodule(a).in_channels
                                                                        for a in reads}  # fmt: skip
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model.eval()(x))


def test_timm_sources_take_only_shape_arguments(tmp_path):
    pytest.importorskip("timm")
    for bad in ({"pretrained": True}, {"checkpoint_path": "/etc/passwd"}, {"pretrained_cfg_overlay": {}}):
        with pytest.raises(HybridPruneError, match="takes no argument"):
            build_model(ModelSource("timm", "resnet10t", bad))
    with pytest.raises(HybridPruneError, match="unknown timm model"):
        build_model("timm:no_such_net")


def test_the_cli_takes_timm_models_and_refuses_a_pretrained_tag_in_one_line(capsys):
    pytest.importorskip("timm")
    args = ["bench", "--synthetic", "--batch-sizes", "2", "--rounds", "1", "--calls", "1", "--no-progress"]
    assert call([*args, "--model", "timm:resnet10t", "--round-to", "8"], capsys).code == 0
    refused = call([*args, "--model", "timm:resnet10t.a1_in1k"], capsys)
    assert refused.code == 2 and "'timm:resnet10t.a1_in1k' is malformed" in refused.err
    assert len(refused.err.strip().splitlines()) <= 2  # argparse's usage line, then the one line


def test_mnasnet_loads_weights_without_version_metadata(tmp_path):
    """torchvision's MNASNet reads the state dict's version metadata, which a safetensors file does not carry."""
    from safetensors.torch import save_file

    from hybridprune.pruning.checkpoint import load_weights_

    trained = build_model("torchvision:mnasnet0_5", image_size=32).eval()
    save_file({k: v.contiguous() for k, v in trained.net.state_dict().items()}, str(tmp_path / "w.safetensors"))
    model = load_weights_(build_model("torchvision:mnasnet0_5", image_size=32), tmp_path / "w.safetensors").eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), trained(x))


@slow
def test_groups_whose_channels_torch_pruning_cannot_follow_are_reported_not_dropped_silently():
    """timm's CSPResNet splits channels by numbers it stores: Torch-Pruning maps some groups to indices outside a
    member. Those groups are not pruned, and they are listed (with their convs) rather than silently left out."""
    pytest.importorskip("timm")
    from hybridprune.pruning.metrics import ScoringContext

    ctx = ScoringContext(build_model("timm:cspresnet50", image_size=32).eval())
    names = {g.name for g in ctx.groups}
    assert ctx.unfollowed and all(g.name not in names and g.producers for g in ctx.unfollowed)


@pytest.mark.parametrize("metric", ["output_l1", "hybrid_output", "taylor"])
@pytest.mark.parametrize("name, size", [("zoo:aux_net", 16), ("torchvision:googlenet", 32)])
def test_activation_and_gradient_metrics_score_auxiliary_heads(metric, name, size):
    """Layers that run only in training have no eval-mode activations or gradients: they are read in a
    training-mode pass, so every group gets a finite score per channel and the model is left as it was."""
    from hybridprune.pruning.metrics import ScoringContext, score_filters

    torch.manual_seed(0)
    model = build_model(name, image_size=size).eval()
    images, labels = [torch.rand(4, 3, size, size)], [torch.tensor([0, 1, 2, 3])]
    ctx = ScoringContext(model, images, labels=labels)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = score_filters(metric, ctx)
    aux_groups = [g for g in ctx.groups if "aux" in g.name.lower()]
    assert aux_groups and all(torch.isfinite(scores[g.name]).all() and len(scores[g.name]) == g.size
                              for g in ctx.groups)  # fmt: skip
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()) and not model.training


def test_looking_at_a_model_draws_no_random_numbers():
    """Tracing runs models in training mode (dropout draws random numbers): the generator is restored, so a
    seeded run's fine-tuning sees the same dropout masks whether or not the model was traced first."""
    from hybridprune.pruning.graph import channel_groups, dependency_graph, training_outputs

    model = build_model("torchvision:squeezenet1_0", image_size=32).eval()  # dropout in its classifier
    torch.manual_seed(0)
    state = torch.get_rng_state()
    channel_groups(model, dependency_graph(model))
    assert torch.equal(torch.get_rng_state(), state)
    aux = build_model("zoo:aux_net", image_size=16)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    training_outputs(aux)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("name, size, heads", [
    ("zoo:aux_net", 16, ["net.head.2", "net.aux.5"]),
    ("torchvision:googlenet", 32, ["net.fc", "net.aux2.fc2", "net.aux1.fc2"]),
    ("torchvision:squeezenet1_0", 32, []),  # flattened after its last conv: no layer returns the output as it is
    ("resnet20", 32, ["net.fc"]),
])  # fmt: skip
def test_the_layers_whose_outputs_a_model_returns_are_found_and_no_others(name, size, heads):
    from hybridprune.pruning.graph import training_outputs

    assert training_outputs(build_model(name, image_size=size)) == heads


def test_auxiliary_outputs_with_none_or_in_a_dict_are_traced_and_trained():
    """A training-mode output may hold None (GoogLeNet without heads returns it) or be a dict of tensors."""
    from hybridprune.pruning.graph import output_tensors

    class DictAux(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = build_model("zoo:aux_net", image_size=16).net

        def forward(self, x):
            out = self.inner(x)
            return {"logits": out[0], "none": None, "aux": out[1]} if self.training else out

    torch.manual_seed(0)
    net, x = DictAux(), torch.rand(2, 3, 16, 16)
    prune_filters_(net, PruneConfig(metric="l1", filter_ratio=0.5, round_to=8), [x])
    assert net.inner.aux[0].in_channels == net.inner.stem[0].out_channels == 16
    assert [t.shape for t in output_tensors(net.train()(x))] == [(2, 10), (2, 10)]
