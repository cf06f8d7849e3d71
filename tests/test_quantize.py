"""Post-training INT8: round trips on the zoo (accuracy through the real test loader), 2:4 zeros kept, the format
choice following measurements, each refusal in one line with nothing written, and ONNX Runtime and OpenVINO
agreeing on the same file."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hybridprune.cli import main
from hybridprune.config import QuantizeConfig
from hybridprune.data.images import ImageSet
from hybridprune.deploy import quantize as q
from hybridprune.deploy.accuracy import onnx_accuracy
from hybridprune.deploy.export import count_broken_groups
from hybridprune.deploy.runtimes import base, get_runtime
from hybridprune.errors import HybridPruneError
from hybridprune.pruning.checkpoint import save_checkpoint
from hybridprune.pruning.nm import nm_prune_
from hybridprune.training.loop import evaluate
from zoo import ZOO_SOURCES

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime.quantization")
has_openvino = get_runtime("openvino").installed()
needs_openvino = pytest.mark.skipif(not has_openvino, reason="openvino is not installed (the openvino extra)")
FAST = QuantizeConfig(calibration_images=32, format="u8s8", batch_size=16, rounds=1)
# OpenVINO and ONNX Runtime run the same QDQ file with their own int8 kernels (rounding of the requantization
# differs): their top-1 may differ on images whose two best logits are closer than a quantization step; at most
# this many percentage points on the 64 test images here (4 images)
RUNTIME_TOP1_TOLERANCE = 6.25


class GroupedNet(nn.Module):
    """A grouped conv (groups=4, not depthwise) between two dense ones."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def labelled_by(model: nn.Module, count: int, seed: int, side: int = 16) -> ImageSet:
    """Random images labelled with the model's own fp32 predictions: fp32 top-1 is 100%, and int8 top-1 is
    the share of predictions quantization keeps."""
    x = torch.randint(0, 256, (count, 3, side, side), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    with torch.inference_mode():
        y = model.eval()(x.float() / 255).argmax(1)
    return ImageSet(x, y, 10)


@pytest.fixture
def residual(one_torch_thread):
    from conftest import make_model

    return make_model("zoo:residual_net")


@pytest.mark.parametrize("name", [*ZOO_SOURCES.values(), "grouped"])
def test_round_trip_on_the_zoo_measures_int8_through_the_real_test_loader(name, tmp_path, one_torch_thread):
    from conftest import make_model
    from zoo import randomize_batchnorm_

    model = randomize_batchnorm_(GroupedNet()).eval() if name == "grouped" else make_model(name)
    train, test = labelled_by(model, 64, 0), labelled_by(model, 64, 1)
    out = tmp_path / "m-int8.onnx"
    report = q.quantize(model, train, test, out, FAST, progress=False, threads=1)
    assert out.is_file() and report.batchnorm_nodes_left == 0  # BatchNorm folded in the export
    assert report.fp32_top1 == pytest.approx(evaluate(model, test, torch.device("cpu")), abs=100 / 64 + 1e-9)
    again = onnx_accuracy(out, test, "onnxruntime", "int8", threads=1, progress=False)  # the file as written
    assert again.top1 == report.int8_top1 and again.images == report.test_images == 64
    assert report.int8_top1 == pytest.approx(report.top1_agreement)  # labels are the fp32 predictions
    assert report.int8_top1 >= 75 and report.max_logit_diff < report.max_abs_logit
    model_file = onnx.load(str(out))
    assert sum(n.op_type == "QuantizeLinear" for n in model_file.graph.node) > 0
    assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for o in model_file.graph.output)


def test_zeros_of_2_4_layers_stay_zero_in_the_int8_weights(residual, tmp_path):
    nm = copy.deepcopy(residual)
    masks = nm_prune_(nm)
    train, test = labelled_by(nm, 64, 0), labelled_by(nm, 32, 1)
    out = tmp_path / "nm-int8.onnx"
    report = q.quantize(nm, train, test, out, FAST, masks=masks, progress=False, threads=1)
    w = report.weights
    assert w["nm_layers"] == w["nm_layers_found"] == len(masks) > 0
    assert w["nm_broken_groups"] == 0 and w["zeros_lost"] == 0 and w["zeros_fp32"] > 0
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(out)).graph.initializer}
    for name in masks:  # read back from the file, not from the report
        quantized = weights[f"{name}.weight_quantized"]
        assert quantized.dtype.name == "int8" and count_broken_groups(quantized, report_pattern()) == 0


def report_pattern():
    from hybridprune.config import NMPattern

    return NMPattern(2, 4)


@pytest.mark.parametrize(
    ("times", "chosen"),
    [
        ({"fp32": [3.0], "u8s8": [9.0, 9.0, 9.0], "s8s8": [1.0, 1.0, 1.0]}, "s8s8"),
        ({"fp32": [3.0], "u8s8": [1.0, 1.0, 50.0], "s8s8": [2.0, 2.0, 2.0]}, "u8s8"),  # the median, not the mean
    ],
)
def test_the_auto_format_is_the_one_measured_fastest(residual, tmp_path, monkeypatch, times, chosen):
    assert q.choose_format(times) == chosen
    monkeypatch.setattr(q, "time_graphs", lambda files, *a, **k: {name: times[name] for name in files})
    train, test = labelled_by(residual, 32, 0), labelled_by(residual, 16, 1)
    cfg = QuantizeConfig(calibration_images=32, format="auto", batch_size=16, rounds=1)
    report = q.quantize(residual, train, test, tmp_path / "auto.onnx", cfg, progress=False, threads=1)
    assert report.format == chosen and report.format_choice == "measured"
    assert set(report.latency_ms) == {"fp32", "u8s8", "s8s8"}


