"""The command line with models other than the built-in AlexNet: user code, torchvision, built-in ResNets."""

import json

import pytest
import torch
from safetensors.torch import save_file

from hybridprune.cli import build_parser, main
from hybridprune.cli.run import run_config_from_args
from hybridprune.config import RECIPES
from hybridprune.models.sources import build_model
from hybridprune.pruning.checkpoint import load_checkpoint
from hybridprune.pruning.nm import satisfies_nm

SMALL = [
    *("--train-size", "96", "--test-size", "48", "--epochs", "1", "--finetune-epochs", "1", "--batch-size", "32"),
    *("--round-to", "4", "--calib-batches", "1", "--bn-recalib-batches", "1", "--no-progress"),
]


@pytest.fixture(scope="module")
def user_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("user") / "run"
    code = main(["run", *SMALL, "--model", "zoo:residual_net", "--metric", "hybrid,output_l1,fpgm", "--out", str(out)])
    assert code == 0
    return out


def test_run_prunes_a_users_residual_network_by_groups(user_run):
    result = json.loads((user_run / "results.json").read_text())
    assert result["config"]["model"]["name"] == "zoo:residual_net"
    for item in result["results"]:
        groups = item["plan"]["groups"]
        tied = next(g for g in groups if len(g["members"]) == 3)  # the group that the residual adds tie
        assert sorted(tied["members"]) == ["net.b2.conv2", "net.b2.shortcut.0", "net.b3.conv2"]
        model, masks, _ = load_checkpoint(item["checkpoint"], "zoo:residual_net")
        assert all(model.get_submodule(m).out_channels == len(tied["keep"]) for m in tied["members"])
        assert masks and all(satisfies_nm(model.get_submodule(n).weight) for n in masks)
        assert item["hybrid"]["finetune_loss"] == "CE (label smoothing 0.1)"
    assert {e["name"] for e in result["layers"] if not e["eligible"]} == {"net.stem.0"}


