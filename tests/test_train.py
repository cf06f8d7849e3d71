import pytest
import torch

from hybridprune.config import TrainConfig
from hybridprune.data.images import Dataset, ImageSet
from hybridprune.models.sources import build_model
from hybridprune.pruning.nm import nm_prune_, satisfies_nm
from hybridprune.training.loop import evaluate, fit, recalibrate_bn_


def _toy_data(n=64):
    """Two classes a conv net separates at once: dark images and bright images."""
    y = torch.arange(n) % 2
    x = (torch.rand(n, 1, 16, 16) * 100 + y.view(-1, 1, 1, 1) * 150).to(torch.uint8)
    return Dataset("toy", ImageSet(x, y, 2), ImageSet(x, y, 2), hflip=False)


@pytest.mark.parametrize("name", ["alexnet", "zoo:residual_net", "zoo:depthwise_net"])
def test_fine_tuning_holds_the_nm_pattern_after_every_step(name):
    torch.manual_seed(0)
    width = 0.125 if name == "alexnet" else None
    model = build_model(name, in_channels=1, num_classes=2, image_size=16, width=width)
    masks = nm_prune_(model)
    before = {n: m.weight.clone() for n, m in model.named_modules() if n in masks}
    fit(model, _toy_data(), TrainConfig(epochs=2, batch_size=16), torch.device("cpu"), masks=masks, progress=False)
    modules = dict(model.named_modules())
    for name in masks:
        assert satisfies_nm(modules[name].weight)
        assert not modules[name].weight[~masks[name]].any()  # pruned places stayed exactly zero
        assert not torch.equal(modules[name].weight, before[name])  # and the kept weights did train


def test_training_learns_a_separable_problem():
    torch.manual_seed(0)
    data = _toy_data()
    model = build_model("alexnet", in_channels=1, num_classes=2, image_size=16, width=0.125)
    fit(model, data, TrainConfig(epochs=4, batch_size=16, augment=False), torch.device("cpu"), progress=False)
    assert evaluate(model, data.test, torch.device("cpu")) == 100.0


def test_bn_recalibration_matches_the_statistics_of_the_data():
    torch.manual_seed(0)
    data = _toy_data(256)
    model = build_model("alexnet", in_channels=1, num_classes=2, image_size=16, width=0.125).eval()
    bn = model.net.features[0].bn
    recalibrate_bn_(model, data.train, torch.device("cpu"), num_batches=100, batch_size=256)
    with torch.no_grad():
        feats = model.net.features[0].conv(model.normalize(data.train.x.float() / 255))
    torch.testing.assert_close(bn.running_mean, feats.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-4)
    assert bn.momentum == 0.1 and not model.training


def test_distillation_loss_matches_a_hand_computation():
    from hybridprune.training.loop import distillation_loss

    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    y = torch.tensor([1, 2])
    cfg = TrainConfig(label_smoothing=0.0, distill_weight=0.25, distill_temperature=2.0)
    hard = -(s.log_softmax(1)[0, 1] + s.log_softmax(1)[1, 2]) / 2
    p_t, log_p_s = (t / 2).softmax(1), (s / 2).log_softmax(1)
    kl = (p_t * (p_t.log() - log_p_s)).sum() / 2  # KL(teacher || student), mean over the batch of 2
    expected = 0.75 * hard + 0.25 * 4.0 * kl
    torch.testing.assert_close(distillation_loss(s, t, y, cfg), expected)


def test_distilling_pulls_the_student_to_its_teacher_with_masks_held():
    torch.manual_seed(0)
    data = _toy_data()
    teacher = build_model("zoo:residual_net", in_channels=1, num_classes=2, image_size=16)
    fit(teacher, data, TrainConfig(epochs=4, batch_size=16, augment=False), torch.device("cpu"), progress=False)
    student = build_model("zoo:residual_net", in_channels=1, num_classes=2, image_size=16)
    masks = nm_prune_(student)
    x = data.train.x.float() / 255

    def gap():
        with torch.no_grad():
            return torch.nn.functional.kl_div(student.eval()(x).log_softmax(1), teacher(x).log_softmax(1),
                                              log_target=True, reduction="batchmean")  # fmt: skip

    before = gap()
    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.01, distill_weight=1.0, augment=False)
    fit(student, data, cfg, torch.device("cpu"), masks=masks, progress=False, teacher=teacher)
    assert gap() < 0.5 * before
    assert all(satisfies_nm(student.get_submodule(n).weight) for n in masks)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "auto"])
