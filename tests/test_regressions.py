"""Bugs found in review, one test each (each fails on the code before its fix): the data-loss bugs of the
bad-input work (issue 10), then those of the any-CNN and bad-input review."""

import json
import signal

import pytest
import torch
from torch import nn

from helpers import TINY_RUN, TINY_TRAIN, call, holder, refused_unchanged
from hybridprune.cli import main
from hybridprune.experiments import job as pipeline
from hybridprune.models.sources import build_model
from hybridprune.outputs import write_json, written_files
from hybridprune.pruning.checkpoint import load_checkpoint, load_weights_
from hybridprune.training import loop as train_module

TINY = ["--train-size", "64", "--test-size", "32", "--epochs", "1", "--batch-size", "32", "--no-progress"]
PRUNE = ["--train-size", "64", "--test-size", "32", "--finetune-epochs", "1", "--round-to", "4", "--no-progress"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# --- the data-loss bugs of issue 10 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("earlier_run", [True, False], ids=["a run's folder", "the user's folder"])
def test_overwrite_keeps_the_users_files_in_the_output_folder(tmp_path, capsys, earlier_run):
    out = tmp_path / "run"
    out.mkdir()
    if earlier_run:  # what an earlier run left, written as hybridprune writes (and lists) its files
        write_json(out / "config.json", {"seed": 1}, record=True)
        write_json(out / "results.json", {"accuracy": 0.5}, record=True)
    mine = {"settings.json": '{"lr": 0.1}', "labels.json": '["cat", "dog"]', "notes.txt": "mine"}
    for name, text in mine.items():
        (out / name).write_text(text)
    if earlier_run:
        o = call(["run", *TINY_RUN, "--out", out, "--overwrite"], capsys)
        assert o.code == 0, o.err
        assert json.loads((out / "results.json").read_text())["results"][0]["metric"] == "l1"
    else:  # nothing of hybridprune's to remove: refused, not run over the user's files
        refused_unchanged(["run", *TINY_RUN, "--out", out, "--overwrite"], tmp_path, capsys, names=str(out))
    assert {n: (out / n).read_text() for n in mine} == mine


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["", "--overwrite"])
def test_train_into_an_existing_folder_fails_before_training(tmp_path, capsys, monkeypatch, overwrite):
    def no_training(*args, **kwargs):
        raise AssertionError("train --out FOLDER trained before it looked at its output target")

    monkeypatch.setattr(train_module, "fit", no_training)
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "best.safetensors").write_bytes(b"the user's model")
    argv = ["train", *TINY_TRAIN, "--out", folder, *overwrite]
    refused_unchanged(argv, tmp_path, capsys, names=str(folder))


def test_resume_after_an_interrupt_redoes_only_the_step_in_progress(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"

    def interrupt(*args, **kwargs):  # the first N:M pruning is the hybrid step of l1, after its filter step
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(pipeline, "nm_prune_", interrupt)
        o = call(["run", *TINY_RUN, "--out", out], capsys)
    assert o.code == 130 and "--resume" in o.err, o.err
    filter_ckpt = (out / "l1-filter.safetensors").read_bytes()
    assert not (out / "l1-hybrid.safetensors").exists()

    calls = []
    real = pipeline.prune_filters_
    monkeypatch.setattr(pipeline, "prune_filters_", lambda *a, **k: calls.append(1) or real(*a, **k))
    o = call(["run", *TINY_RUN, "--out", out, "--resume"], capsys)
    assert o.code == 0, o.err
    assert calls == [], "the finished filter step of l1 was pruned again"
    assert (out / "l1-filter.safetensors").read_bytes() == filter_ckpt
    assert (out / "l1-hybrid.safetensors").is_file()


def test_a_second_run_on_a_locked_folder_is_refused_until_the_holder_dies(tmp_path, capsys):
    out = tmp_path / "run"
    proc = holder(out)  # another process holding the folder's lock, as a running `hybridprune run` does
    try:
        assert proc.stdout.readline() == "held\n"
        line = refused_unchanged(["run", *TINY_RUN, "--out", out], tmp_path, capsys, names=f"process {proc.pid}")
        assert "in use" in line
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdin.close()
        proc.stdout.close()
    o = call(["run", *TINY_RUN, "--out", out], capsys)
    assert o.code == 0, o.err
    assert "replaced the lock of a process that is gone" in o.out
    assert (out / "results.json").is_file()


# --- the any-CNN and bad-input review -------------------------------------------------------------------------------


@pytest.fixture
def dense(tmp_path):
    path = tmp_path / "dense.safetensors"
    assert main(["train", *TINY, "--model", "resnet20", "--width", "0.5", "--out", str(path)]) == 0
    return path


def test_prune_resumes_after_an_interrupt(dense, tmp_path, monkeypatch, capsys):
    out = tmp_path / "pruned"
    real = pipeline.nm_prune_
    monkeypatch.setattr(pipeline, "nm_prune_", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(["prune", str(dense), *PRUNE, "--metric", "l1", "--out", str(out)]) == 130
    monkeypatch.setattr(pipeline, "nm_prune_", real)
    assert main(["prune", str(dense), *PRUNE, "--metric", "l1", "--out", str(out), "--resume"]) == 0
    assert (out / "dense.safetensors").is_file()  # a copy in the run folder: resume and bench find it there
    names = {p.name for p in written_files(out)}
    assert {"dense.safetensors", "l1-filter.safetensors", "l1-hybrid.safetensors"} <= names  # --overwrite's list


def test_run_from_a_checkpoint_names_its_model_and_refuses_another(dense, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--checkpoint", str(dense), *PRUNE, "--metric", "l1", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["model"]["name"] == "resnet20"
    bench = ["bench", str(out), "--batch-sizes", "2", "--rounds", "1", "--calls", "1", "--no-progress"]
    assert main(bench) == 0  # the dense variant is found in the run folder, not beside the original
    assert main(["run", "--checkpoint", str(dense), "--model", "vgg16", *PRUNE, "--out", str(tmp_path / "x")]) == 2
    assert "holds resnet20; drop --model/--width" in capsys.readouterr().err


def test_every_torchvision_classifier_builds_even_if_its_init_reads_values():
    model = build_model("torchvision:regnet_x_400mf", image_size=32)  # RegNet's init fails on the meta device
    assert model.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


class _PlainBN(nn.Module):
    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8, affine=False)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8, track_running_stats=False)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))).mean(dim=(2, 3)))


