"""Latency tables, prediction and latency-target allocation: tables written by the tests themselves, on the zoo."""

import itertools
import json
import math
import random

import pytest
import torch

from conftest import make_model
from hybridprune.cli import main
from hybridprune.config import NM_PAYS_MARGIN
from hybridprune.deploy import profile as profile_module
from hybridprune.deploy.profile import ProfileSettings, candidate_counts, layer_grid, new_table, profile_model
from hybridprune.deploy.runtimes import device_name
from hybridprune.errors import HybridPruneError
from hybridprune.pruning.budget import Budget, importance_values, predict, solve, solve_uniform
from hybridprune.pruning.graph import channel_groups, dependency_graph, example_input
from hybridprune.pruning.latency import (
    Entry,
    LatencyTable,
    LayerCoupling,
    LayerShape,
    Setup,
    layer_couplings,
    load_table,
    predict_latency,
    table_from_dict,
)
from hybridprune.pruning.nm import eligible_layers

SETUP = Setup("torch", 2, "float32")
ZOO = ["zoo:plain_net", "zoo:residual_net", "zoo:concat_net", "zoo:depthwise_net", "alexnet", "resnet20"]


def structure(name: str):
    model = make_model(name)
    groups = channel_groups(model, dependency_graph(model))
    return model, groups, layer_couplings(model, groups, example_input(model))


def synthetic_table(couplings, groups, step, dense_ms, sparse_ms=None) -> LatencyTable:
    """A table holding every grid entry of the model, with times from the given functions of (coupling, shape)."""
    by_name = {g.name: g for g in groups}
    table = LatencyTable("test-device")
    for c in couplings:
        for shape in layer_grid(c, by_name, step, max_points=64):
            t = dense_ms(c, shape)
            table.add(shape.key(SETUP.batch, SETUP.dtype, SETUP.runtime, "dense"), Entry(t, t, t, 1))
            if sparse_ms is not None:
                s = sparse_ms(c, shape)
                table.add(shape.key(SETUP.batch, SETUP.dtype, SETUP.runtime, "2:4"), Entry(s, s, s, 1))
    return table


def macs(shape: LayerShape) -> float:
    return shape.c_in * shape.c_out * shape.kernel[0] * shape.kernel[1] / max(1, shape.groups) * shape.h * shape.w / 1e6


@pytest.mark.parametrize("name", ZOO)
def test_auto_masks_exactly_the_layers_where_the_table_says_2to4_pays(name):
    model, groups, couplings = structure(name)
    eligible = frozenset(eligible_layers(model))
    wide = max(c.dense.c_in for c in couplings if c.name in eligible)  # "large" layers: the widest inputs
    table = synthetic_table(couplings, groups, 4, lambda c, s: 1 + macs(s),
                            lambda c, s: (1 + macs(s)) * (0.6 if s.c_in >= wide else 1.2))  # fmt: skip
    sparse = predict(couplings, {}, Budget(table, SETUP, 0.0, math.inf, "auto", eligible))[1]
    assert sparse == {c.name for c in couplings if c.name in eligible and c.dense.c_in >= wide}
    assert sparse  # the test means something: at least one layer pays
    # a 2:4 entry that is faster, but by less than the margin, does not pay
    table = synthetic_table(couplings, groups, 4, lambda c, s: 1.0, lambda c, s: 1 - NM_PAYS_MARGIN / 2)
    assert predict(couplings, {}, Budget(table, SETUP, 0.0, math.inf, "auto", eligible))[1] == frozenset()
    # all: every eligible layer; none: no layer
    assert predict(couplings, {}, Budget(table, SETUP, 0.0, math.inf, "all", eligible))[1] == eligible
    assert predict(couplings, {}, Budget(table, SETUP, 0.0, math.inf, "none", eligible))[1] == frozenset()


