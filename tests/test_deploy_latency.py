"""Latency tables at the deployed precision: `--latency-dtype int8` and `bfloat16` on a CPU time what the runtime
runs at that precision (int8: the QDQ graph with its quantize and dequantize nodes), keep their entries apart from
fp32's, and are refused in one line where the runtime or the CPU cannot run them."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_model
from hybridprune.cli import main
from hybridprune.deploy import quantize as quantize_module
from hybridprune.deploy.profile import ProfileSettings, new_table, profile_model, resolve_settings
from hybridprune.deploy.runtimes import base
from hybridprune.errors import HybridPruneError
from hybridprune.pruning.graph import channel_groups, dependency_graph, example_input
from hybridprune.pruning.latency import Setup, layer_couplings

pytest.importorskip("onnxruntime.quantization")
CPU = torch.device("cpu")


def test_int8_and_bf16_settings_time_an_fp32_graph_at_the_runtimes_precision():
    int8 = resolve_settings("onnxruntime", 8, "int8", CPU)
    assert (int8.precision, int8.torch_dtype, int8.setup.dtype) == ("int8", torch.float32, "int8")
    assert resolve_settings("torch", 8, "float32", CPU).precision == "fp32"


@pytest.mark.parametrize(
    ("runtime", "dtype", "message"),
    [
        ("onnxruntime", "bfloat16", "--latency-dtype bfloat16: onnxruntime runs fp32, int8 on cpu, not bf16"),
        ("torch", "int8", "--latency-dtype int8: torch runs fp32, bf16 on cpu, not int8"),
        ("onnxruntime", "float16", "float16 is for GPUs"),
    ],
)
def test_a_precision_the_runtime_cannot_run_is_refused_in_one_line(runtime, dtype, message):
    with pytest.raises(HybridPruneError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_settings(runtime, 8, dtype, CPU)


def test_bf16_is_refused_on_a_cpu_without_native_bf16(monkeypatch):
    pytest.importorskip("openvino")
    monkeypatch.setattr(base, "cpu_flags", lambda **_: frozenset())
    with pytest.raises(HybridPruneError, match="openvino bf16 needs a CPU with native bf16"):
        resolve_settings("openvino", 8, "bfloat16", CPU)


@pytest.mark.parametrize("name", ["zoo:plain_net", "zoo:residual_net"])
def test_an_int8_table_times_quantized_graphs_and_keeps_its_entries_apart(name, monkeypatch, one_torch_thread):
    model = make_model(name)
    groups = channel_groups(model, dependency_graph(model))
    couplings = layer_couplings(model, groups, example_input(model))
    table = new_table(CPU)
    fp32 = ProfileSettings(Setup("onnxruntime", 2, "float32"), step=8, max_points=2, rounds=1, threads=1)
    profile_model(model, groups, couplings, table, fp32, CPU, set(), False)
    fp32_keys = set(table.entries)
    quantized = []
    real = quantize_module.timing_session
    monkeypatch.setattr(quantize_module, "timing_session", lambda *a, **k: quantized.append(a[3]) or real(*a, **k))
    int8 = ProfileSettings(Setup("onnxruntime", 2, "int8"), step=8, max_points=2, rounds=1, threads=1)
    profile_model(model, groups, couplings, table, int8, CPU, set(), False)
    int8_keys = set(table.entries) - fp32_keys
    assert len(int8_keys) == len(fp32_keys) and all("int8" in k for k in int8_keys)  # one int8 entry per fp32 one
    assert quantized and set(quantized) == {"int8"}  # every int8 timing ran a quantized graph
    assert all(table.entries[k].median_ms > 0 for k in int8_keys)


def test_profile_of_a_model_whose_counts_all_fit_one_block(tmp_path, capsys):
    # resnet20 at width 0.25 has groups of 4, 8 and 16 channels: no candidate changes the padded work, which once
    # made the fit of unit costs singular
    out, check = tmp_path / "t.json", tmp_path / "c.json"
    argv = ["profile", "--model", "resnet20", "--width", "0.25", "--dataset", "digits", "--latency-runtime",
            "onnxruntime", "--latency-dtype", "int8", "--latency-batch", "2", "--latency-points", "2",
            "--check-ratios", "0.5", "--out", str(out), "--json", str(check), "--no-progress"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    report = json.loads(check.read_text())
    assert report["checks"] and all(c["predicted_ms"] > 0 for c in report["checks"])