def test_masks_hold_exactly_under_every_precision_the_cpu_runs(precision):
    torch.manual_seed(0)
    model = build_model("zoo:depthwise_net", in_channels=1, num_classes=2, image_size=16)
    masks = nm_prune_(model)
    before = {n: model.get_submodule(n).weight.detach().clone() for n in masks}
    cfg = TrainConfig(epochs=2, batch_size=16, precision=precision)
    fit(model, _toy_data(), cfg, torch.device("cpu"), masks=masks, progress=False)
    for name in masks:
        weight = model.get_submodule(name).weight
        assert weight.dtype == torch.float32 and satisfies_nm(weight)
        assert not weight[~masks[name]].any() and not torch.equal(weight, before[name])


@pytest.mark.parametrize(
    "flags,fp32_ms,bf16_ms,chosen",
    [({"avx2"}, 30.0, 10.0, "fp32"), ({"amx_bf16"}, 30.0, 20.0, "bf16"), ({"avx512_bf16"}, 30.0, 29.0, "fp32")],
    ids=["no native bf16", "native and faster", "native, no faster"],
)
def test_auto_precision_on_a_cpu_follows_its_flags_and_measurements(flags, fp32_ms, bf16_ms, chosen):
    from hybridprune.training.precision import choose_precision

    timings = {None: fp32_ms, torch.bfloat16: bf16_ms}
    choice = choose_precision("auto", torch.device("cpu"), timings.__getitem__, flags=flags)
    assert choice.name == chosen and choice.reason.startswith(f"precision auto: {chosen} (")


def test_auto_precision_says_which_it_chose_once_per_training(capsys):
    model = build_model("zoo:residual_net", in_channels=1, num_classes=2, image_size=16)
    fit(model, _toy_data(), TrainConfig(epochs=1, batch_size=16), torch.device("cpu"), progress=False)
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("precision auto:")]
    assert len(said) == 1 and any(p in said[0] for p in ("auto: fp32 (", "auto: bf16 ("))


def test_fp16_and_unknown_precisions_are_refused_on_the_cpu():
    from hybridprune.errors import HybridPruneError

    model = build_model("zoo:plain_net", in_channels=1, num_classes=2, image_size=16)
    with pytest.raises(HybridPruneError, match="fp16 training needs a CUDA GPU"):
        fit(model, _toy_data(), TrainConfig(epochs=1, precision="fp16"), torch.device("cpu"), progress=False)
    with pytest.raises(HybridPruneError, match="unknown precision 'fp8'; valid: auto, fp32, bf16, fp16"):
        TrainConfig(precision="fp8")


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_gpu_masks_hold_exactly_under_mixed_precision(precision):
    torch.manual_seed(0)
    model = build_model("resnet20", in_channels=1, num_classes=2, image_size=16, width=0.5)
    masks = nm_prune_(model)
    fit(model, _toy_data(), TrainConfig(epochs=2, batch_size=16, precision=precision), torch.device("cuda"),
        masks=masks, progress=False)  # fmt: skip
    assert all(satisfies_nm(model.get_submodule(n).weight) for n in masks)


def test_compile_falls_back_to_eager_with_one_line_where_it_fails(monkeypatch, capsys):
    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("no compiler for this layer\nsecond line")

    monkeypatch.setattr(torch, "compile", lambda model: Broken())
    torch.manual_seed(0)
    data = _toy_data()
    model = build_model("zoo:plain_net", in_channels=1, num_classes=2, image_size=16)
    fit(model, data, TrainConfig(epochs=3, batch_size=16, augment=False, compile=True), torch.device("cpu"),
        progress=False)  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "torch.compile failed (RuntimeError: no compiler for this layer" in err[0]
    assert evaluate(model, data.test, torch.device("cpu")) == 100.0  # trained eagerly all the same