def test_user_code_checkpoints_need_their_factory_named_again(user_run, capsys):
    ckpt = str(user_run / "hybrid-hybrid.safetensors")
    assert main(["evaluate", ckpt, "--test-size", "48", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "pass --model zoo:residual_net" in err and len(err.splitlines()) == 1
    assert main(["evaluate", ckpt, "--test-size", "48", "--model", "zoo:residual_net"]) == 0
    assert main(["convert", ckpt, "--model", "zoo:residual_net", "--kernels", "gemm", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "largest logit difference from the dense masked model" in out
    assert main(["bench", str(user_run), "--model", "zoo:residual_net", "--batch-sizes", "2", "--rounds", "1",
                 "--calls", "1", "--no-progress"]) == 0  # fmt: skip
    assert "hybrid" in capsys.readouterr().out


def test_bench_synthetic_takes_any_model(capsys):
    args = ["bench", "--synthetic", "--batch-sizes", "2", "--rounds", "1", "--calls", "1", "--no-progress"]
    assert main([*args, "--model", "resnet20", "--width", "0.5", "--round-to", "4"]) == 0
    assert main([*args, "--model", "torchvision:mobilenet_v2", "--round-to", "8"]) == 0
    assert "mobilenet" not in capsys.readouterr().err


def test_run_with_trained_weights_prunes_that_model_without_training_it(tmp_path, capsys):
    torch.manual_seed(1)
    trained = build_model("zoo:residual_net", in_channels=1, image_size=32)
    weights = tmp_path / "trained.safetensors"
    save_file({k: v.contiguous() for k, v in trained.net.state_dict().items()}, str(weights))
    out = tmp_path / "run"
    args = ["run", *SMALL, "--model", "zoo:residual_net", "--weights", str(weights), "--metric", "l1"]
    args += ["--out", str(out)]
    assert main(args) == 0
    dense, _, _ = load_checkpoint(out / "dense.safetensors", "zoo:residual_net")
    for key, value in trained.net.state_dict().items():
        assert torch.equal(dense.net.state_dict()[key], value), key  # loaded, not trained further


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "torchvision:resnet18", "--width", "0.5"], "--width scales the built-in models only"),
        (["--model", "torchvision:resnet9000"], "unknown torchvision classification model 'resnet9000'"),
        (["--model", "no_such_pkg.models:make"], "cannot load model factory 'no_such_pkg.models:make'"),
        (["--model", "resnet20", "--ignore", "nope"], "--ignore names no module nope"),
        (["--model", "resnet20", "--round-to", "128"], "removes no channel"),
        (["--model", "resnet20", "--weights", "/nonexistent.pt"], "weights file /nonexistent.pt not found"),
        (["--model", "vgg16"], "vgg16 has five 2x2 max-pools and needs images of at least 32x32"),
    ],
)
def test_bad_model_input_is_one_line_and_writes_nothing(args, message, tmp_path, capsys):
    out = tmp_path / "run"
    dataset = ["--dataset", "npz:" + str(_tiny_npz(tmp_path))] if "vgg16" in args else []
    assert main(["run", *SMALL, *dataset, *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def _tiny_npz(tmp_path):
    import numpy as np

    path = tmp_path / "tiny16.npz"
    np.savez(path, x=np.zeros((20, 16, 16), dtype=np.uint8), y=np.arange(20) % 2)
    return path


def test_train_then_prune_a_builtin_resnet(tmp_path, capsys):
    dense = tmp_path / "dense.safetensors"
    small = ["--train-size", "96", "--test-size", "48", "--epochs", "1", "--batch-size", "32", "--no-progress"]
    assert main(["train", *small, "--model", "resnet20", "--width", "0.5", "--out", str(dense)]) == 0
    out = tmp_path / "pruned"
    prune = ["--train-size", "96", "--test-size", "48", "--finetune-epochs", "1", "--round-to", "4", "--no-progress"]
    assert main(["prune", str(dense), *prune, "--metric", "taylor", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["name"] == "resnet20" and config["prune"]["metric"] == "taylor"
    model, masks, _ = load_checkpoint(out / "taylor-hybrid.safetensors")
    assert model.net.stem.conv.out_channels == 4 and masks  # 8 channels at width 0.5, 40% -> 4 (round-to 4)


def test_run_with_distillation_records_the_loss_it_used(tmp_path):
    out = tmp_path / "kd"
    args = ["run", *SMALL, "--model", "resnet20", "--width", "0.5", "--metric", "l1", "--distill"]
    assert main([*args, "--distill-temperature", "2", "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["config"]["finetune"]["distill_weight"] == 0.9
    for stage in (result["results"][0]["filter"], result["results"][0]["hybrid"], result["nm"]):
        assert stage["finetune_loss"] == "0.1 * CE + 0.9 * T^2 * KL(dense teacher), T=2"


def test_a_recipe_sets_its_options_and_explicit_flags_win(tmp_path):
    out = tmp_path / "best"
    args = ["run", *SMALL, "--model", "zoo:residual_net", "--metric", "l1", "--recipe", "best", "--no-permute"]
    assert main([*args, "--allocation", "global", "--distill", "--out", str(out)]) == 0
    cfg = json.loads((out / "results.json").read_text())["config"]
    best = RECIPES["best"]
    assert cfg["recipe"] == "best"
    assert cfg["prune"]["steps"] == best["prune"].get("steps", 1)  # not given: the recipe's
    assert best["prune"]["allocation"] == "sensitivity" and cfg["prune"]["allocation"] == "global"  # given: it wins
    assert cfg["prune"]["permute"] is False and cfg["finetune"]["distill_weight"] == 0.9
    plain = run_config_from_args(build_parser().parse_args(["run", "--distill-weight", "0.5"]))
    assert plain.finetune.distill_weight == 0.0 and plain.prune.steps == 1 and not plain.prune.permute  # no --distill


MYNET = '''
from torch import nn


def make_net(in_channels=3, num_classes=10):
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))
'''


def test_a_factory_in_the_current_folder_is_found_as_uvicorn_finds_apps(tmp_path, monkeypatch, capsys):
    """`--model mynet:make_net` run from the folder holding mynet.py, with no PYTHONPATH and no '' on sys.path (the
    console script has neither); sys.path is left as it was; its checkpoint still needs the factory named again."""
    import sys

    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    name = f"mynet_{tmp_path.name.replace('-', '_')}"  # a module name no other test has imported
    (tmp_path / f"{name}.py").write_text(MYNET)
    monkeypatch.delitem(sys.modules, name, raising=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    ckpt = tmp_path / "dense.safetensors"
    train = ["train", "--model", f"{name}:make_net", "--epochs", "0", "--train-size", "32", "--test-size", "16",
             "--no-progress", "--out", str(ckpt)]  # fmt: skip
    assert main(train) == 2  # not in this folder: one line that says where it looked
    err = capsys.readouterr().err.strip()
    assert f"cannot load model factory '{name}:make_net'" in err and "looked in the current folder" in err
    monkeypatch.chdir(tmp_path)
    before = list(sys.path)
    assert main(train) == 0 and ckpt.is_file()
    assert sys.path == before
    capsys.readouterr()
    assert main(["evaluate", str(ckpt), "--test-size", "16"]) == 2  # a file never imports code by itself
    assert f"pass --model {name}:make_net" in capsys.readouterr().err
    assert main(["evaluate", str(ckpt), "--test-size", "16", "--model", f"{name}:make_net"]) == 0