def test_auto_times_both_formats_for_real(residual, tmp_path):
    train, test = labelled_by(residual, 32, 0), labelled_by(residual, 16, 1)
    cfg = QuantizeConfig(calibration_images=16, format="auto", batch_size=8, rounds=2)
    report = q.quantize(residual, train, test, tmp_path / "auto.onnx", cfg, progress=False, threads=1)
    assert report.format == min(("u8s8", "s8s8"), key=lambda f: report.latency_ms[f])
    assert all(v > 0 for v in report.latency_ms.values())


@pytest.mark.parametrize(
    ("train_size", "images", "why"),
    [(0, 32, "no calibration data"), (10, 32, "too few images to calibrate: the training split has 10")],
)
def test_missing_or_too_few_calibration_images_are_refused(residual, tmp_path, train_size, images, why):
    train = ImageSet(torch.zeros(train_size, 3, 16, 16, dtype=torch.uint8), torch.zeros(train_size).long(), 10)
    out = tmp_path / "m.onnx"
    with pytest.raises(HybridPruneError, match=why):
        q.quantize(residual, train, labelled_by(residual, 8, 1), out, QuantizeConfig(calibration_images=images))
    assert list(tmp_path.iterdir()) == []


def test_non_finite_calibration_statistics_are_refused(residual, tmp_path):
    broken = copy.deepcopy(residual)
    with torch.no_grad():
        broken.net.fc.weight.fill_(3e38)  # the logits overflow to inf on every image
    data = labelled_by(residual, 32, 0)
    with pytest.raises(HybridPruneError, match="non-finite calibration statistics") as info:
        q.quantize(broken, data, data, tmp_path / "m.onnx", FAST, progress=False)
    assert "\n" not in str(info.value) and list(tmp_path.iterdir()) == []


@needs_openvino
def test_onnxruntime_and_openvino_give_the_same_top1_on_the_same_files(residual, tmp_path):
    train, test = labelled_by(residual, 64, 0), labelled_by(residual, 64, 1)
    out = tmp_path / "m-int8.onnx"
    report = q.quantize(residual, train, test, out, FAST, progress=False, threads=1)
    ov_int8 = onnx_accuracy(out, test, "openvino", "int8", threads=1, progress=False)
    assert abs(ov_int8.top1 - report.int8_top1) <= RUNTIME_TOP1_TOLERANCE
    fp32 = tmp_path / "m.onnx"
    from hybridprune.deploy.export import export_onnx

    export_onnx(residual, fp32, example_inputs=torch.zeros(1, 3, 16, 16))
    runtimes = ("onnxruntime", "openvino")
    tops = {r: onnx_accuracy(fp32, test, r, "fp32", threads=1, progress=False).top1 for r in runtimes}
    assert tops["onnxruntime"] == tops["openvino"] == 100.0  # fp32 means fp32 in both


# --- the command line -------------------------------------------------------------------------------------------


@pytest.fixture
def digits_checkpoint(tmp_path, one_torch_thread):
    from hybridprune.models.sources import build_model

    torch.manual_seed(0)
    model = build_model("alexnet", in_channels=1, num_classes=10, image_size=32, width=0.125)
    return save_checkpoint(tmp_path / "digits.safetensors", model, None, {"dataset": "digits"})


QUICK = ["--dataset", "digits", "--train-size", "64", "--test-size", "32", "--calibration-images", "32",
         "--batch-size", "32", "--rounds", "1", "--threads", "1", "--no-progress"]  # fmt: skip


def test_quantize_command_writes_the_file_and_its_report(digits_checkpoint, tmp_path, capsys):
    import json

    out, report = tmp_path / "m-int8.onnx", tmp_path / "q.json"
    assert main(["quantize", str(digits_checkpoint), "--out", str(out), "--json", str(report), *QUICK]) == 0
    printed = capsys.readouterr().out
    assert "top-1 on 32 digits test images in onnxruntime" in printed and "amx_int8" in printed
    result = json.loads(report.read_text())
    assert result["format_choice"] == "measured" and result["format"] in ("u8s8", "s8s8")
    assert result["calibration"]["images"] == 32 and result["calibration"]["method"] == "minmax"
    assert {"avx512f", "avx512_vnni", "amx_int8", "amx_bf16", "avx512_bf16"} <= set(result["cpu"])
    assert result["versions"]["onnxruntime"] and result["environment"]["torch"]
    assert main(["evaluate", str(out), "--dataset", "digits", "--test-size", "32", "--no-progress"]) == 0
    assert "precision: int8" in capsys.readouterr().out


