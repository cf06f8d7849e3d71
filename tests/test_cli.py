import json
import re
from dataclasses import fields

import pytest
import torch

from hybridprune.cli import build_parser, main
from hybridprune.cli.flags import Bound, config_from_args, model_string, numeric_flags, ratio
from hybridprune.cli.run import data_config_from_args, run_config_from_args
from hybridprune.config import AnalysisConfig, BenchConfig, ConvertConfig, ExportConfig, PoolConfig, QuantizeConfig
from hybridprune.errors import HybridPruneError
from hybridprune.pruning.checkpoint import load_checkpoint
from hybridprune.pruning.nm import satisfies_nm

TINY = [
    "--train-size",
    "160",
    "--test-size",
    "80",
    "--width",
    "0.125",
    "--epochs",
    "1",
    "--finetune-epochs",
    "1",
    "--batch-size",
    "32",
    "--round-to",
    "8",
    "--calib-batches",
    "1",
    "--bn-recalib-batches",
    "2",
    "--no-progress",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    code = main(["run", *TINY, "--metric", "l1,hybrid", "--out", str(out / "run"), "--json", str(out / "r.json")])
    assert code == 0
    return out


def test_run_writes_the_documented_json(tiny_run):
    result = json.loads((tiny_run / "r.json").read_text())
    assert 0 <= result["dense"]["accuracy"] <= 100
    assert [r["metric"] for r in result["results"]] == ["l1", "hybrid"]
    for item in result["results"]:
        for stage in ("filter", "hybrid"):
            for key in (
                "accuracy",
                "accuracy_oneshot",
                "accuracy_oneshot_raw",
                "params",
                "nonzero_params",
                "macs",
                "effective_macs",
            ):
                assert key in item[stage]
        assert item["filter"]["params"] < result["dense"]["params"]
        assert item["hybrid"]["nonzero_params"] < item["filter"]["nonzero_params"]
        assert item["hybrid"]["effective_macs"] < item["hybrid"]["macs"]
        model, masks, _ = load_checkpoint(item["checkpoint"])
        modules = dict(model.named_modules())
        assert masks and all(satisfies_nm(modules[n].weight) for n in masks)
        assert model(torch.rand(2, 1, 32, 32)).shape == (2, 10)
    assert result["nm"]["params"] == result["dense"]["params"]  # the 2:4-only model keeps the dense width
    assert result["environment"]["torch"] == torch.__version__


def test_run_refuses_an_existing_output_and_resumes_without_redoing_work(tiny_run, capsys):
    out = tiny_run / "run"
    assert main(["run", *TINY, "--metric", "l1,hybrid", "--out", str(out)]) == 2
    assert "exists; pass --resume" in capsys.readouterr().err
    stamp = (out / "step-l1-hybrid.json").stat().st_mtime_ns
    assert main(["run", *TINY, "--metric", "l1,hybrid", "--out", str(out), "--resume"]) == 0
    assert (out / "step-l1-hybrid.json").stat().st_mtime_ns == stamp
    assert "reusing" in capsys.readouterr().out


def test_prune_and_evaluate_from_a_checkpoint(tiny_run, capsys):
    dense = tiny_run / "run" / "dense.safetensors"
    out = tiny_run / "pruned"
    assert (
        main(
            [
                "prune",
                str(dense),
                *TINY[:4],
                "--metric",
                "random",
                "--round-to",
                "8",
                "--finetune-epochs",
                "0",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "evaluate",
                str(out / "random-hybrid.safetensors"),
                "--test-size",
                "80",
                "--json",
                str(tiny_run / "eval.json"),
            ]
        )
        == 0
    )
    evaluation = json.loads((tiny_run / "eval.json").read_text())
    assert evaluation["nm_pattern_holds"] and evaluation["nm_layers"]


def test_train_writes_a_checkpoint(tmp_path):
    path = tmp_path / "dense.safetensors"
    assert main(["train", *TINY[:8], "--batch-size", "32", "--no-progress", "--out", str(path)]) == 0
    model, masks, meta = load_checkpoint(path)
    assert not masks and meta["stage"] == "dense"
    assert meta["environment"]["torch"] == torch.__version__ and meta["config"]["train"]["epochs"] == 1


@pytest.mark.parametrize(
    "args,message",
    [
        (["run", "--filter-ratio", "1.5"], "outside [0, 1)"),
        (["run", "--nm", "4:4"], "0 < N < M"),
        (["run", "--metric", "l3"], "unknown metric 'l3'; valid names: l1, l2, hybrid"),
        (["run", "--model", "vgg99"], "unknown model 'vgg99'; valid names: alexnet"),
        (["run", "--dataset", "imagenet"], "unknown dataset 'imagenet'; valid names: digits"),
        (["run", "--dataset", "mnist", "--data-dir", "/nonexistent"], "dataset mnist not found: expected"),
        (["run", "--device", "tpu"], "unknown device"),
        (["evaluate", "/nonexistent.safetensors"], "checkpoint /nonexistent.safetensors not found"),
        (["prune", "/nonexistent.safetensors"], "not found"),
    ],
)
def test_bad_input_gives_one_line_and_a_nonzero_exit(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        code = main(args)
    except SystemExit as e:  # argparse rejects some values itself
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_corrupted_checkpoint_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    assert main(["evaluate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "not a readable hybridprune checkpoint" in err and len(err.strip().splitlines()) == 1


def test_bench_compares_the_four_variants_of_a_run(tiny_run, capsys):
    out = tiny_run / "bench.json"
    assert (
        main(
            [
                "bench",
                str(tiny_run / "run"),
                "--batch-sizes",
                "1,8",
                "--rounds",
                "2",
                "--calls",
                "1",
                "--device",
                "cpu",
                "--no-progress",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "no sparse tensor cores" in printed and "hybrid/filter" in printed
    result = json.loads(out.read_text())
    runs = result["runs"]
    assert {r["variant"] for r in runs} == {"dense", "filter", "nm", "hybrid"}
    assert {r["batch_size"] for r in runs} == {1, 8}
    for r in runs:
        assert r["device"] == "cpu" and r["dtype"] == "float32" and r["latency_ms_median"] > 0
        assert r["throughput"] == pytest.approx(r["batch_size"] / r["latency_ms_median"] * 1e3)
        assert r["latency_ms_p10"] <= r["latency_ms_median"] <= r["latency_ms_p90"]
    assert result["variants"]["hybrid"]["accuracy"] is not None
    sizes = {s["variant"]: s for s in result["weight_bytes"]}
    assert sizes["hybrid"]["weight_bytes_compressed"] < sizes["filter"]["weight_bytes_dense"]
    assert sizes["nm"]["weight_bytes_as_run"] == sizes["nm"]["weight_bytes_dense"]  # CPU: no compression


@pytest.mark.parametrize(
    "args,message",
    [
        (["bench", "--synthetic", "--batch-sizes", "8,-1"], "integers in [1, 65536]"),
        (["bench", "--synthetic", "--dtypes", "float16", "--device", "cpu"], "not run on the CPU"),
        (["bench", "--synthetic", "--dtypes", "fp64"], "unknown dtype"),
        (["bench"], "give exactly one source"),
    ],
)
def test_bench_bad_input_is_one_line(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_bench_refuses_a_hybrid_checkpoint_without_masks(tiny_run, capsys):
    dense = str(tiny_run / "run" / "dense.safetensors")
    assert main(["bench", "--dense", dense, "--hybrid", dense, "--device", "cpu"]) == 2
    assert "has no N:M masks" in capsys.readouterr().err


def test_convert_reports_every_layer_and_matches_the_masked_model(tiny_run, capsys):
    report = tiny_run / "convert.json"
    ckpt = str(tiny_run / "run" / "hybrid-hybrid.safetensors")
    assert main(["convert", ckpt, "--device", "cpu", "--batch-size", "4", "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    assert "no sparse tensor cores" in result["notice"] and result["relative_max_diff"] < 1e-5
    assert [layer["kernel"] for layer in result["layers"]] == ["dense"] * len(result["layers"])
    assert main(["convert", str(tiny_run / "run" / "dense.safetensors"), "--device", "cpu"]) == 2
    assert "has no N:M masks" in capsys.readouterr().err


def test_experiment_and_report_commands_on_the_shipped_tiny_grid(tmp_path, capsys):
    from pathlib import Path

    tiny = Path(__file__).parent.parent / "experiments" / "tiny.yaml"
    store = tmp_path / "tiny.sqlite"
    assert main(["experiment", str(tiny), "--store", str(store), "--device", "cpu", "--no-progress"]) == 0
    assert "4 runs finished now, 0 earlier, 0 failed" in capsys.readouterr().out
    assert main(["experiment", str(tiny), "--store", str(store), "--device", "cpu", "--no-progress"]) == 0
    assert "0 runs finished now, 4 earlier" in capsys.readouterr().out
    assert main(["report", "--store", str(store), "--out", str(tmp_path / "report")]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "hybrid - l1" in report and "ratio 0.2" in report and "ratio 0.5" in report


@pytest.mark.parametrize(
    "yaml_text,message",
    [
        ("metrics: [l1]\nratio: [0.4]\n", "unknown key ratio"),
        ("metrics: [l9]\n", "unknown metric 'l9'"),
        ("ratios: [1.0]\n", "ratio 1.0 is outside [0, 1)"),
    ],
)
def test_experiment_bad_config_is_one_line_and_writes_nothing(tmp_path, capsys, yaml_text, message):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml_text)
    store = tmp_path / "s.sqlite"
    assert main(["experiment", str(config), "--store", str(store)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not store.exists()


def test_report_refuses_a_missing_or_foreign_store(tmp_path, capsys):
    assert main(["report", "--store", str(tmp_path / "none.sqlite"), "--out", str(tmp_path / "r")]) == 2
    assert "not found" in capsys.readouterr().err
    foreign = tmp_path / "foreign.sqlite"
    foreign.write_bytes(b"not a database at all" * 10)
    before = foreign.read_bytes()
    assert main(["report", "--store", str(foreign), "--out", str(tmp_path / "r")]) == 2
    assert "not a hybridprune store" in capsys.readouterr().err
    assert foreign.read_bytes() == before and not (tmp_path / "r").exists()


# --- numeric flags: each bound lives in the config field the flag sets -------------------------------------------
NUMERIC = sorted(numeric_flags(build_parser()).items(), key=lambda item: item[0])
POSITIONALS = {"prune": ["c.pt"], "evaluate": ["c.pt"], "convert": ["c.pt"], "export": ["c.pt", "--out", "m.onnx"]}
POSITIONALS["experiment"] = ["grid.yaml"]
POSITIONALS["profile"] = ["--out", "table.json"]
POSITIONALS["quantize"] = ["c.pt", "--out", "m.onnx", "--dataset", "digits"]


def _parse(command, flag, value):
    extra = ["--distill"] if flag == "--distill-weight" else []  # the weight counts only with --distill
    return build_parser().parse_args([command, *POSITIONALS.get(command, []), *extra, flag, value])


def _edges(config, field):
    """The config's own bound of `field`, the values just outside it, and how a flag writes each."""
    low, high = config.RANGES[field]
    declared = str(next(f.type for f in fields(config) if f.name == field))
    if "float" in declared:
        step = lambda x: max(abs(x), 1.0) * 1e-3  # noqa: E731
        return [low, high], [low - step(low), high + step(high)], repr
    return [int(low), int(high)], [int(low) - 1, int(high) + 1], str


def test_every_numeric_flag_goes_through_a_config_bound():
    for command, sub in next(a for a in build_parser()._actions if a.dest == "command").choices.items():
        for action in sub._actions:
            allowed = (None, ratio, model_string)  # model_string checks a source's form: no number passes it
            assert action.type in allowed or isinstance(action.type, Bound), (command, action.option_strings)
    assert {c for (c, _), _ in NUMERIC} == {"run", "train", "prune", "evaluate", "bench", "convert", "export",
                                            "experiment", "profile", "quantize"}  # fmt: skip


NUMERIC_CASES = [pytest.param(c, f, b, id=f"{c} {f}") for (c, f), b in NUMERIC]


@pytest.mark.parametrize("command,flag,bound", NUMERIC_CASES)
def test_a_numeric_flag_takes_exactly_the_bound_of_its_config_field(command, flag, bound, capsys):
    inside, outside, text = _edges(bound.config, bound.field)
    for value in inside:
        assert getattr(_parse(command, flag, text(value)), flag[2:].replace("-", "_")) == value
        bound.config(**{bound.field: value})  # the config takes it too
    for value in outside:
        with pytest.raises(SystemExit) as refused:
            _parse(command, flag, text(value))
        assert refused.value.code == 2 and flag in capsys.readouterr().err
        with pytest.raises(HybridPruneError):
            bound.config(**{bound.field: value})


def _configs_built(command, args):
    if hasattr(args, "analysis_timeout"):  # read by `main` itself, around every command that takes it
        return [config_from_args(AnalysisConfig, args), *_command_configs(command, args)]
    return _command_configs(command, args)


def _command_configs(command, args):
    if command in ("run", "train", "prune"):
        cfg = run_config_from_args(args)
        return [cfg, cfg.data, cfg.model, cfg.train, cfg.finetune, cfg.prune, cfg.deploy]
    if command == "evaluate":
        return [data_config_from_args(args)]
    if command == "quantize":
        from hybridprune.cli.quantize import data_config

        return [config_from_args(QuantizeConfig, args), data_config(args)]
    own = (BenchConfig, ConvertConfig, ExportConfig, PoolConfig)
    return [config_from_args(c, args) for c in own if all(hasattr(args, f.name) for f in fields(c))]


# Flags whose value goes straight to the library, not through a config of the class that bounds them.
UNCONFIGURED = {("bench", "--width"), ("bench", "--round-to"), ("bench", "--seed"), ("evaluate", "--seed")}
UNCONFIGURED |= {("quantize", "--seed"), ("quantize", "--threads")}  # the calibration seed; the runtime's threads
UNCONFIGURED |= {  # profile hands its numbers to the profiler (bounded by the fields named, no config built)
    ("profile", f)
    for f in ("--width", "--channels", "--image-size", "--latency-batch", "--latency-step", "--latency-points")
}


@pytest.mark.parametrize("command,flag,bound", NUMERIC_CASES)
def test_a_numeric_flag_sets_the_config_field_it_takes_its_bound_from(command, flag, bound):
    (_, high), _, text = _edges(bound.config, bound.field)
    built = [c for c in _configs_built(command, _parse(command, flag, text(high))) if type(c) is bound.config]
    assert bool(built) != ((command, flag) in UNCONFIGURED), f"{command} builds no {bound.config.__name__}"
    assert not built or any(getattr(c, bound.field) == high for c in built), f"{flag} does not set {bound.field}"


def test_workers_means_decoding_processes_from_0_and_grid_workers_from_1(capsys):
    assert build_parser().parse_args(["run", "--workers", "0"]).workers == 0
    with pytest.raises(SystemExit):
        build_parser().parse_args(["experiment", "g.yaml", "--workers", "0"])
    assert "--workers must be an integer in [1, 256], got '0'" in capsys.readouterr().err


def test_a_run_without_2to4_says_only_what_it_did(tmp_path, capsys):
    """--nm-where none: no 2:4 step, stage, variant or label; the rows named `filter`; the settings recorded."""
    out = tmp_path / "run"
    assert main(["run", *TINY, "--metric", "l1", "--nm-where", "none", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "results.json").read_text())
    [item] = result["results"]
    assert "hybrid" not in item and "nm" not in result and item["checkpoint"] == item["filter"]["checkpoint"]
    assert result["config"]["prune"]["nm_where"] == "none" and result["config"]["prune"]["filter_ratio"] == 0.4
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["dense.safetensors", "l1-filter.safetensors"]
    assert "N:M" not in printed and "2:4 only" not in printed and "filter+" not in printed
    assert "| l1     | filter |" in printed and "no layer took 2:4" in printed
    assert "unreadable" not in printed  # nothing skipped is no news


def test_a_run_names_its_2to4_rows_and_layers_by_the_pattern(tiny_run, capsys):
    from hybridprune.experiments.tables import layer_table, run_table

    result = json.loads((tiny_run / "r.json").read_text())
    rows, layers = run_table(result), layer_table(result)
    assert "| l1     | filter+2:4 |" in rows and "2:4 only" in rows and "N:M" not in rows
    masked = set(result["results"][0]["hybrid"]["nm_layers"])
    names = {line.split("|")[1].strip(): line for line in layers.splitlines()[2:]}
    assert set(names) == {e["name"] for e in result["layers"]}  # the JSON's names, net. prefix and all
    assert all(names[n].rstrip(" |").endswith("| 2:4") for n in masked) and masked


def test_bench_notes_a_busy_machine_and_shows_the_spread(tiny_run, capsys, monkeypatch):
    import os

    out = tiny_run / "busy.json"
    argv = ["bench", str(tiny_run / "run"), "--device", "cpu", "--batch-sizes", "2", "--rounds", "2", "--calls", "2",
            "--no-progress", "--json", str(out), "--overwrite"]  # fmt: skip
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert main(argv) == 0
    assert "load average" not in capsys.readouterr().out  # a quiet machine: nothing said
    monkeypatch.setattr(os, "getloadavg", lambda: (99.0, 99.0, 99.0))
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "note: load average 99.0" in printed and "other work shares this machine" in printed
    result = json.loads(out.read_text())
    assert any("load average 99.0" in n for n in result["notices"])
    header = next(line for line in printed.splitlines() if "median ms" in line)
    assert header.index("median ms") < header.index("spread") < header.index("p10 ms")  # beside each median
    for r in result["runs"]:
        spread = (r["latency_ms_p90"] - r["latency_ms_p10"]) / r["latency_ms_median"]
        assert r["spread"] == pytest.approx(spread) and f"| {100 * spread:.0f}%" in printed


def test_bench_of_a_run_without_2to4_times_what_it_made(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", *TINY, "--epochs", "0", "--finetune-epochs", "0", "--metric", "l1", "--nm-where", "none",
                 "--out", str(out)]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["bench", str(out), "--device", "cpu", "--batch-sizes", "2", "--rounds", "1", "--calls", "1",
                 "--no-progress"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "| dense " in printed and "| filter " in printed and "| hybrid " not in printed and "| nm " not in printed


def test_a_checkpoint_records_its_dataset_and_evaluate_and_prune_default_to_it(tmp_path, capsys):
    import numpy as np

    from hybridprune.models.sources import build_model
    from hybridprune.pruning.checkpoint import save_checkpoint

    data = tmp_path / "rgb16.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8), y=np.arange(40) % 4)
    spec, ckpt = f"npz:{data}", tmp_path / "dense.safetensors"
    small = ["--epochs", "0", "--width", "0.125", "--no-progress"]
    assert main(["train", "--dataset", spec, *small, "--out", str(ckpt)]) == 0
    meta = load_checkpoint(ckpt)[2]
    assert meta["dataset"] == spec  # its spec string: no file contents in the header
    capsys.readouterr()
    assert main(["evaluate", str(ckpt)]) == 0
    printed = capsys.readouterr().out
    assert f"dataset: {spec}, which {ckpt} was trained on" in printed and f"dataset: {spec}\n" in printed
    accuracy = next(line for line in printed.splitlines() if line.startswith("accuracy: "))
    assert re.fullmatch(r"accuracy: \d+\.\d\d%", accuracy)  # rounded, with its unit
    assert main(["evaluate", str(ckpt), "--dataset", "digits"]) == 2  # another dataset: the line says which
    err = capsys.readouterr().err.strip()
    assert f"pass --dataset {spec}" in err and len(err.splitlines()) == 1
    out = tmp_path / "pruned"
    prune = ["prune", str(ckpt), "--metric", "l1", "--finetune-epochs", "0", "--round-to", "4", "--calib-batches", "1",
             "--bn-recalib-batches", "1", "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(prune) == 0
    assert f"dataset: {spec}, which" in capsys.readouterr().out
    assert load_checkpoint(out / "l1-hybrid.safetensors")[2]["dataset"] == spec  # every stage records it
    old = save_checkpoint(tmp_path / "old.safetensors", build_model("alexnet", in_channels=1, width=0.125))
    assert main(["evaluate", str(old), "--test-size", "16"]) == 0  # written before the field: digits, as before
    printed = capsys.readouterr().out
    assert "dataset: digits" in printed and "trained on" not in printed


def test_the_same_thing_has_the_same_flag_on_every_command():
    parser = build_parser()
    old = parser.parse_args(["bench", "--synthetic", "--batch-sizes", "1,8"])
    new = parser.parse_args(["bench", "--synthetic", "--batch-size", "1,8"])
    assert old.batch_sizes == new.batch_sizes == "1,8"  # bench takes convert's --batch-size; the old name stays
    assert parser.parse_args(["convert", "m.safetensors", "--batch-size", "8"]).batch_size == 8
    for command in (["run"], ["train"], ["prune", "c"], ["evaluate", "c"], ["profile", "--out", "t.json"]):
        assert hasattr(parser.parse_args([*command, "--dataset", "cifar10"]), "dataset"), command


def test_profile_shapes_the_model_for_a_dataset_as_run_does(tmp_path, capsys):
    from hybridprune.cli.profile import profile_model

    args = build_parser().parse_args(["profile", "--model", "resnet20", "--dataset", "digits", "--out", "t.json"])
    assert profile_model(args).input_shape == (1, 32, 32)  # digits: one channel, as `run --dataset digits` builds it
    args = build_parser().parse_args(["profile", "--model", "resnet20", "--out", "t.json"])
    assert profile_model(args).input_shape == (3, 32, 32)  # no dataset: the old default shape
    both = ["profile", "--model", "resnet20", "--dataset", "digits", "--channels", "3", "--out", str(tmp_path / "t")]
    assert main(both) == 2
    assert "--dataset decides the input shape" in capsys.readouterr().err
