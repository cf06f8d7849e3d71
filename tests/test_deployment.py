"""`run --deploy`: every model of a job in its deployed forms, top-1 measured in the runtime that runs it (the
same number as evaluating the written file there), 2:4 zeros kept through INT8, a bare precision resolved to the
runtime measured fastest, finished forms reused on resume and removed by --overwrite, and each refusal in one
line before anything is written."""

from __future__ import annotations

import json

import pytest
import torch

from hybridprune.cli import main
from hybridprune.config import DataConfig, DeployConfig, ModelConfig, PruneConfig, RunConfig, TrainConfig
from hybridprune.deploy import deployment
from hybridprune.deploy.accuracy import onnx_accuracy
from hybridprune.deploy.runtimes import base, get_runtime
from hybridprune.errors import HybridPruneError
from hybridprune.experiments.deployed import variant_stages
from hybridprune.experiments.inputs import prepare_data
from hybridprune.experiments.job import run

pytest.importorskip("onnxruntime.quantization")
CPU = torch.device("cpu")
TINY = {"alexnet": 0.125, "resnet20": 0.25}


def tiny_job(model: str, targets: tuple[str, ...], **deploy) -> RunConfig:
    """One metric, one epoch on a digits subset: four variants (dense, 2:4-only, filter, filter+2:4)."""
    return RunConfig(
        data=DataConfig(dataset="digits", train_size=256, test_size=64),
        model=ModelConfig(name=model, width=TINY[model]),
        train=TrainConfig(epochs=1, batch_size=64, precision="fp32"),
        finetune=TrainConfig(epochs=1, batch_size=64, precision="fp32", warmup=0.0),
        prune=PruneConfig(metric="l1", filter_ratio=0.5, round_to=4),
        metrics=("l1",),
        deploy=DeployConfig(targets=targets, batch_sizes=(8, 1), rounds=2, calibration_images=64, **deploy),
    )


@pytest.mark.parametrize("model", ["alexnet", "resnet20"])
def test_every_variant_is_deployed_and_its_top1_is_the_files_in_its_runtime(model, tmp_path, one_torch_thread):
    cfg = tiny_job(model, ("onnxruntime:int8", "onnxruntime:fp32"))
    result = run(cfg, tmp_path / "run", CPU, progress=False, log=lambda _: None)
    deployed = result["deployed"]
    names = [name for name, _ in variant_stages(result)]
    assert names == ["dense", "2:4 only", "l1 filter", "l1 filter+2:4"]
    pairs = [("onnxruntime", "int8"), ("onnxruntime", "fp32")]
    assert [(f["variant"], f["runtime"], f["precision"]) for f in deployed["forms"]] == [
        (n, *p) for n in names for p in pairs
    ]
    test = prepare_data(cfg).test
    for form in deployed["forms"]:
        again = onnx_accuracy(form["file"], test, form["runtime"], form["precision"], threads=1, progress=False)
        assert again.top1 == form["top1"] and again.images == 64  # measured on the written file, in its runtime
        assert set(form["latency"]) == {"8", "1"}  # every form timed at every batch
        for batch, t in form["latency"].items():
            assert t["speedup"] == pytest.approx(deployed["baseline"]["latency_ms"][batch] / t["median_ms"])
            assert t["p10_ms"] <= t["median_ms"] <= t["p90_ms"]
        if form["precision"] == "fp32":  # fp32 in ONNX Runtime is the trained model: same predictions, near enough
            assert form["top1"] == pytest.approx(form["trained_top1"], abs=100 / 64 + 1e-9)
        else:
            assert form["zeros_lost"] == 0  # the 2:4 variants' zeros survive quantization (quantize checks it)
    assert deployed["baseline"]["runtime"] == "onnxruntime" and deployed["cpu"]["name"]