@pytest.mark.parametrize("name", ["zoo:plain_net", "zoo:residual_net", "alexnet"])
def test_a_group_whose_latency_does_not_fall_with_its_channels_is_not_pruned(name):
    model, groups, couplings = structure(name)
    flat = max(groups, key=lambda g: g.size).name  # this group's channels cost nothing: only a constant

    def time(c: LayerCoupling, s: LayerShape) -> float:
        touches = c.out_group == flat or any(g == flat for g, _, _ in c.in_parts)
        return 1.0 if touches else 1.0 + macs(s)

    table = synthetic_table(couplings, groups, 4, time)
    scores = {g.name: torch.ones(g.size) for g in groups}  # every channel equally important
    candidates = {g.name: candidate_counts(g.size, 4) for g in groups}
    dense = predict(couplings, {}, Budget(table, SETUP, 0.0, math.inf))[0]
    floor = predict(couplings, {g: min(v) for g, v in candidates.items()}, Budget(table, SETUP, 0.0, math.inf))[0]
    budget = Budget(table, SETUP, 0.0, (dense + floor) / 2)
    answer = solve(couplings, importance_values(groups, scores, candidates), budget)
    assert answer.counts[flat] == next(g.size for g in groups if g.name == flat)
    assert any(answer.counts[g.name] < g.size for g in groups if g.name != flat)
    assert answer.predicted_ms <= budget.budget_ms


def brute_force(couplings, values, budget):
    best = None
    groups = sorted(values)
    for combo in itertools.product(*(sorted(values[g]) for g in groups)):
        counts = dict(zip(groups, combo, strict=True))
        time = predict(couplings, counts, budget)[0]
        value = sum(values[g][k] for g, k in counts.items())
        if time <= budget.budget_ms and (best is None or value > best[0] + 1e-12):
            best = (value, counts)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_the_allocation_equals_a_brute_force_search_on_small_instances(seed):
    """Three coupled groups (a chain a -> b -> c and a layer reading both a and c, as a concatenation does),
    random latencies with plateaus, random values: the solver's optimum is the exhaustive one."""
    rng = random.Random(seed)
    sizes = {"a": 12, "b": 8, "c": 12}
    couplings = [
        LayerCoupling("l1", LayerShape("conv", 4, 12, 4, 4), "a", 12, ()),
        LayerCoupling("l2", LayerShape("conv", 12, 8, 4, 4), "b", 8, (("a", 12, 12),)),
        LayerCoupling("l3", LayerShape("conv", 8, 12, 4, 4), "c", 12, (("b", 8, 8),)),
        LayerCoupling("l4", LayerShape("linear", 24, 10), None, 10, (("a", 12, 12), ("c", 12, 12))),
    ]
    candidates = {g: candidate_counts(n, 4) for g, n in sizes.items()}
    table = LatencyTable("test-device")
    for c in couplings:
        groups = ([c.out_group] if c.out_group else []) + [g for g, _, _ in c.in_parts]
        for combo in itertools.product(*(candidates[g] for g in groups)):
            shape = c.shape(dict(zip(groups, combo, strict=True)))
            t = round(rng.uniform(0.2, 1.0) * shape.c_in * shape.c_out / 16) / 4  # steps: many equal times
            table.add(shape.key(2, "float32", "torch", "dense"), Entry(t, t, t, 1))
    values = {g: {k: rng.uniform(0, 1) * k for k in candidates[g]} for g in sizes}
    for g in values:  # value grows with the channels kept
        running = 0.0
        for k in sorted(values[g]):
            running = values[g][k] = max(running, values[g][k])
    dense = predict(couplings, {}, Budget(table, SETUP, 0.5, math.inf))[0]
    for fraction in (0.4, 0.6, 0.8):
        budget = Budget(table, SETUP, 0.5, fraction * dense)
        try:
            answer = solve(couplings, values, budget)
        except HybridPruneError:
            assert brute_force(couplings, values, budget) is None
            continue
        best_value, _ = brute_force(couplings, values, budget)
        assert answer.exact and answer.predicted_ms <= budget.budget_ms
        assert answer.value == pytest.approx(best_value)