def _one_line_refusal(argv, capsys, why):
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's refusal of a flag's value
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and why in err, err


def test_quantize_refusals_are_one_line_and_write_nothing(digits_checkpoint, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out" / "m.onnx"
    base_argv = ["quantize", str(digits_checkpoint), "--out", str(out)]
    _one_line_refusal([*base_argv, *QUICK, "--calibration-images", "0"], capsys, "--calibration-images must be")
    _one_line_refusal([*base_argv, *QUICK, "--calibration-images", "100"], capsys, "too few images")
    _one_line_refusal([*base_argv, *QUICK, "--dataset", "npz:/nonexistent"], capsys, "error")
    _one_line_refusal([*base_argv, *QUICK, "--format", "s4s4"], capsys, "invalid choice")
    _one_line_refusal([*base_argv[:2], "--out", str(tmp_path)], capsys, "is a folder")
    monkeypatch.setattr(get_runtime("openvino"), "installed", lambda: False)
    _one_line_refusal([*base_argv, *QUICK, "--runtime", "openvino"], capsys, 'pip install -e ".[openvino]"')
    assert not out.parent.exists()


def test_evaluate_refuses_what_the_runtime_cannot_run_in_one_line(digits_checkpoint, tmp_path, capsys, monkeypatch):
    from hybridprune.deploy.export import export_onnx
    from hybridprune.pruning.checkpoint import load_checkpoint

    model, _, _ = load_checkpoint(digits_checkpoint)
    path = export_onnx(model, tmp_path / "m.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07 not a model")
    evaluate_argv = ["evaluate", "--test-size", "16", "--no-progress"]
    _one_line_refusal([*evaluate_argv, str(junk), "--dataset", "digits"], capsys, "junk.onnx")
    _one_line_refusal([*evaluate_argv, str(path)], capsys, "give --dataset")
    _one_line_refusal([*evaluate_argv, str(path), "--dataset", "digits", "--deploy-precision", "int8"], capsys,
                      "holds no quantized operators")  # fmt: skip
    _one_line_refusal([*evaluate_argv, str(path), "--dataset", "digits", "--runtime", "tensorrt"], capsys,
                      "tensorrt runs on cuda")  # fmt: skip
    monkeypatch.setattr(base, "cpu_flags", lambda **_: {"avx512f"})
    _one_line_refusal([*evaluate_argv, str(path), "--dataset", "digits", "--runtime", "openvino",
                       "--deploy-precision", "bf16"], capsys, "amx_bf16 or avx512_bf16")  # fmt: skip
    assert main([*evaluate_argv, str(path), "--dataset", "digits", "--runtime", "onnxruntime"]) == 0
    assert "accuracy:" in capsys.readouterr().out


def test_evaluate_refuses_an_onnx_file_of_another_shape(tmp_path, capsys, residual):
    from hybridprune.deploy.export import export_onnx

    path = export_onnx(residual, tmp_path / "m16.onnx", example_inputs=torch.zeros(1, 3, 16, 16))
    _one_line_refusal(["evaluate", str(path), "--dataset", "digits", "--test-size", "8", "--no-progress"], capsys,
                      "digits has 1x32x32 images and 10 classes")  # fmt: skip


def test_evaluate_a_checkpoint_in_a_runtime(digits_checkpoint, tmp_path, capsys):
    import json

    report = tmp_path / "e.json"
    argv = ["evaluate", str(digits_checkpoint), "--test-size", "32", "--no-progress", "--json", str(report)]
    assert main([*argv, "--runtime", "onnxruntime"]) == 0
    result = json.loads(report.read_text())
    assert result["runtime"] == "onnxruntime" and result["precision"] == "fp32" and 0 <= result["accuracy"] <= 100
    _one_line_refusal([*argv, "--overwrite", "--runtime", "onnxruntime", "--deploy-precision", "int8"], capsys,
                      "hybridprune quantize")  # fmt: skip


def test_bench_times_runtime_precision_pairs_beside_pytorch(tmp_path, one_torch_thread):
    import json

    pairs = "onnxruntime:fp32,onnxruntime:int8" + (",openvino:fp32,openvino:int8" if has_openvino else "")
    out = tmp_path / "b.json"
    argv = ["bench", "--synthetic", "--width", "0.125", "--batch-sizes", "2", "--rounds", "1", "--calls", "1",
            "--runtimes", pairs, "--no-progress", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(out.read_text())
    modes = {(r["mode"], r["dtype"], r["variant"]) for r in result["runs"]}
    for pair in pairs.split(","):
        runtime, precision = pair.split(":")
        assert {(runtime, precision, v) for v in ("dense", "filter", "nm", "hybrid")} <= modes
    assert result["runtimes"]["versions"]["onnxruntime"] and "amx_int8" in result["runtimes"]["cpu"]


def test_bench_refuses_a_pair_that_cannot_run_here_before_any_work(capsys):
    _one_line_refusal(["bench", "--synthetic", "--runtimes", "tensorrt:int8"], capsys, "tensorrt runs on cuda")
    _one_line_refusal(["bench", "--synthetic", "--runtimes", "openvino"], capsys, "is not RUNTIME:PRECISION")
