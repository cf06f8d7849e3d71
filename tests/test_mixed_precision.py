"""Precision per layer: the fewest layers kept in float that bring INT8 within --max-drop on validation images,
chosen from measured sensitivity and measured cost, on a net whose INT8 is ruined by one activation range."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hybridprune.cli import main
from hybridprune.config import QuantizeConfig
from hybridprune.data.images import ImageSet
from hybridprune.deploy import mixed_precision as mp
from hybridprune.deploy import quantize as q
from hybridprune.errors import HybridPruneError
from hybridprune.pruning.checkpoint import save_checkpoint

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime.quantization")


class OutlierNet(nn.Module):
    """conv1's channel 0 is 1e5 times the others and conv2 ignores it: fp32 never sees it, but INT8 quantizes
    conv2's input over that range, so every other channel rounds to zero, unless conv1 and conv2 stay float."""

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(channels, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
        with torch.no_grad():
            self.conv1.weight[0] *= 1e5
            self.conv2.weight[:, 0] = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv2(torch.relu(self.conv1(x))))


def labelled_by(model: nn.Module, count: int, seed: int) -> ImageSet:
    x = torch.randint(0, 256, (count, 3, 16, 16), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    with torch.inference_mode():
        return ImageSet(x, model.eval()(x.float() / 255).argmax(1), 10)


FAST = QuantizeConfig(calibration_images=64, format="u8s8", batch_size=32, rounds=2, validation_images=128)


def test_the_layers_that_ruin_int8_stay_float_and_the_rest_is_int8(tmp_path, one_torch_thread):
    model = OutlierNet()
    train, test = labelled_by(model, 256, 0), labelled_by(model, 64, 1)
    ruined = q.quantize(model, train, test, tmp_path / "all.onnx", FAST, progress=False, threads=1)
    assert ruined.int8_top1 < 50 and ruined.fp32_top1 == 100  # every layer INT8: the range ruins it
    cfg = QuantizeConfig(**{**FAST.to_dict(), "max_drop": 1.0})
    report = q.quantize(model, train, test, tmp_path / "mixed.onnx", cfg, progress=False, threads=1)
    mixed = report.mixed_precision
    assert sorted(mixed["float_nodes"]) == ["/conv1/Conv", "/conv2/Conv"]  # the head's Gemm stays INT8
    assert mixed["int8_top1"] >= mixed["fp32_top1"] - 1.0 and mixed["all_int8_top1"] < 50
    assert report.int8_top1 == report.fp32_top1  # on the test split too, measured in the runtime
    names = {init.name for init in onnx.load(str(tmp_path / "mixed.onnx")).graph.initializer}
    assert any(n.startswith("head.3.weight") and "quantized" in n for n in names)  # the Gemm's weights are int8
    assert not any(n.startswith(("conv1.weight", "conv2.weight")) and "quantized" in n for n in names)
    assert [p["float_layers"] for p in mixed["probes"]][0] == 0  # every probe recorded, from all INT8
    layers = {"/conv1/Conv", "/conv2/Conv", "/head/head.3/Gemm"}
    assert set(mixed["sensitivity"]) == set(mixed["float_cost_ms"]) == layers


def test_a_model_within_the_drop_keeps_every_layer_int8(tmp_path, one_torch_thread):
    from conftest import make_model

    model = make_model("zoo:residual_net")
    train, test = labelled_by(model, 256, 0), labelled_by(model, 64, 1)
    cfg = QuantizeConfig(**{**FAST.to_dict(), "max_drop": 100.0})
    report = q.quantize(model, train, test, tmp_path / "m.onnx", cfg, progress=False, threads=1)
    assert report.mixed_precision["float_nodes"] == [] and len(report.mixed_precision["probes"]) == 1


def test_the_order_puts_the_most_accuracy_per_ms_first_and_the_search_finds_the_shortest_prefix():
    order = mp.fallback_order({"a": 0.2, "b": 0.2, "c": 0.01}, {"a": 2.0, "b": -1.0, "c": 0.001})
    assert order == ["b", "c", "a"]  # a float layer measured no slower counts as nearly free
    for count in range(0, 12):
        for answer in range(0, count + 1):
            probed: list[int] = []
            found = mp.shortest_prefix(count, lambda k, a=answer, seen=probed: seen.append(k) or k >= a)
            assert found == answer and len(probed) <= 2 * max(1, count).bit_length() + 1
            assert count not in probed or answer == count  # all float is never probed: it needs no measuring


def test_no_layer_int8_within_the_drop_is_refused_in_one_line(tmp_path, monkeypatch):
    model = OutlierNet()
    train, test = labelled_by(model, 256, 0), labelled_by(model, 64, 1)
    monkeypatch.setattr(mp, "shortest_prefix", lambda count, good: good(0) and 0 or count)
    cfg = QuantizeConfig(**{**FAST.to_dict(), "max_drop": 0.0})
    with pytest.raises(HybridPruneError, match=r"no layer can run INT8 within --max-drop 0: on 128 validation"):
        q.quantize(model, train, test, tmp_path / "m.onnx", cfg, progress=False, threads=1)
    assert not (tmp_path / "m.onnx").exists()


def test_quantize_max_drop_from_the_command_line(tmp_path, capsys, one_torch_thread):
    from hybridprune.models.sources import build_model

    model = build_model("alexnet", in_channels=1, num_classes=10, image_size=32, width=0.125)
    ckpt = save_checkpoint(tmp_path / "digits.safetensors", model, None, {"dataset": "digits"})
    out = tmp_path / "m-int8.onnx"
    argv = ["quantize", str(ckpt), "--train-size", "200", "--test-size", "32", "--calibration-images", "32",
            "--validation-images", "300", "--max-drop", "100", "--rounds", "1", "--out", str(out),
            "--no-progress"]  # fmt: skip
    assert main(argv) == 2 and "--validation-images asks for 300" in capsys.readouterr().err and not out.exists()
    argv[argv.index("300")] = "64"
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "kept in float: none (every layer INT8), within 100 points of fp32 on 64 validation" in printed
    assert out.is_file()


def test_a_model_with_one_quantizable_layer_takes_a_precision_per_layer(tmp_path, one_torch_thread):
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10))
    train, test = labelled_by(model, 256, 0), labelled_by(model, 64, 1)
    cfg = QuantizeConfig(**{**FAST.to_dict(), "max_drop": 100.0})
    report = q.quantize(model, train, test, tmp_path / "m.onnx", cfg, progress=False, threads=1)
    mixed = report.mixed_precision
    assert mixed["float_nodes"] == [] and list(mixed["float_cost_ms"].values()) == [0.0]  # nothing left to time