@pytest.mark.parametrize("name", ["resnet20", "alexnet", "zoo:concat_net"])
def test_uniform_allocation_keeps_one_fraction_of_every_group_the_largest_that_fits(name):
    """Uniform under a latency target: every group keeps the candidate nearest one fraction of its size, and a
    slightly larger fraction (the next count vector up) would not fit the budget."""
    model, groups, couplings = structure(name)
    table = synthetic_table(couplings, groups, 4, lambda c, s: 0.1 + macs(s))
    candidates = {g.name: candidate_counts(g.size, 4) for g in groups}
    dense = predict(couplings, {}, Budget(table, SETUP, 0.0, math.inf))[0]
    budget = Budget(table, SETUP, 0.0, 0.5 * dense)
    answer = solve_uniform(couplings, candidates, budget)
    assert answer.predicted_ms <= budget.budget_ms < dense
    f = answer.value

    def nearest(fraction: float) -> dict[str, int]:
        return {g: min(ks, key=lambda k: (abs(k - fraction * max(ks)), -k)) for g, ks in candidates.items()}

    assert answer.counts == nearest(f)
    steps = (f + i / 10_000 for i in range(1, 10_001) if f + i / 10_000 <= 1)
    larger = next(nearest(x) for x in steps if nearest(x) != answer.counts)
    assert predict(couplings, larger, budget)[0] > budget.budget_ms
    shares = [answer.counts[g.name] / g.size for g in groups if g.size >= 16]
    assert max(shares) - min(shares) <= 4 / 16 + 1e-9  # one fraction, up to the rounding to the step


def test_the_greedy_solver_meets_the_budget_where_enumeration_is_too_large(monkeypatch):
    from hybridprune.pruning import budget as budget_module

    model, groups, couplings = structure("resnet20")
    table = synthetic_table(couplings, groups, 4, lambda c, s: 0.1 + macs(s))
    scores = {g.name: torch.rand(g.size, generator=torch.Generator().manual_seed(1)) for g in groups}
    values = importance_values(groups, scores, {g.name: candidate_counts(g.size, 4) for g in groups})
    dense = predict(couplings, {}, Budget(table, SETUP, 0.0, math.inf))[0]
    monkeypatch.setattr(budget_module, "EXACT_LIMIT", 0)
    answer = solve(couplings, values, Budget(table, SETUP, 0.0, 0.5 * dense))
    assert not answer.exact and answer.predicted_ms <= 0.5 * dense
    assert answer.predicted_ms >= 0.4 * dense  # the slack is spent, not wasted