def test_resume_reuses_finished_forms_and_overwrite_removes_them(tmp_path, one_torch_thread):
    cfg = tiny_job("alexnet", ("onnxruntime:int8",))
    out = tmp_path / "run"
    first = run(cfg, out, CPU, progress=False, log=lambda _: None)
    files = {f["file"]: (out / "deploy" / f["file"].split("/")[-1]).stat().st_mtime_ns
             for f in first["deployed"]["forms"]}  # fmt: skip
    (out / "deploy.json").unlink()  # as if interrupted after the forms were made, before the stage's record
    (out / "results.json").unlink()
    lines: list[str] = []
    again = run(cfg, out, CPU, resume=True, progress=False, log=lines.append)
    assert [f["top1"] for f in again["deployed"]["forms"]] == [f["top1"] for f in first["deployed"]["forms"]]
    assert {p: (out / "deploy" / p.split("/")[-1]).stat().st_mtime_ns for p in files} == files  # not remade
    run(cfg, out, CPU, overwrite=True, progress=False, log=lambda _: None)
    assert not any(p.name.startswith("dense-onnxruntime-int8.onnx.") for p in (out / "deploy").iterdir())
    run(cfg.__class__(**{**cfg.__dict__, "deploy": DeployConfig()}), out, CPU, overwrite=True, progress=False,
        log=lambda _: None)  # fmt: skip
    assert not list((out / "deploy").glob("*.onnx"))  # --overwrite removed the deployed files of the run it redid


@pytest.mark.parametrize("winner", [0, 1])
def test_a_bare_precision_takes_the_runtime_measured_fastest(winner, tmp_path, monkeypatch, one_torch_thread):
    def fake_times(forms, builder, x, rounds):
        pairs = [p for _, p in forms]
        if len(set(pairs)) == len(pairs) and all(v.name == "dense" for v, _ in forms) and len(forms) == 2:
            return [[1.0, 1.0], [2.0, 2.0]] if winner == 0 else [[3.0, 3.0], [2.0, 2.0]]
        return [[1.0, 1.0] for _ in forms]

    monkeypatch.setattr(deployment, "_time_forms", fake_times)
    monkeypatch.setattr(deployment, "target_pairs", lambda t, d="cpu": [("onnxruntime", "fp32"), ("torch", "fp32")])
    from hybridprune.data.datasets import load_dataset
    from hybridprune.data.images import Dataset
    from hybridprune.models.sources import build_model

    data = load_dataset("digits")
    data = Dataset(data.name, data.train, data.test.subset(16, 0), data.hflip)
    dense = deployment.Variant("dense", build_model("alexnet", in_channels=1, width=0.125).eval())
    lines: list[str] = []
    cfg = DeployConfig(targets=("fp32",), batch_sizes=(4,), rounds=2)
    record = deployment.deploy_variants([dense], data, cfg, tmp_path, progress=False, log=lines.append)
    chosen = ("onnxruntime", "torch")[winner]
    assert record["choices"] == [{"target": "fp32", "runtime": chosen, "precision": "fp32", "by": "measured",
                                  "median_ms": {"onnxruntime": 1.0 if winner == 0 else 3.0, "torch": 2.0}}]  # fmt: skip
    assert [f["runtime"] for f in record["forms"]] == [chosen]
    lines = [line for line in lines if not line.startswith("note: load average")]  # a busy machine is said too
    assert lines == [f"deploy fp32: {chosen} (dense model {1.0 if winner == 0 else 2.0:.3f} ms at batch 4; "
                     f"{('torch 2.000 ms', 'onnxruntime 3.000 ms')[winner]})"]  # fmt: skip


