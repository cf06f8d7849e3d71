"""ONNX export: the file computes what the checkpoint computes, at any batch size, and keeps the 2:4 pattern."""

import numpy as np
import pytest
import torch

from conftest import make_model
from hybridprune.cli import main
from hybridprune.config import NMPattern, PruneConfig
from hybridprune.deploy.export import check_onnx, count_broken_groups, export_onnx
from hybridprune.pruning.checkpoint import save_checkpoint
from hybridprune.pruning.filters import prune_filters_
from hybridprune.pruning.nm import nm_prune_

ort = pytest.importorskip("onnxruntime")


def _hybrid(model):
    prune_filters_(model, PruneConfig(metric="l1", filter_ratio=0.4, round_to=4), [])
    return nm_prune_(model)


def test_the_exported_hybrid_model_matches_pytorch_and_keeps_2_to_4(zoo_model, tmp_path):
    masks = _hybrid(zoo_model)
    path = export_onnx(zoo_model, tmp_path / "m.onnx")
    images = torch.rand(16, *zoo_model.input_shape)
    check = check_onnx(path, zoo_model, masks, images, NMPattern())
    assert check.ok and check.matches and check.top1_agreement == 1.0
    assert check.nm_layers_found == len(masks) > 0 and check.broken_groups == 0


@pytest.mark.parametrize("batch", [1, 7])
def test_the_batch_size_is_dynamic(batch, tmp_path):
    model = make_model("zoo:residual_net")
    session = ort.InferenceSession(str(export_onnx(model, tmp_path / "m.onnx")), providers=["CPUExecutionProvider"])
    x = torch.rand(batch, *model.input_shape)
    got = session.run(None, {"images": x.numpy()})[0]
    np.testing.assert_allclose(got, model(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_a_torchvision_network_exports(tmp_path):
    from hybridprune.models.sources import build_model

    model = build_model("torchvision:mobilenet_v2", image_size=32).eval()
    masks = _hybrid(model)
    check = check_onnx(export_onnx(model, tmp_path / "m.onnx"), model, masks, torch.rand(4, 3, 32, 32), NMPattern())
    assert check.ok and check.nm_layers_found == len(masks)


def test_broken_groups_are_counted():
    w = np.zeros((2, 8, 1, 1), dtype=np.float32)
    w[0, :2] = 1.0  # 2 of 4: fine
    w[1, 4:7] = 1.0  # 3 of 4: one broken group
    assert count_broken_groups(w, NMPattern()) == 1
    assert count_broken_groups(np.ones((3, 8), dtype=np.float32), NMPattern()) == 6


def test_export_command_writes_a_checked_file_and_refuses_to_overwrite(tmp_path, capsys):
    model = make_model("resnet20")
    masks = _hybrid(model)
    ckpt = save_checkpoint(tmp_path / "m.safetensors", model, masks)
    out = tmp_path / "m.onnx"
    assert main(["export", str(ckpt), "--out", str(out), "--check-images", "8"]) == 0
    printed = capsys.readouterr().out
    assert f"N:M layers found in the file: {len(masks)} of {len(masks)}; groups breaking 2:4: 0" in printed
    before = out.read_bytes()
    assert main(["export", str(ckpt), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "exists; pass --overwrite" in err and len(err.splitlines()) == 1
    assert out.read_bytes() == before
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(ckpt.read_bytes()[:1000])
    assert main(["export", str(broken), "--out", str(tmp_path / "b.onnx")]) == 2
    assert not (tmp_path / "b.onnx").exists()


@pytest.mark.slow
def test_bench_times_the_onnxruntime_variant_beside_pytorch(tmp_path):
    import json

    out = tmp_path / "b.json"
    args = ["bench", "--synthetic", "--model", "resnet20", "--width", "0.5", "--round-to", "4", "--batch-sizes", "2"]
    assert main([*args, "--rounds", "1", "--calls", "1", "--onnxruntime", "--no-progress", "--json", str(out)]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert {(r["mode"], r["variant"]) for r in runs} >= {
        ("onnxruntime", v) for v in ("dense", "filter", "nm", "hybrid")
    }
    assert all(r["latency_ms_median"] > 0 for r in runs)