@pytest.mark.parametrize("name", ZOO)
def test_the_predicted_latency_is_the_rest_plus_the_sum_of_the_entries(name):
    model, groups, couplings = structure(name)
    table = synthetic_table(couplings, groups, 4, lambda c, s: 0.5 + macs(s))
    counts = {g.name: candidate_counts(g.size, 4)[len(candidate_counts(g.size, 4)) // 2] for g in groups}
    total, per_layer = predict_latency(couplings, counts, table, SETUP, rest_ms=1.25)
    by_hand = {c.name: 0.5 + macs(c.shape(counts)) for c in couplings}
    assert per_layer == pytest.approx(by_hand)
    assert total == pytest.approx(1.25 + sum(by_hand.values()))
    assert set(per_layer) == {n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}


@pytest.mark.parametrize("name", ["zoo:plain_net", "zoo:residual_net", "zoo:depthwise_net"])
def test_profiling_covers_every_group_at_every_candidate_count_and_a_second_profile_reuses_it(
    name, tmp_path, monkeypatch, one_torch_thread
):
    model, groups, couplings = structure(name)
    settings = ProfileSettings(SETUP, step=8, max_points=64, rounds=2, threads=1)
    table = new_table(torch.device("cpu"))
    rest, whole = profile_model(model, groups, couplings, table, settings, torch.device("cpu"), set(), False)
    by_name = {g.name: g for g in groups}
    for c in couplings:
        coupled = ([c.out_group] if c.out_group else []) + [g for g, _, _ in c.in_parts if g != c.out_group]
        for combo in itertools.product(*(candidate_counts(by_name[g].size, 8) for g in coupled)):
            shape = c.shape(dict(zip(coupled, combo, strict=True)))
            assert shape.key(2, "float32", "torch", "dense") in table.entries, (c.name, combo)
    assert all(e.median_ms > 0 and e.p10_ms <= e.median_ms <= e.p90_ms for e in table.entries.values())
    assert whole.median_ms == pytest.approx(rest.median_ms + sum(
        table.entries[c.dense.key(2, "float32", "torch", "dense")].median_ms for c in couplings))  # fmt: skip
    path = table.save(tmp_path / "table.json")
    again = load_table(path, table.device)
    assert again.entries == table.entries and again.rest == table.rest and again.device == table.device
    measured = []
    monkeypatch.setattr(profile_module, "_layer_call", lambda *a: measured.append(a) or (lambda: None))
    profile_model(model, groups, couplings, again, settings, torch.device("cpu"), set(), False)
    assert measured == []  # every entry came from the saved table


@pytest.fixture
def deterministic_times(monkeypatch):
    """Layer and model latencies from their shapes instead of a clock, so the plumbing of latency-target runs is
    tested without timing noise (a shared CI machine): a layer costs 0.01 ms + 1e-6 ms per MAC of the batch; a
    model, in context, `synthetic_ms` (a sum of units with counts padded to blocks of 8)."""
    from hybridprune.deploy import latency_target

    def cost(shape: LayerShape, batch: int) -> float:
        return 0.01 + 1e-6 * batch * macs(shape) * 1e6

    def layer_call(shape, kernel, settings, device):
        ms = cost(shape, settings.setup.batch)
        return lambda: ms

    def timed(calls, settings, device, rounds=None):
        return [[call()] * 3 for call in calls]

    def deployed(model, sparse, settings, device):
        total = synthetic_ms(model, settings.setup.batch)
        return Entry(total, total, total, 3)

    monkeypatch.setattr(profile_module, "_layer_call", layer_call)
    monkeypatch.setattr(profile_module, "_timed", timed)
    monkeypatch.setattr(profile_module, "measure_deployed", deployed)
    monkeypatch.setattr(latency_target, "measure_deployed", deployed)
    patch_context_timing(monkeypatch, synthetic_ms)


def patch_context_timing(monkeypatch, model_ms, block: int = 8, real_copies: bool = False):
    """In-context profiling without a clock: a model takes `model_ms(model, batch)`, the step sweep's graph 1 ms
    per started block of `block` channels; unless `real_copies`, a pruned variant is not built but timed from its
    layers' shapes at its counts (the same sum as `synthetic_ms`, which the pruned layers' shapes match)."""
    from hybridprune.deploy import profile_context

    couplings_of: dict[int, list] = {}

    def fake_copy(model, groups, counts):
        if id(model) not in couplings_of:
            couplings_of[id(model)] = layer_couplings(model, groups, example_input(model))
        return ("variant", couplings_of[id(model)], counts)

    def deployed_call(model, x, settings, device):
        if isinstance(model, tuple):
            ms = 0.5 + sum(unit_ms(c.shape(model[2]), settings.setup.batch) for c in model[1])
        else:
            ms = model_ms(model, settings.setup.batch)
        return lambda: ms

    if not real_copies:
        monkeypatch.setattr(profile_context, "pruned_copy", fake_copy)

    monkeypatch.setattr(profile_context, "_deployed_call", deployed_call)
    monkeypatch.setattr(profile_context, "_chain_call", lambda shape, k, x, s, d: lambda: 1.0 + -(-k // block))
    monkeypatch.setattr(profile_context, "_timed", lambda calls, rounds, device: [[c()] * 3 for c in calls])


def good_table() -> dict:
    table = LatencyTable("test-device", date="2026-11-30")
    table.add(LayerShape("linear", 8, 4).key(1, "float32", "torch", "dense"), Entry(1.0, 0.9, 1.1, 5))
    return json.loads(json.dumps(table.to_dict()))


def broken_tables():
    yield "not a table", [1, 2]
    yield "wrong format", {**good_table(), "format": "something-else"}
    yield "version 1 (ONNX Runtime timed another way)", {**good_table(), "version": 1}
    yield "version 2 (isolated layer entries)", {**good_table(), "version": 2}
    yield "models not a mapping", {**good_table(), "models": [1]}
    for key in ("device", "date", "versions", "entries", "rest"):
        yield f"missing {key}", {k: v for k, v in good_table().items() if k != key}
    for field in ("median_ms", "p10_ms", "p90_ms"):
        for bad in (-1.0, float("nan"), float("inf"), "fast", None):
            t = good_table()
            entry = next(iter(t["entries"].values()))
            entry[field] = bad
            yield f"{field}={bad}", t
    t = good_table()
    next(iter(t["entries"].values())).pop("repeats")
    yield "entry without repeats", t
    t = good_table()
    t["entries"] = {"conv|b1|nonsense": next(iter(t["entries"].values()))}
    yield "a key that is no layer key", t


@pytest.mark.parametrize("why,raw", list(broken_tables()), ids=[w for w, _ in broken_tables()])
def test_a_bad_table_is_one_line(why, raw):
    with pytest.raises(HybridPruneError) as e:
        table_from_dict(raw, "t.json")
    assert "\n" not in str(e.value) and "t.json" in str(e.value)


def test_another_devices_table_and_a_bad_file_are_refused_by_the_cli_in_one_line(tmp_path, capsys):
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**good_table(), "device": "Some Other GPU"}))
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    nan = tmp_path / "nan.json"
    raw = {**good_table(), "device": device_name(torch.device("cpu"))}
    next(iter(raw["entries"].values()))["median_ms"] = float("nan")
    nan.write_text(json.dumps(raw))
    for path, why in ((other, "Some Other GPU"), (garbage, "not readable JSON"), (nan, "finite")):
        out = tmp_path / "out.json"
        code = main(["profile", "--model", "resnet20", "--latency-table", str(path), "--out", str(out)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and why in err, err
        assert not out.exists()


@pytest.mark.parametrize("name", ZOO)
def test_each_layers_predicted_shape_is_its_shape_after_pruning(name):
    """The couplings say which groups set each layer's channels: pruned for real, every conv and linear layer
    has exactly the channels (and depthwise groups) its coupling predicts."""
    from hybridprune.pruning.plan import apply_filter_plan_, plan_filter_pruning

    model, groups, couplings = structure(name)
    counts = {g.name: candidate_counts(g.size, 4)[len(candidate_counts(g.size, 4)) // 3] for g in groups}
    scores = {g.name: torch.rand(g.size, generator=torch.Generator().manual_seed(0)) for g in groups}
    apply_filter_plan_(model, plan_filter_pruning(scores, 0.0, 1, groups, counts))
    for c in couplings:
        layer, shape = model.get_submodule(c.name), c.shape(counts)
        if isinstance(layer, torch.nn.Linear):
            assert (layer.in_features, layer.out_features) == (shape.c_in, shape.c_out), c.name
        else:
            assert (layer.in_channels, layer.out_channels, layer.groups) == (shape.c_in, shape.c_out, shape.groups)


def test_a_grid_takes_a_target_latency_axis_and_measures_with_one_worker(tmp_path):
    from hybridprune.experiments.grid import grid_from_dict, run_grid
    from hybridprune.experiments.store import Store

    grid = grid_from_dict({"metrics": ["l1", "hybrid"], "target_latencies": [0.5, 0.8], "seeds": [0, 1],
                           "prune": {"latency_runtime": "torch", "latency_batch": 4}})  # fmt: skip
    runs = grid.runs()
    pairs = sorted({(r.prune.target_latency, r.prune.allocation) for r in runs})
    assert pairs == [(0.5, "sensitivity"), (0.8, "sensitivity")]
    assert len(runs) == 8 and len({r.to_dict()["prune"]["target_latency"] for r in runs}) == 2
    with pytest.raises(HybridPruneError, match="not both"):
        grid_from_dict({"target_latencies": [0.5], "ratios": [0.3]})
    with pytest.raises(HybridPruneError, match="target-latency"):
        grid_from_dict({"target_latencies": [1.5]})
    with pytest.raises(HybridPruneError, match="--workers 1"):
        run_grid(grid, Store(tmp_path / "s.sqlite"), workers=2, progress=False, log=lambda _: None)
    assert not (tmp_path / "s.sqlite").exists() or Store(tmp_path / "s.sqlite").rows() == []


@pytest.mark.parametrize(
    "model", [["--model", "resnet20", "--width", "0.5"], ["--model", "alexnet", "--width", "0.25"]]
)
def test_run_with_a_latency_target_records_predicted_and_measured_latency(model, tmp_path, capsys, deterministic_times):
    out = tmp_path / "run"
    argv = ["run", *model, "--epochs", "0", "--finetune-epochs", "0", "--train-size", "64", "--test-size", "32",
            "--metric", "l1", "--target-latency", "0.8", "--latency-runtime", "torch", "--latency-batch", "16",
            "--latency-points", "3", "--calib-batches", "1", "--bn-recalib-batches", "1", "--no-progress",
            "--device", "cpu", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    result = json.loads((out / "results.json").read_text())
    step = result["results"][0]
    lat = step["latency"]
    assert lat["nm_rule"] == "auto" and lat["sparse_layers"] == [] and "no 2:4 kernel" in lat["notice"]
    # auto on a CPU: no 2:4, so no 2:4 step, no 2:4-only model, no N:M label; the settings in force recorded
    assert "hybrid" not in step and "nm" not in result and step["checkpoint"] == step["filter"]["checkpoint"]
    prune = result["config"]["prune"]
    assert prune["target_latency"] == 0.8 and prune["nm_where"] == "auto" and "filter_ratio" not in prune
    printed = capsys.readouterr().out
    assert "N:M" not in printed and "2:4 only" not in printed and "no layer took 2:4" in printed
    assert not list(out.glob("*-hybrid*")) and not (out / "nm.safetensors").exists()
    assert lat["target_ms"] == pytest.approx(0.8 * lat["dense_ms"]["median"])
    assert lat["pruned_ms"]["predicted"] > 0 and lat["pruned_ms"]["median"] > 0 and 1 <= len(lat["solves"]) <= 4
    assert lat["pruned_ms"]["median"] == pytest.approx(lat["target_ms"], rel=0.05)  # the target is met
    kept = {g["group"]: g["kept"] for g in lat["groups"]}
    assert kept == {g["name"]: len(g["keep"]) for g in step["plan"]["groups"]}  # the solver's counts were pruned
    assert any(g["kept"] < g["size"] for g in lat["groups"])
    table = load_table(out / "latency-table.json")
    assert table.models and table.steps and lat["step"] == lat["block"] == 8  # the fake device's block
    assert lat["corrections"] == len(lat["solves"]) - 1
    assert "latency (kept channels" in printed


def test_a_latency_grid_runs_and_its_report_shows_measured_latency(tmp_path, deterministic_times):
    from hybridprune.experiments.grid import grid_from_dict, run_grid
    from hybridprune.experiments.report import write_grid_report
    from hybridprune.experiments.store import Store

    raw = {
        "datasets": [{"dataset": "digits", "train_size": 96, "test_size": 48}],
        "models": [{"name": "resnet20", "width": 0.5}],
        "metrics": ["l1"],
        "target_latencies": [0.6, 0.9],
        "seeds": [0],
        "train": {"epochs": 1, "batch_size": 32},
        "finetune": {"epochs": 1, "batch_size": 32},
        "prune": {"calib_batches": 1, "bn_recalib_batches": 1, "calib_batch_size": 32, "latency_runtime": "torch",
                  "latency_batch": 16, "latency_points": 3, "allocation": "global"},
    }  # fmt: skip
    store = Store(tmp_path / "s.sqlite")
    counts = run_grid(grid_from_dict(raw, "lat"), store, workers=1, progress=False, log=lambda _: None)
    assert counts["failed"] == 0 and counts["done"] == 2
    uniform = {**raw, "target_latencies": [0.6], "prune": {**raw["prune"], "allocation": "uniform"}}
    counts = run_grid(grid_from_dict(uniform, "lat-uniform"), store, workers=1, progress=False, log=lambda _: None)
    assert counts["failed"] == 0 and counts["done"] == 1  # the same store: the dense baseline is reused
    rows = store.rows()
    assert all(0 < r["ratio"] < 1 for r in rows)  # the fraction of channels the latency target removed
    written = write_grid_report(rows, tmp_path / "report")
    report = (tmp_path / "report" / "report.md").read_text()
    assert "Pruned to a measured latency target" in report and "0.6" in report and "0.9" in report
    measured, _, equal = report.partition("Allocations at equal measured latency")
    assert "| l1 " in equal  # the equal-latency section follows (one uniform point per seed: nothing to read)
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in measured.splitlines() if "| l1 " in line]
    versus = {(c[4], c[5]): c[10] for c in cells}  # (allocation, target) -> accuracy minus uniform's, paired
    assert all(c[11] in ("0 of 1", "1 of 1") and float(c[12]) >= 1 for c in cells)  # first-solve landing, solves
    assert versus[("global", "0.6")].endswith("(p n/a, n 1)") and versus[("uniform", "0.6")] == "-"
    assert versus[("global", "0.9")] == "-"  # no uniform run at that target: nothing to pair
    assert any(p.name.startswith("latency-") and p.suffix == ".png" for p in written)


def test_profile_takes_a_checkpoint_and_reports_predicted_beside_measured(tmp_path, capsys, deterministic_times):
    from hybridprune.models.sources import build_model
    from hybridprune.pruning.checkpoint import save_checkpoint

    ckpt = save_checkpoint(tmp_path / "m.safetensors", build_model("resnet20", width=0.5))
    out, check = tmp_path / "table.json", tmp_path / "check.json"
    argv = ["profile", "--checkpoint", str(ckpt), "--latency-runtime", "torch", "--latency-batch", "4",
            "--check-ratios", "0.5", "--out", str(out), "--json", str(check), "--device", "cpu",
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(check.read_text())
    assert [c["model"] for c in report["checks"]] == ["dense", "uniform 0.5"]
    assert report["block"] == 8 and report["step"] == 8 and not report["forced_step"]
    assert all(abs(c["error"]) < 0.1 for c in report["checks"])  # a sum of layers: the fitted units hold
    assert load_table(out).models
    assert main(argv) == 2 and "exists" in capsys.readouterr().err  # no overwrite without --overwrite


# --- in context: step structure, floors, fused-unit keys, fitted units ------------------------------------


def test_a_table_whose_entries_step_at_a_block_offers_no_candidate_inside_a_step():
    """A sweep stepping every 16 channels (noisy, off-block counts slower still, as ONNX Runtime measured here)
    gives block 16; candidates are its boundaries; a count inside a step is read as its boundary (no saving)."""
    from hybridprune.pruning.latency_context import ContextModel, ContextRecord, boundary_counts, find_block

    rng = random.Random(0)
    ks = list(range(2, 65, 2))
    times = [(1 + math.ceil(k / 16)) * (1 + 0.02 * rng.uniform(-1, 1)) * (1.0 if k % 8 == 0 else 1.6) for k in ks]
    assert find_block(ks, times) == 16
    assert find_block(ks, [1.0 + k for k in ks]) == 4  # latency moving with every count: no block, the default
    for size in (16, 40, 64, 100):
        assert all(k % 16 == 0 or k == size for k in boundary_counts(size, 16))
    e = lambda t: Entry(t, t, t, 1)  # noqa: E731
    record = ContextRecord({"g": 64}, 16, 16, e(10.0), e(2.0), {"g": {16: e(4.0), 32: e(6.0), 48: e(8.0)}})
    model = ContextModel(record)
    for k in range(17, 33):
        assert model.predict({"g": k}) == model.predict({"g": 32}) == 6.0
    forced = ContextRecord({"g": 64}, 4, 16, e(10.0), e(2.0), {"g": {16: e(4.0), 32: e(6.0), 48: e(8.0)}})
    inside = ContextModel(forced).indistinguishable({"g": boundary_counts(64, 4)})["g"]
    assert inside == [k for k in range(4, 64, 4) if k % 16]


@pytest.mark.parametrize("seed", range(5))
def test_a_prediction_is_never_negative(seed):
    """Savings that add up to more than the dense model (noisy differences), in the exact expansion and the
    fitted units, with and without a Budget: the prediction stays at or above the smallest model's measurement."""
    from hybridprune.pruning.latency_context import ContextModel, ContextRecord, context_variants

    model, groups, couplings = structure("resnet20")
    rng = random.Random(seed)
    sizes = {g.name: g.size for g in groups}
    variants = context_variants(sizes, couplings, 4, 3, 2)
    measured = [Entry(t, t, t, 1) for t in (rng.uniform(0.01, 1.0) for _ in variants)]
    record = ContextRecord.of(sizes, 4, 4, variants, Entry(1.0, 1.0, 1.0, 1), measured)
    for context in (ContextModel(record), ContextModel(record, couplings)):
        for _ in range(50):
            counts = {g: rng.choice(record.candidates(g)) for g in sizes}
            assert context.predict(counts) >= record.floor.median_ms > 0
            budget = Budget(LatencyTable("d"), SETUP, 0.0, 1.0, "none", frozenset(), context)
            assert predict(couplings, counts, budget)[0] > 0



def grouped_net():
    """A conv whose output feeds a grouped conv (4 groups): its group keeps counts in multiples of 4."""
    from torch import nn

    net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                        nn.Conv2d(32, 32, 3, padding=1, groups=4), nn.BatchNorm2d(32), nn.ReLU(),
                        nn.Conv2d(32, 16, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))  # fmt: skip
    net.input_shape = (3, 8, 8)
    return net.eval()


def unit_ms(s: LayerShape, batch: int) -> float:
    """A fused unit's synthetic latency: a function of its (in, out) counts padded to blocks of 8."""
    if s.kind == "linear":
        return 0.01 + 1e-6 * batch * s.c_in * s.c_out
    c_in, c_out = (-(-c // 8) * 8 for c in (s.c_in, s.c_out))
    return 0.02 + 1e-5 * batch * c_in * c_out / s.groups * s.kernel[0] * s.kernel[1]


def synthetic_ms(model, batch: int) -> float:
    """A model's latency as a sum of fused units (`unit_ms`) plus a per-graph overhead: what the second-order
    expansion reproduces exactly."""
    total = 0.5
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            total += unit_ms(LayerShape("conv", m.in_channels, m.out_channels, kernel=tuple(m.kernel_size),
                                        groups=m.groups), batch)  # fmt: skip
        elif isinstance(m, torch.nn.Linear):
            total += unit_ms(LayerShape("linear", m.in_features, m.out_features), batch)
    return total


@pytest.mark.parametrize("name", ["zoo:residual_net", "zoo:concat_net", "zoo:depthwise_net", "grouped"])
def test_the_fused_unit_keys_are_found_for_the_zoo_and_the_expansion_is_exact(name, monkeypatch, one_torch_thread):
    """Residual adds, concatenations, depthwise and grouped convs: profiling in context measures every group
    alone and every pair of groups that meet in one layer (its input and output, or two concatenated inputs),
    grouped-conv groups at counts their conv groups allow; with latency a sum of units of at most two groups,
    the expansion predicts every candidate model exactly."""
    from hybridprune.deploy.profile_context import profile_context, pruned_copy
    from hybridprune.pruning.latency_context import ContextModel, coupled_pairs

    if name == "grouped":
        model = grouped_net()
        groups = channel_groups(model, dependency_graph(model))
        couplings = layer_couplings(model, groups, example_input(model))
    else:
        model, groups, couplings = structure(name)
    patch_context_timing(monkeypatch, synthetic_ms, real_copies=True)
    settings = ProfileSettings(SETUP, step=None, max_points=64, rounds=1, threads=1)
    record = profile_context(model, groups, couplings, new_table(torch.device("cpu")), settings,
                             torch.device("cpu"), "key", points=64, pair_points=64, progress=False)  # fmt: skip
    assert record.block == record.step == 8
    prunable = {g for g in record.sizes if len(record.candidates(g)) > 1}
    assert set(record.single) == prunable
    pairs = {p for p in coupled_pairs(couplings) if set(p) <= prunable}
    assert set(record.pairs) == pairs
    kinds = {"zoo:residual_net": lambda c: len(c.in_parts) and c.out_group not in {g for g, _, _ in c.in_parts},
             "zoo:concat_net": lambda c: len(c.in_parts) >= 2, "zoo:depthwise_net": lambda c: c.depthwise,
             "grouped": lambda c: c.dense.groups > 1}  # fmt: skip
    assert any(kinds[name](c) for c in couplings)  # the model has the structure the test is about
    if name == "grouped":
        grouped_in = next(g for g, _, _ in next(c for c in couplings if c.dense.groups > 1).in_parts)
        assert all(k % 4 == 0 for k in record.candidates(grouped_in))
    exact = ContextModel(record)
    rng = random.Random(0)
    three_way = any(len({g for g, _, _ in c.in_parts} | {c.out_group}) > 2 for c in couplings)
    for _ in range(4):
        counts = {g: rng.choice(record.candidates(g)) for g in record.sizes}
        truth = synthetic_ms(pruned_copy(model, groups, counts), SETUP.batch)
        predicted = exact.expansion(counts)
        assert predicted == pytest.approx(truth, rel=0.05 if three_way else 1e-6)