def test_batchnorm_without_affine_terms_folds_and_one_without_running_stats_is_left_alone():
    from hybridprune.deploy.sparse import fold_batchnorm_

    model = build_model("test_regressions:_PlainBN", image_size=8).eval()
    with torch.no_grad():
        model.net.bn1.running_mean.uniform_(-1, 1)
    x = torch.rand(4, 3, 8, 8)
    folded = fold_batchnorm_(__import__("copy").deepcopy(model))
    assert isinstance(folded.net.bn1, nn.Identity) and isinstance(folded.net.bn2, nn.BatchNorm2d)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)


class _Wrapped(nn.Module):
    """A network whose own top-level submodule is called `net`."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(in_channels, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(self.net(x))


def test_weights_of_a_network_with_its_own_net_module_load(tmp_path):
    trained = build_model("test_regressions:_Wrapped", image_size=8)
    path = tmp_path / "w.pt"
    torch.save(trained.net.state_dict(), path)  # keys: net.0.weight, ..., fc.weight
    fresh = load_weights_(build_model("test_regressions:_Wrapped", image_size=8), path)
    assert torch.equal(fresh.net.net[0].weight, trained.net.net[0].weight)


def test_a_failed_export_check_leaves_the_previous_file(tmp_path, monkeypatch, capsys):
    from hybridprune.deploy import export
    from hybridprune.pruning.checkpoint import save_checkpoint

    pytest.importorskip("onnxruntime")
    ckpt = save_checkpoint(tmp_path / "m.safetensors", build_model("resnet20", width=0.5))
    out = tmp_path / "m.onnx"
    out.write_bytes(b"the user's earlier export")
    real = export.check_onnx

    def failing(*args, **kwargs):
        check = real(*args, **kwargs)
        check.broken_groups = 1
        return check

    monkeypatch.setattr(export, "check_onnx", failing)
    assert main(["export", str(ckpt), "--out", str(out), "--overwrite", "--check-images", "4"]) == 2
    assert out.read_bytes() == b"the user's earlier export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.safetensors"]


def test_a_tampered_run_config_is_one_line_on_resume(dense, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--checkpoint", str(dense), *PRUNE, "--metric", "l1", "--out", str(out)]) == 0
    (out / "config.json").write_text("{not json")
    assert main(["run", "--checkpoint", str(dense), *PRUNE, "--metric", "l1", "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config.json is not readable JSON" in err[0]
    load_checkpoint(out / "l1-hybrid.safetensors")  # the finished work is still there


def test_augmented_gray_batches_have_standard_strides():
    from hybridprune.data.batching import batches
    from hybridprune.data.images import ImageSet

    images = ImageSet(torch.randint(0, 256, (10, 1, 16, 16), dtype=torch.uint8), torch.zeros(10, dtype=torch.long), 2)
    for x, _ in batches(images, 4, shuffle=True, augment=True):
        assert x.stride() == torch.empty(x.shape).stride()  # oneDNN convs corrupt memory on odd strides


@pytest.mark.slow
def test_training_a_residual_net_on_gray_images_at_an_odd_batch_size_does_not_crash():
    import subprocess
    import sys

    code = """
import torch
from hybridprune.data.datasets import load_dataset
from hybridprune.models.sources import build_model
from hybridprune.config import TrainConfig
from hybridprune.training.loop import fit
ds = load_dataset("digits")
ds = type(ds)(ds.name, ds.train.subset(350, 0), ds.test, ds.hflip)
fit(build_model("resnet20", in_channels=1, width=0.5), ds, TrainConfig(epochs=1, batch_size=35), torch.device("cpu"),
    progress=False)
print("trained")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "trained" in proc.stdout, proc.stderr[-500:]  # was SIGSEGV / double free
