"""The runtime registry: every runtime behind one protocol, each precision run where it can and refused in one
line where it cannot, ONNX files checked before a runtime reads them."""

from __future__ import annotations

import pytest
import torch

from hybridprune.config import LATENCY_RUNTIMES, RUNTIME_NAMES
from hybridprune.deploy import runtimes as rt
from hybridprune.deploy.runtimes import base, files
from hybridprune.errors import HybridPruneError

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
has_openvino = rt.get_runtime("openvino").installed()
needs_openvino = pytest.mark.skipif(not has_openvino, reason="openvino is not installed (the openvino extra)")


@pytest.fixture
def net(one_torch_thread):
    from conftest import make_model

    return make_model("zoo:residual_net")


def test_every_declared_runtime_is_registered_and_latency_runtimes_follow():
    assert rt.RUNTIMES.missing() == []
    assert list(rt.RUNTIMES) == list(RUNTIME_NAMES)
    assert LATENCY_RUNTIMES == ("auto", *RUNTIME_NAMES)
    for name in RUNTIME_NAMES:
        assert set(rt.get_runtime(name).versions())  # something for the record, installed or not


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime", pytest.param("openvino", marks=needs_openvino)])
def test_fp32_in_each_runtime_matches_pytorch(net, runtime):
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        reference = net(x)
    session = rt.get_runtime(runtime).session_of(net, x, "fp32", threads=1)
    got = session.run(x)
    # fp32 means fp32: OpenVINO's default on AMX would compute in bf16 and miss this by ~1e-2
    assert torch.allclose(got, reference, atol=1e-4 * float(reference.abs().max()) + 1e-5)
    call = session.bound(x)
    call()  # the bound call runs again on its buffers
    assert rt.module_call(net, x, runtime, threads=1) is not None


def test_torch_bf16_on_a_cpu_leaves_the_callers_module_as_it_was(net):
    runtime = rt.get_runtime("torch")
    if runtime.unsupported("bf16", "cpu"):
        pytest.skip("this CPU has no native bf16")
    x = torch.rand(2, 3, 16, 16)
    session = runtime.session_of(net, x, "bf16")
    with torch.inference_mode():
        reference = net(x)
    assert next(net.parameters()).dtype == torch.float32
    assert session.run(x).dtype == torch.float32
    assert (session.run(x) - reference).abs().max() < 0.1 * reference.abs().max() + 0.05  # bf16: ~3 digits


@needs_openvino
def test_openvino_bf16_runs_where_the_cpu_has_it_and_is_refused_naming_the_flags_where_not(net, monkeypatch):
    ov_rt = rt.get_runtime("openvino")
    x = torch.rand(2, 3, 16, 16)
    if not ov_rt.unsupported("bf16", "cpu"):
        assert ov_rt.session_of(net, x, "bf16", threads=1).run(x).shape == (2, 10)
    monkeypatch.setattr(base, "cpu_flags", lambda **_: {"avx512f"})
    with pytest.raises(HybridPruneError, match="amx_bf16 or avx512_bf16"):
        ov_rt.session_of(net, x, "bf16")
    assert "bf16" not in ov_rt.available("cpu")


def test_bf16_is_not_offered_where_onednn_is_capped_below_it(monkeypatch):
    # CI's second pass sets ONEDNN_MAX_CPU_ISA=AVX2: OpenVINO then failed to compile bf16, or crashed, on an AMX CPU
    from hybridprune.hardware import capped, cpu_flags, native_bf16

    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert native_bf16(cpu_flags()) is None and not capped({"amx_int8", "avx512_vnni"}, "AVX2")
    assert ("torch", "bf16") not in rt.available_pairs("cpu")
    if native_bf16(cpu_flags(cap="")) is not None:  # this CPU has bf16: the reason names the cap
        assert "ONEDNN_MAX_CPU_ISA=AVX2 keeps the kernels below it" in rt.get_runtime("torch").unsupported("bf16")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert native_bf16(capped({"amx_bf16"}, None)) == "amx_bf16"


@pytest.mark.parametrize(
    ("runtime", "precision", "device", "why"),
    [
        ("tensorrt", "fp16", "cpu", "runs on cuda"),
        ("onnxruntime", "bf16", "cpu", "runs fp32, int8 on cpu, not bf16"),
        ("onnxruntime", "fp32", "cuda", "runs on cpu"),
        ("torch", "int8", "cpu", "not int8"),
        ("openvino", "fp64", "cpu", "unknown precision"),
    ],
)
def test_what_cannot_run_is_one_line_naming_what_is_missing(runtime, precision, device, why):
    reason = rt.get_runtime(runtime).unsupported(precision, device)
    assert reason and why in reason and "\n" not in reason
    with pytest.raises(HybridPruneError, match=why):
        rt.get_runtime(runtime).check(precision, device)