def test_a_bare_precision_names_what_each_runtime_lacks(monkeypatch):
    monkeypatch.setattr(base, "cpu_flags", lambda **_: frozenset())  # a CPU without native bf16
    with pytest.raises(HybridPruneError, match="no runtime here runs it") as e:
        deployment.target_pairs("bf16")
    assert "needs a CPU with native bf16" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("int4", "unknown deploy target 'int4'; valid: a precision"),
        ("tensorrt:int8", "tensorrt runs on cuda, not on cpu"),
        ("onnxruntime:bf16", "onnxruntime runs fp32, int8 on cpu, not bf16"),
        ("int8 --deploy-batch 0", "deploy batch sizes must be integers in [1, 4096], got [0]"),
        ("int8 --deploy-batch 1,x", "--deploy-batch takes integers separated by commas, got '1,x'"),
    ],
)
def test_deploy_targets_that_cannot_run_are_one_line_before_any_work(flag, message, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["run", "--train-size", "64", "--test-size", "16", "--epochs", "0", "--deploy", *flag.split(), "--out",
            str(out)]  # fmt: skip
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_an_openvino_target_is_refused_where_it_is_not_installed(monkeypatch):
    monkeypatch.setattr(type(get_runtime("openvino")), "installed", lambda self: False)
    with pytest.raises(HybridPruneError, match=r"openvino is not installed \(pip install"):
        deployment.check_targets(DeployConfig(targets=("openvino:int8",)))


def test_a_grid_deploys_each_run_and_the_report_shows_it_over_seeds(tmp_path, one_torch_thread):
    from hybridprune.experiments.grid import grid_from_dict, run_grid
    from hybridprune.experiments.report import write_grid_report
    from hybridprune.experiments.store import Store

    raw = {
        "datasets": [{"dataset": "digits", "train_size": 96, "test_size": 48}],
        "models": [{"name": "alexnet", "width": 0.125}],
        "metrics": ["l1"],
        "ratios": [0.5],
        "seeds": [0, 1],
        "train": {"epochs": 1, "batch_size": 32, "precision": "fp32"},
        "finetune": {"epochs": 1, "batch_size": 32, "precision": "fp32"},
        "prune": {"round_to": 4, "calib_batches": 1, "bn_recalib_batches": 1, "calib_batch_size": 32},
        "nm_only": False,
        "deploy": {"targets": ["onnxruntime:int8"], "batch_sizes": [4], "rounds": 1, "calibration_images": 32},
    }
    grid = grid_from_dict(raw, "deployed")
    with pytest.raises(HybridPruneError, match="--workers 1"):
        run_grid(grid, Store(tmp_path / "refused.sqlite"), workers=2, progress=False, log=lambda _: None)
    store = Store(tmp_path / "d.sqlite")
    assert run_grid(grid, store, progress=False, log=lambda _: None)["done"] == 2
    rows = store.rows()
    for row in rows:
        forms = json.loads(row["result"])["deployed"]["forms"]
        assert [f["variant"] for f in forms] == ["dense", "l1 filter", "l1 filter+2:4"]
        assert all(f["zeros_lost"] == 0 and f["latency"]["4"]["median_ms"] > 0 for f in forms)
    write_grid_report(rows, tmp_path / "report")
    report = (tmp_path / "report" / "report.md").read_text()
    section = report.split("## Deployed")[1]
    for variant in ("dense", "l1 filter", "l1 filter+2:4"):
        line = next(x for x in section.splitlines() if f"| {variant} " in x)
        top1 = [json.loads(r["result"])["deployed"]["forms"] for r in rows]
        mean = sum(next(f["top1"] for f in fs if f["variant"] == variant) for fs in top1) / 2
        assert f"{mean:.2f} ±" in line and line.rstrip(" |").endswith("2")  # the mean over both seeds
    with pytest.raises(HybridPruneError, match="unknown deploy target"):
        grid_from_dict({**raw, "deploy": {"targets": ["int3"]}}, "bad")


def test_auto_takes_the_fastest_runtime_and_precision_that_keeps_the_accuracy(tmp_path, monkeypatch):
    pairs = [("onnxruntime", "fp32"), ("onnxruntime", "int8"), ("openvino", "bf16")]
    top1 = {pairs[0]: 90.0, pairs[1]: 85.0, pairs[2]: 89.5}  # int8 loses 5 points here, bf16 half a point
    speed = {pairs[0]: 3.0, pairs[1]: 1.0, pairs[2]: 2.0}  # int8 fastest, then bf16

    def fake_record(self, variant, pair):
        return {"variant": variant.name, "runtime": pair[0], "precision": pair[1], "top1": top1[pair],
                "trained_top1": variant.trained_top1}  # fmt: skip

    monkeypatch.setattr(deployment._FormBuilder, "record", fake_record)
    monkeypatch.setattr(deployment, "_time_forms", lambda forms, *a: [[speed[p], speed[p]] for _, p in forms])
    monkeypatch.setattr(deployment, "available_pairs", lambda device="cpu", onnx_only=False: pairs)
    from hybridprune.data.datasets import load_dataset
    from hybridprune.data.images import Dataset

    data = load_dataset("digits")
    data = Dataset(data.name, data.train, data.test.subset(16, 0), data.hflip)
    dense = deployment.Variant("dense", torch.nn.Identity(), trained_top1=90.0)
    lines: list[str] = []
    for tolerance, chosen in ((1.0, "openvino:bf16"), (6.0, "onnxruntime:int8")):
        cfg = DeployConfig(targets=("auto",), batch_sizes=(4,), rounds=2, auto_tolerance=tolerance)
        record = deployment.deploy_variants([dense], data, cfg, tmp_path, progress=False, log=lines.append)
        choice = record["choices"][0]
        assert f"{choice['runtime']}:{choice['precision']}" == chosen
        assert choice.get("accuracy_excluded", []) == ([] if tolerance > 5 else ["onnxruntime:int8"])
    assert "losing over 1 points of top-1: onnxruntime:int8" in [x for x in lines if not x.startswith("note:")][0]


def test_a_form_that_cannot_be_made_is_said_and_the_others_still_count(tmp_path, monkeypatch, one_torch_thread):
    from hybridprune.data.datasets import load_dataset
    from hybridprune.data.images import Dataset
    from hybridprune.models.sources import build_model

    real = deployment._FormBuilder._make

    def failing(self, variant, pair):
        if variant.name == "broken":
            raise HybridPruneError("ONNX export of Broken failed (an operator ONNX lacks)")
        return real(self, variant, pair)

    monkeypatch.setattr(deployment._FormBuilder, "_make", failing)
    data = load_dataset("digits")
    data = Dataset(data.name, data.train, data.test.subset(16, 0), data.hflip)
    net = build_model("alexnet", in_channels=1, width=0.125).eval()
    nets = [deployment.Variant(n, net) for n in ("dense", "broken")]
    lines: list[str] = []
    cfg = DeployConfig(targets=("onnxruntime:fp32",), batch_sizes=(4,), rounds=1)
    record = deployment.deploy_variants(nets, data, cfg, tmp_path, progress=False, log=lines.append)
    assert [f["variant"] for f in record["forms"]] == ["dense"] and "latency" in record["forms"][0]
    assert record["failed"][0]["error"] == "ONNX export of Broken failed (an operator ONNX lacks)"
    lines = [line for line in lines if not line.startswith("note: load average")]  # a busy machine is said too
    assert lines == ["deploy: broken in onnxruntime fp32 failed: ONNX export of Broken failed (an operator ONNX lacks)"]


def test_resume_may_change_the_deploy_settings_without_retraining(tmp_path, one_torch_thread):
    cfg = tiny_job("alexnet", ("onnxruntime:fp32",))
    out = tmp_path / "run"
    run(cfg, out, CPU, progress=False, log=lambda _: None)
    checkpoints = {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}
    lines: list[str] = []
    again = run(cfg.__class__(**{**cfg.__dict__, "deploy": DeployConfig(targets=("onnxruntime:int8",),
                batch_sizes=(4,), rounds=1, calibration_images=32)}), out, CPU, resume=True, progress=False,
                log=lines.append)  # fmt: skip
    assert {f["precision"] for f in again["deployed"]["forms"]} == {"int8"}  # the new settings, measured
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")} == checkpoints  # no model redone
    assert not any("deploy: reusing" in line for line in lines)


def test_too_few_training_images_for_int8_are_refused_before_training(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["run", "--train-size", "64", "--test-size", "16", "--epochs", "0", "--deploy", "int8",
            "--calibration-images", "100", "--out", str(out)]  # fmt: skip
    assert main(argv) == 2
    assert "calibrates on 100 training images (--calibration-images) but the training split has 64" in (
        capsys.readouterr().err) and not out.exists()  # fmt: skip
