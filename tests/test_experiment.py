import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from hybridprune.errors import HybridPruneError
from hybridprune.experiments import grid as grid_module
from hybridprune.experiments.grid import grid_from_dict, load_grid, run_grid
from hybridprune.experiments.report import write_grid_report
from hybridprune.experiments.statistics import cheapest_at_accuracy, iso_accuracy, paired_differences
from hybridprune.experiments.store import STORE_VERSION, TABLES, Store, baseline_key, column_names, run_key
from hybridprune.experiments.tables import accuracy_table

EXPERIMENTS = Path(__file__).parent.parent / "experiments"
FAST = {
    "datasets": [{"dataset": "digits", "train_size": 96, "test_size": 48}],
    "models": [{"name": "alexnet", "width": 0.125}],
    "metrics": ["l1", "hybrid"],
    "ratios": [0.25, 0.5],
    "seeds": [0],
    "train": {"epochs": 1, "batch_size": 32},
    "finetune": {"epochs": 1, "batch_size": 32},
    "prune": {"round_to": 4, "calib_batches": 1, "bn_recalib_batches": 1, "calib_batch_size": 32},
}


def test_interrupted_grid_resumes_with_one_row_per_run(tmp_path, monkeypatch):
    grid = grid_from_dict(FAST, "fast")
    store = Store(tmp_path / "s.sqlite")
    real, calls = grid_module.execute_run, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # 2 runs done (after the baseline phase), then Ctrl-C during the third run
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(grid_module, "execute_run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_grid(grid, store, progress=False, log=lambda _: None)
    first = {r["key"]: r for r in store.rows()}
    assert len(first) == 2
    monkeypatch.setattr(grid_module, "execute_run", real)
    counts = run_grid(grid, store, progress=False, log=lambda _: None)
    assert counts == {"done": 2, "skipped": 2, "failed": 0}
    rows = store.rows()
    assert len(rows) == 4 and len({r["key"] for r in rows}) == 4
    assert {r["key"] for r in rows} == {run_key(c) for c in grid.runs()}
    for key, row in first.items():  # finished runs were neither redone nor changed
        assert next(r for r in rows if r["key"] == key) == row
    assert len(list(store.artifacts.glob("baseline-*"))) == 1  # one dense baseline, reused by every run
    assert run_grid(grid, store, progress=False, log=lambda _: None)["done"] == 0


def test_the_baseline_phase_trains_baselines_only_so_every_run_is_timed_on_its_own(tmp_path, monkeypatch):
    grid = grid_from_dict(FAST, "timed")
    store = Store(tmp_path / "t.sqlite")
    pruned = []
    real = grid_module.execute_run
    monkeypatch.setattr(grid_module, "execute_run", lambda *a, **k: pruned.append(1) or real(*a, **k))
    run_grid(grid, store, progress=False, log=lambda _: None)
    assert len(pruned) == len(grid.runs())
    rows = store.rows()
    assert all(r["wall_time_s"] > 0.05 for r in rows), [r["wall_time_s"] for r in rows]
    assert all(json.loads(r["result"])["filter"]["checkpoint"] for r in rows)


def test_two_worker_processes_fill_the_same_store(tmp_path):
    grid = grid_from_dict({**FAST, "metrics": ["random"]}, "par")
    store = Store(tmp_path / "p.sqlite")
    assert run_grid(grid, store, workers=2, progress=False, log=lambda _: None)["done"] == 2
    rows = store.rows()
    assert sorted(r["ratio"] for r in rows) == [0.25, 0.5]
    assert all(0 <= r["hybrid_accuracy"] <= 100 and r["effective_macs"] < r["macs"] for r in rows)


def test_ray_backend_with_a_local_instance(tmp_path):
    ray = pytest.importorskip("ray")
    grid = grid_from_dict({**FAST, "metrics": ["l1"], "ratios": [0.5]}, "ray")
    store = Store(tmp_path / "r.sqlite")
    try:
        assert run_grid(grid, store, workers=1, backend="ray", progress=False, log=lambda _: None)["done"] == 1
    finally:
        ray.shutdown()
    assert len(store.rows()) == 1


def _row(metric, ratio, seed, acc, dataset="cifar10", recipe="plain"):
    return {c: None for c in column_names("runs")} | {
        "key": f"{dataset}-{metric}-{recipe}-{ratio}-{seed}",
        "recipe": recipe,
        "experiment": "fixture",
        "dataset": dataset,
        "model": "alexnet",
        "width": 0.5,
        "metric": metric,
        "ratio": ratio,
        "seed": seed,
        "hybrid_accuracy": acc,
        "hybrid_oneshot": acc - 10,
        "filter_oneshot": acc - 5,
        "filter_accuracy": acc + 1,
        "finished_at": "now",
        "dense_accuracy": 85.0 + seed,
        "config": "{}",
        "result": "{}",
    }


@pytest.fixture
def fixture_store(tmp_path):
    store = Store(tmp_path / "f.sqlite")
    for seed, (l1, hybrid, out_l1) in enumerate([(80.0, 81.0, 79.0), (82.0, 84.0, 80.0), (81.0, 84.0, 81.5)]):
        store.add(_row("l1", 0.4, seed, l1))
        store.add(_row("hybrid", 0.4, seed, hybrid))
        store.add(_row("output_l1", 0.4, seed, out_l1))
    return store


def test_report_tables_match_hand_computed_means_and_paired_test(fixture_store):
    rows = fixture_store.rows()
    headers, body = accuracy_table(rows, "hybrid_accuracy")
    assert headers[-1] == "ratio 0.4"
    cells = {r[2]: r[-1] for r in body}
    assert cells["l1"] == "81.00 ± 1.00 (3)"  # mean of 80, 82, 81; sample std 1
    assert cells["hybrid"] == "83.00 ± 1.73 (3)"  # 81, 84, 84
    (diff,) = paired_differences(rows, "hybrid_accuracy", "hybrid", "l1")
    d = np.array([1.0, 2.0, 3.0])  # hybrid - l1 per seed
    t = d.mean() / (d.std(ddof=1) / np.sqrt(3))
    assert diff["mean_diff"] == pytest.approx(2.0) and diff["std_diff"] == pytest.approx(1.0)
    assert diff["p_value"] == pytest.approx(2 * stats.t.sf(abs(t), df=2))


def test_report_writes_markdown_csv_and_valid_pngs(fixture_store, tmp_path):
    written = write_grid_report(fixture_store.rows(), tmp_path / "report")
    names = {p.name for p in written}
    assert {"report.md", "accuracy-hybrid_accuracy.csv", "accuracy-cifar10-alexnet-w0.5.png"} <= names
    for p in written:
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            with Image.open(p) as img:
                assert img.size[0] > 100 and img.size[1] > 100
    text = (tmp_path / "report" / "report.md").read_text()
    assert "hybrid - l1" in text and "+2.00 ± 1.00" in text
    assert "86.00 ± 1.00 (3)" in text  # dense baselines 85, 86, 87


def _bench_file(path, variants, run_folder="run-cifar10-hybrid-plain-0.4-0"):
    """A bench result of the variants (name, ms, accuracy), its checkpoints in `run_folder` (a stored run's)."""
    run = {"mode": "eager", "dtype": "float16", "batch_size": 64, "device": "cuda (H200)"}
    runs = [
        {**run, "variant": v, "throughput": 6400 / ms, "latency_ms_median": ms, "accuracy": a} for v, ms, a in variants
    ]
    sources = {v: {"source": f"/runs/x.sqlite.artifacts/{run_folder}/{v}.safetensors"} for v, _, _ in variants}
    path.write_text(json.dumps({"runs": runs, "variants": sources}))
    return str(path)


def _with_checkpoints(rows):
    """The rows, each naming the checkpoints of its four models in its own run folder, as the runner writes them."""
    for r in rows:
        folder = f"/runs/x.sqlite.artifacts/run-{r['key']}"
        r["result"] = json.dumps({v: {"checkpoint": f"{folder}/{v}.safetensors"} for v in ("dense", "filter", "nm",
                                                                                              "hybrid")})
    return rows


def test_bench_results_give_a_pareto_plot_and_latency_at_equal_accuracy(fixture_store, tmp_path):
    ratio_a = _bench_file(
        tmp_path / "bench.json", [("dense", 10, 85), ("filter", 6, 83), ("nm", 9, 84), ("hybrid", 5, 82)]
    )
    ratio_b = _bench_file(tmp_path / "b.json", [("dense", 10, 85), ("filter", 4, 80), ("hybrid", 3, 79)])
    written = write_grid_report(_with_checkpoints(fixture_store.rows()), tmp_path / "r", [ratio_a, ratio_b])
    assert any(p.name == "pareto-bench.png" and p.stat().st_size > 1000 for p in written)
    # hybrid at 82%: the filter-only curve (80%, 4 ms), (83%, 6 ms) gives 5.333 ms at 82%, 1.07x the hybrid's 5 ms;
    # hybrid at 79% lies below every filter-only model: no number
    rows = {line.split("|")[6].strip(): line for line in (tmp_path / "r" / "report.md").read_text().splitlines()
            if "| cuda (H200)" in line}  # fmt: skip
    assert "| 5.333 " in rows["82.00"] and "| 1.07x " in rows["82.00"] and "| 1.80x" in rows["82.00"]  # 9 ms / 5 ms
    assert "| - " in rows["79.00"]


@pytest.mark.parametrize(
    "text,message",
    [
        ("datasets: [digits]\nepochs: 3\n", "unknown key epochs"),
        ("ratios: [0.4, 1.2]\n", "ratio 1.2 is outside"),
        ("metrics: [l1, l7]\n", "unknown metric 'l7'"),
        ("train: {epochs: 1, lr_max: 2}\n", "unknown TrainConfig key(s) lr_max"),
        ("prune: {filter_ratio: 0.3}\n", "set by the grid axes"),
        ("datasets: [[unclosed\n", "not valid YAML"),
    ],
)
def test_bad_configs_name_the_key_or_value(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(HybridPruneError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_grid(path)


def test_a_store_of_another_version_is_refused_and_untouched(tmp_path):
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
        db.execute("INSERT INTO meta VALUES ('version', '0')")
    before = path.read_bytes()
    with pytest.raises(HybridPruneError, match="store version 0"):
        Store(path)
    assert path.read_bytes() == before
    not_sqlite = tmp_path / "x.sqlite"
    not_sqlite.write_text("hello")
    with pytest.raises(HybridPruneError, match="not a hybridprune store"):
        Store(not_sqlite)
    assert not_sqlite.read_text() == "hello"


def test_shipped_configs_parse():
    for name in ("tiny", "paper", "paper-cpu", "paper-cpu-extra"):
        assert load_grid(EXPERIMENTS / f"{name}.yaml").runs()
    paper = load_grid(EXPERIMENTS / "paper.yaml")
    assert {d.dataset for d in paper.datasets} == {"mnist", "svhn", "cifar10"}
    assert set(paper.metrics) >= {"l1", "output_l1", "hybrid", "hybrid_output", "random"}
    assert len(paper.seeds) == 3 and min(paper.ratios) == 0.1 and max(paper.ratios) == 0.7


def test_a_killed_grid_leaves_a_sound_store_and_resumes(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    import yaml

    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump({**FAST, "name": "killed"}))
    store_path = tmp_path / "k.sqlite"
    cmd = [
        sys.executable,
        "-m",
        "hybridprune",
        "experiment",
        str(config),
        "--store",
        str(store_path),
        "--no-progress",
        "--device",
        "cpu",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if store_path.exists() and Store(store_path).rows():
            break
        time.sleep(0.2)
    killed_while_running = proc.poll() is None
    proc.send_signal(signal.SIGKILL)  # no chance to clean up: the worst case
    proc.wait()
    with sqlite3.connect(store_path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finished = {r["key"]: r for r in Store(store_path).rows()}
    assert len(finished) >= 1
    if killed_while_running:
        assert len(finished) < 4
    assert subprocess.run(cmd, capture_output=True, timeout=300).returncode == 0
    rows = Store(store_path).rows()
    assert len(rows) == 4 and len({r["key"] for r in rows}) == 4
    for row in rows:
        if row["key"] in finished:
            assert row == finished[row["key"]]


def test_a_grid_over_a_residual_and_a_users_network(tmp_path):
    grid = grid_from_dict(
        {
            **FAST,
            "models": [{"name": "resnet20", "width": 0.5}, {"name": "zoo:depthwise_net"}],
            "datasets": [{"dataset": "digits", "train_size": 64, "test_size": 32}],
            "metrics": ["hybrid"],
            "ratios": [0.5],
        },
        "models",
    )
    store = Store(tmp_path / "m.sqlite")
    assert run_grid(grid, store, progress=False, log=lambda _: None) == {"done": 2, "skipped": 0, "failed": 0}
    rows = {r["model"]: r for r in store.rows()}
    assert set(rows) == {"resnet20", "zoo:depthwise_net"}
    assert rows["resnet20"]["width"] == 0.5 and rows["zoo:depthwise_net"]["width"] == 1.0
    for row in rows.values():
        groups = json.loads(row["result"])["plan"]["groups"]
        assert groups and all(len(g["keep"]) < g["original"] for g in groups if g["original"] >= 8)


def test_iso_accuracy_takes_the_cheapest_filter_only_model_of_the_same_accuracy():
    # accuracy 85 is met twice on a non-monotone curve: between 100M and 60M, and between 40M and 20M
    curve = [(90.0, 100.0), (80.0, 60.0), (86.0, 40.0), (84.0, 20.0)]
    assert cheapest_at_accuracy(curve, 85.0) == pytest.approx(30.0)
    assert cheapest_at_accuracy(curve, 95.0) is None
    rows = [
        {"dataset": "d", "model": "m", "width": 1.0, "metric": "hybrid", "ratio": ratio, "filter_accuracy": fa,
         "hybrid_accuracy": ha, "macs": hm, "effective_macs": hm / 2, "result": json.dumps({"filter": {"macs": fm}})}
        for ratio, fa, fm, ha, hm in [(0.2, 90.0, 100.0, 89.0, 100.0), (0.6, 80.0, 50.0, 85.0, 50.0)]
    ]  # fmt: skip
    first, second = iso_accuracy(rows)
    assert first["filter_macs_same_accuracy"] == pytest.approx(95.0) and first["macs_ratio"] == pytest.approx(0.95)
    assert second["filter_macs_same_accuracy"] == pytest.approx(75.0)  # 85% costs a filter-only model 75 MACs ...
    assert second["effective_macs_ratio"] == pytest.approx(3.0)  # ... 3x the hybrid model's 25 effective MACs


def test_recipes_are_an_axis_whose_runs_share_the_dense_baseline(tmp_path):
    grid = grid_from_dict(
        {
            **FAST,
            "metrics": ["l1"],
            "ratios": [0.5],
            "recipes": {"plain": {}, "kd": {"finetune": {"distill_weight": 0.5}}},
        }
    )
    plain, kd = grid.runs()
    assert (plain.recipe, kd.recipe) == ("plain", "kd")
    assert (plain.finetune.distill_weight, kd.finetune.distill_weight) == (0.0, 0.5)
    assert kd.finetune.epochs == plain.finetune.epochs and kd.prune == plain.prune
    assert baseline_key(plain) == baseline_key(kd) and run_key(plain) != run_key(kd)
    named = grid_from_dict({**FAST, "recipes": ["plain", "steps2"]}).runs()
    assert {(c.recipe, c.prune.steps) for c in named} == {("plain", 1), ("steps2", 2)}
    bare = grid_from_dict({**FAST, "recipes": {"steps2": None, "mine": {"prune": {"steps": 3}}}}).runs()
    assert {(c.recipe, c.prune.steps) for c in bare} == {("steps2", 2), ("mine", 3)}  # a bare name: its settings
    store = Store(tmp_path / "r.sqlite")
    assert run_grid(grid, store, progress=False, log=lambda _: None)["done"] == 2
    rows = store.rows()
    assert sorted(r["recipe"] for r in rows) == ["kd", "plain"]
    assert len({r["dense_accuracy"] for r in rows}) == 1  # one baseline, trained once
    [nm] = store.nm_only_rows()  # and its 2:4-only model, with plain fine-tuning
    assert nm["dense_accuracy"] == rows[0]["dense_accuracy"] and nm["effective_macs"] < nm["macs"]
    assert json.loads(nm["config"])["finetune"]["distill_weight"] == 0.0
    written = write_grid_report(rows, tmp_path / "report", nm_rows=store.nm_only_rows())
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| l1+kd " in report and "Recovery recipes against plain" in report and "2:4-only, fine-tuned" in report
    assert any(p.name.startswith("frontier-digits-alexnet") for p in written)
    assert run_grid(grid, store, progress=False, log=lambda _: None) == {"done": 0, "skipped": 2, "failed": 0}


V1_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    key TEXT PRIMARY KEY, experiment TEXT NOT NULL, dataset TEXT NOT NULL, model TEXT NOT NULL,
    width REAL NOT NULL, metric TEXT NOT NULL, ratio REAL NOT NULL, seed INTEGER NOT NULL,
    dense_accuracy REAL, filter_oneshot_raw REAL, filter_oneshot REAL, filter_accuracy REAL,
    hybrid_oneshot_raw REAL, hybrid_oneshot REAL, hybrid_accuracy REAL,
    params INTEGER, nonzero_params INTEGER, macs INTEGER, effective_macs INTEGER,
    wall_time_s REAL, finished_at TEXT NOT NULL, config TEXT NOT NULL, result TEXT NOT NULL
);
"""  # as version 1 wrote it: no recipe column, no nm_only table


def test_a_version_1_store_is_upgraded_in_place_its_runs_plain(tmp_path):
    path = tmp_path / "old.sqlite"
    old_columns = [c for c in column_names("runs") if c != "recipe"]
    row = _row("l1", 0.4, 0, 80.0)
    with sqlite3.connect(path) as db:
        db.executescript(V1_SCHEMA)
        db.execute("INSERT INTO meta VALUES ('version', '1')")
        db.execute(f"INSERT INTO runs ({', '.join(old_columns)}) VALUES ({', '.join('?' * len(old_columns))})",
                   [row[c] for c in old_columns])  # fmt: skip
    [upgraded] = Store(path, create=False).rows()
    assert upgraded["recipe"] == "plain" and upgraded["hybrid_accuracy"] == 80.0
    assert Store(path, create=False).nm_only_rows() == []
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()[0] == str(STORE_VERSION)


def test_a_new_store_has_exactly_the_declared_columns_and_refuses_other_rows(tmp_path):
    store = Store(tmp_path / "new.sqlite")
    with sqlite3.connect(store.path) as db:
        for table, columns in TABLES.items():
            assert [(r[1], r[2]) for r in db.execute(f"PRAGMA table_info({table})")] == [
                (name, kind.split()[0]) for name, kind in columns
            ]
    row = _row("l1", 0.4, 0, 80.0)
    with pytest.raises(ValueError, match="recipe"):
        store.add({k: v for k, v in row.items() if k != "recipe"})
    with pytest.raises(ValueError, match="extra"):
        store.add({**row, "extra": 1})
    assert store.rows() == []


def test_report_refuses_a_bench_of_models_the_store_did_not_write(fixture_store, tmp_path):
    rows = _with_checkpoints(fixture_store.rows())
    ours = _bench_file(tmp_path / "ours.json", [("dense", 10, 85), ("hybrid", 5, 82)])
    other = _bench_file(tmp_path / "other.json", [("dense", 10, 85), ("hybrid", 5, 82)], run_folder="r1")
    unnamed = tmp_path / "unnamed.json"
    unnamed.write_text(json.dumps({"runs": json.loads(Path(ours).read_text())["runs"]}))
    for bad, why in ((other, "its dense model /runs/x.sqlite.artifacts/r1/dense.safetensors is no checkpoint"),
                     (str(unnamed), "it names no checkpoints")):  # fmt: skip
        with pytest.raises(HybridPruneError, match="is not a bench of this store's runs") as e:
            write_grid_report(rows, tmp_path / "r", [ours, bad])
        assert why in str(e.value) and len(str(e.value).splitlines()) == 1
        assert not (tmp_path / "r").exists()  # refused before anything is written


def test_plot_labels_fit_in_the_saved_image(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hybridprune.experiments.plots import save_figure

    fig, ax = plt.subplots(figsize=(4, 3))
    label = ax.set_xlabel("a long axis label that a 4-inch figure cannot hold in its width, ending in measurement")
    fig.canvas.draw()
    width = label.get_window_extent().width * 110 / fig.dpi  # the label's pixels at the saved resolution
    path = save_figure(fig, plt, tmp_path / "p.png")
    with Image.open(path) as img:
        assert img.size[0] >= width  # the whole label is in the image, not cut at the figure's edge