def test_a_runtime_not_installed_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(rt.get_runtime("openvino"), "installed", lambda: False)
    assert 'pip install -e ".[openvino]"' in rt.get_runtime("openvino").unsupported("fp32", "cpu")


def test_int8_from_a_module_points_to_quantize(net):
    with pytest.raises(HybridPruneError, match="hybridprune quantize"):
        rt.get_runtime("onnxruntime").session_of(net, torch.rand(1, 3, 16, 16), "int8")


def test_resolve_runtime_and_the_available_pairs():
    cpu = torch.device("cpu")
    assert rt.resolve_runtime("auto", cpu) == "onnxruntime"
    assert rt.resolve_runtime("onnxruntime", cpu) == "onnxruntime"
    with pytest.raises(HybridPruneError, match="--latency-runtime tensorrt: tensorrt runs on cuda"):
        rt.resolve_runtime("tensorrt", cpu)
    with pytest.raises(HybridPruneError, match="unknown latency runtime"):
        rt.resolve_runtime("tvm", cpu)
    pairs = rt.available_pairs(cpu)
    assert {("torch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "int8")} <= set(pairs)
    assert all(name != "tensorrt" for name, _ in pairs)
    assert all(name != "torch" for name, _ in rt.available_pairs(cpu, onnx_only=True))


def test_cpu_isa_records_the_five_flags_that_decide_int8_and_bf16_speed():
    from hybridprune.hardware import cpu_isa

    isa = cpu_isa()
    assert {"avx512f", "avx512_vnni", "amx_int8", "amx_bf16", "avx512_bf16"} <= set(isa)
    assert all(isinstance(v, bool) for v in isa.values())


# --- ONNX files ---------------------------------------------------------------------------------------------


def _export(net, path):
    from hybridprune.deploy.export import export_onnx

    return export_onnx(net, path, example_inputs=torch.zeros(1, 3, 16, 16))


def _point_weight_at(path, location: str):
    """Rewrite the file so that its first initializer says its data lives in `location`."""
    model = onnx.load(str(path))
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.external_data[:]
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", location
    onnx.save(model, str(path))


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/passwd", "sub/../../x.bin", ""])
def test_external_data_outside_the_models_folder_is_refused_before_anything_reads_it(net, tmp_path, location):
    folder = tmp_path / "models"
    path = _export(net, folder / "m.onnx")
    _point_weight_at(path, location)
    (tmp_path / "secret.bin").write_bytes(b"\0" * 4096)
    for runtime in ("onnxruntime", "openvino") if has_openvino else ("onnxruntime",):
        with pytest.raises(HybridPruneError, match="outside the model's folder") as info:
            rt.load_onnx(path, runtime, "fp32")
        assert "\n" not in str(info.value)


def test_external_data_inside_the_folder_loads(net, tmp_path):
    path = _export(net, tmp_path / "m.onnx")
    model = onnx.load(str(path))
    onnx.save(model, str(path), save_as_external_data=True, location="m.weights", size_threshold=0)
    session, info = rt.load_onnx(path, "onnxruntime", "fp32", threads=1)
    assert info.external == ("m.weights",)
    x = torch.rand(2, 3, 16, 16)
    with torch.inference_mode():
        assert torch.allclose(session.run(x), net(x), atol=1e-4)


def test_a_file_that_is_not_a_model_or_not_of_its_precision_is_one_line(net, tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07not a model at all")
    with pytest.raises(HybridPruneError, match="is not an ONNX model|inputs and"):
        rt.load_onnx(junk, "onnxruntime", "fp32")
    path = _export(net, tmp_path / "m.onnx")
    with pytest.raises(HybridPruneError, match="holds no quantized operators"):
        rt.load_onnx(path, "onnxruntime", "int8")
    with pytest.raises(HybridPruneError, match="runs on cuda"):
        rt.load_onnx(path, "tensorrt", "fp16")
    with pytest.raises(HybridPruneError, match="runs PyTorch modules, not ONNX files"):
        rt.load_onnx(path, "torch", "fp32")


def test_check_classifier_compares_the_files_interface_with_the_dataset(net, tmp_path):
    info = files.inspect_onnx(_export(net, tmp_path / "m.onnx"))
    assert info.input_shape[1:] == (3, 16, 16) and info.output_shape[1:] == (10,) and not info.quantized
    files.check_classifier(info, 3, 16, 10, "tiny")
    with pytest.raises(HybridPruneError, match="tiny has 1x32x32 images and 10 classes"):
        files.check_classifier(info, 1, 32, 10, "tiny")
    with pytest.raises(HybridPruneError, match="and 100 classes"):
        files.check_classifier(info, 3, 16, 100, "tiny")
