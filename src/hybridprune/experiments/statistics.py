"""Statistics over stored grid rows: means and spreads over seeds, paired differences with t-tests, recipes
against plain fine-tuning, and iso-accuracy (the cost of the filter-only model as accurate as a hybrid one).

Pure functions of store rows (and of `bench` results): nothing here trains, measures or draws; `tables` and
`plots` present what these compute.
"""

from __future__ import annotations

from statistics import fmean, stdev
from typing import Any

from hybridprune.config import PruneConfig
from hybridprune.parse import loads_json

Row = dict[str, Any]
METRIC_ORDER = ("l1", "l2", "output_l1", "fpgm", "taylor", "hybrid", "hybrid_output", "random")


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value).

    Example:
        >>> mean_std([1.0, 2.0, 3.0]), mean_std([5.0])
        ((2.0, 1.0), (5.0, 0.0))
    """
    return fmean(values), stdev(values) if len(values) > 1 else 0.0


def run_label(row: Row) -> str:
    """A run's metric, its recovery recipe unless that is plain fine-tuning, and its latency target and
    allocation and batch when it was pruned to one: `hybrid`, `hybrid+distill`, `l1+latency0.5/uniform/b64`.

    Example:
        >>> run_label({"metric": "l1", "config": '{"prune": {"target_latency": 0.5, "allocation": "global"}}'})
        'l1+latency0.5/global/b64'
    """
    recipe = row.get("recipe", "plain")
    label = row["metric"] if recipe == "plain" else f"{row['metric']}+{recipe}"
    prune = _config(row).get("prune", {})
    if prune.get("target_latency") is not None:
        batch = prune.get("latency_batch", PruneConfig.latency_batch)  # a config omits the latency defaults
        label += f"+latency{prune['target_latency']:g}/{prune.get('allocation', 'global')}/b{batch}"
    return label


def metric_order(label: str) -> tuple[int, str]:
    """Sort key of run labels: baselines first, the hybrid metrics, then the random control; recipes beside
    their metric.

    Example:
        >>> sorted(["random", "hybrid+kd", "l1", "hybrid"], key=metric_order)
        ['l1', 'hybrid', 'hybrid+kd', 'random']
    """
    metric = label.split("+")[0]
    return (METRIC_ORDER.index(metric) if metric in METRIC_ORDER else len(METRIC_ORDER), label)


def group_rows(rows: list[Row], column: str) -> dict[tuple, dict[int, float]]:
    """(dataset, model, width, metric[+recipe], ratio) -> {seed: value}."""
    groups: dict[tuple, dict[int, float]] = {}
    for r in rows:
        key = (r["dataset"], r["model"], r["width"], run_label(r), r["ratio"])
        groups.setdefault(key, {})[r["seed"]] = r[column]
    return groups


def paired_differences(rows: list[Row], column: str, metric: str, baseline: str) -> list[Row]:
    """metric minus baseline, paired by seed, per (dataset, model, ratio), with a paired t-test."""
    groups = group_rows(rows, column)
    out = []
    for (ds, model, width, m, ratio), values in sorted(groups.items()):
        if m != metric or (ds, model, width, baseline, ratio) not in groups:
            continue
        base = groups[(ds, model, width, baseline, ratio)]
        seeds = sorted(set(values) & set(base))
        if not seeds:
            continue
        mean, std, p = paired_test([values[s] for s in seeds], [base[s] for s in seeds])
        out.append(
            {
                "dataset": ds,
                "model": model,
                "width": width,
                "ratio": ratio,
                "metric": metric,
                "baseline": baseline,
                "column": column,
                "mean_diff": mean,
                "std_diff": std,
                "n": len(seeds),
                "p_value": p,
            }
        )
    return out


def paired_test(values: list[float], base: list[float]) -> tuple[float, float, float]:
    """Mean and std of values - base (paired by position) and a paired t-test's p (nan below two pairs).

    Example:
        >>> paired_test([2.0, 3.0], [1.0, 1.0])[:2]
        (1.5, 0.7071067811865476)
    """
    from scipy import stats  # here, not at the top: it takes about a second to import

    mean, std = mean_std([v - b for v, b in zip(values, base, strict=True)])
    p = float(stats.ttest_rel(values, base).pvalue) if len(values) > 1 and std > 0 else float("nan")
    return mean, std, p


def recipe_comparison(rows: list[Row]) -> list[Row]:
    """Each recovery recipe against plain fine-tuning of the same metric, ratio and seeds: the final (filter +
    N:M, fine-tuned) accuracy, its gap to the dense model, the paired difference with a t-test, and the wall
    time as a multiple of plain's.

    Example:
        >>> r = lambda recipe, seed, acc, wall: {"dataset": "d", "model": "m", "width": 1.0, "metric": "l1",
        ...     "recipe": recipe, "ratio": 0.4, "seed": seed, "hybrid_accuracy": acc, "dense_accuracy": 90.0,
        ...     "wall_time_s": wall}
        >>> rows = [r("plain", 0, 80, 10), r("plain", 1, 82, 10), r("kd", 0, 83, 15), r("kd", 1, 84, 15)]
        >>> [c] = recipe_comparison(rows)
        >>> c["recipe"], c["mean_diff"], c["gap_to_dense"], c["time_ratio"]
        ('kd', 2.5, -6.5, 1.5)
    """
    plain = [r for r in rows if r.get("recipe", "plain") == "plain"]
    out = []
    for recipe in sorted({r.get("recipe", "plain") for r in rows} - {"plain"}):
        chosen = [r for r in rows if r.get("recipe") == recipe]
        for metric in sorted({r["metric"] for r in chosen}):
            label = f"{metric}+{recipe}"
            for d in paired_differences(plain + chosen, "hybrid_accuracy", label, metric):
                where = (d["dataset"], d["model"], d["width"], d["ratio"], metric)
                mine = [r for r in chosen if _setup(r) == where]
                base = [r for r in plain if _setup(r) == where]
                accuracy, std = mean_std([r["hybrid_accuracy"] for r in mine])
                dense = mean_std([r["dense_accuracy"] for r in mine])[0]
                out.append({
                    **d, "recipe": recipe, "metric": metric, "accuracy": accuracy, "std": std,
                    "plain_accuracy": mean_std([r["hybrid_accuracy"] for r in base])[0],
                    "gap_to_dense": accuracy - dense,
                    "time_ratio": _mean_wall(mine) / _mean_wall(base) if _mean_wall(base) > 0 else float("nan"),
                })  # fmt: skip
    return out


def _setup(row: Row) -> tuple:
    return row["dataset"], row["model"], row["width"], row["ratio"], row["metric"]


def _mean_wall(rows: list[Row]) -> float:
    return sum(r["wall_time_s"] for r in rows) / len(rows)


def iso_accuracy(rows: list[Row]) -> list[Row]:
    """For each hybrid point (a metric at a ratio, mean over seeds), the filter-only model of the same accuracy,
    found by linear interpolation between the filter-only points of the other ratios, and how many times more
    MACs it needs than the hybrid model (counting the hybrid's N:M layers in full, and at N/M).

    Example:
        >>> r = lambda ratio, fa, fm, ha: {"dataset": "d", "model": "m", "width": 1.0, "metric": "l1", "ratio": ratio,
        ...     "filter_accuracy": fa, "hybrid_accuracy": ha, "macs": fm, "effective_macs": fm / 2,
        ...     "result": '{"filter": {"macs": %d}}' % fm}
        >>> [p["filter_macs_same_accuracy"] for p in iso_accuracy([r(0.2, 90, 80, 88), r(0.6, 80, 40, 75)])]
        [72.0, None]
    """
    setups: dict[tuple, list[Row]] = {}
    for row in rows:
        setups.setdefault((row["dataset"], row["model"], row["width"], run_label(row)), []).append(row)
    points = []
    for (dataset, model, width, metric), group in sorted(setups.items()):
        by_ratio = _by_ratio(group)
        curve = _filter_only_curve(group, by_ratio)
        if len(by_ratio) < 2:  # one ratio is no curve (a recipe measured at one ratio only)
            continue
        for ratio, rs in sorted(by_ratio.items()):
            accuracy, macs = _mean([r["hybrid_accuracy"] for r in rs]), _mean([r["macs"] for r in rs])
            effective = _mean([r["effective_macs"] for r in rs])
            same = cheapest_at_accuracy(curve, accuracy)
            points.append({
                "dataset": dataset, "model": model, "width": width, "metric": metric, "ratio": ratio,
                "hybrid_accuracy": accuracy, "hybrid_macs": macs, "hybrid_effective_macs": effective,
                "filter_macs_same_accuracy": same,
                "macs_ratio": None if same is None else same / macs,
                "effective_macs_ratio": None if same is None else same / effective,
            })  # fmt: skip
    return points


def _filter_only_curve(group: list[Row], by_ratio: dict[float, list[Row]]) -> list[tuple[float, float]]:
    """(accuracy, MACs) of a setup's filter-only models, mean over seeds per ratio; the dense model first where
    the rows know its MACs, since it is the filter-only model at ratio 0."""
    curve = [
        (_mean([r["filter_accuracy"] for r in rs]), _mean([_row_json(r["result"])["filter"]["macs"] for r in rs]))
        for _, rs in sorted(by_ratio.items())
    ]
    dense_macs = [_row_json(r["result"]).get("dense", {}).get("macs") for r in group]
    if all(dense_macs):
        curve.insert(0, (_mean(list({r["seed"]: r["dense_accuracy"] for r in group}.values())), _mean(dense_macs)))
    return curve


def _by_ratio(rows: list[Row]) -> dict[float, list[Row]]:
    by_ratio: dict[float, list[Row]] = {}
    for row in rows:
        by_ratio.setdefault(row["ratio"], []).append(row)
    return by_ratio


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def latency_iso_accuracy(bench_results: list[Row]) -> list[Row]:
    """Measured latency at equal accuracy, from `bench` results (with accuracies) of one model pruned at several
    ratios: for each hybrid variant, the latency of the filter-only model of the same accuracy, interpolated
    over the filter-only variants and the dense model (ratio 0) of every result on the same device, mode,
    dtype and batch size; and the 2:4-only model's latency and accuracy beside it.

    Example:
        >>> run = lambda v, acc, ms: {"variant": v, "accuracy": acc, "latency_ms_median": ms, "device": "gpu",
        ...     "mode": "eager", "dtype": "float16", "batch_size": 64}
        >>> runs = [run("dense", 90, 10.0), run("filter", 86, 6.0), run("nm", 89, 8.0), run("hybrid", 88, 4.0)]
        >>> bench = {"runs": runs}
        >>> [p] = latency_iso_accuracy([bench])
        >>> p["filter_ms_same_accuracy"], p["speedup_over_filter"], p["speedup_over_nm"]
        (8.0, 2.0, 2.0)
    """
    setups: dict[tuple, dict[str, list[tuple[float, float]]]] = {}
    for result in bench_results:
        # which model: named by benchmarks/iso_latency.py, else known by the dense checkpoint it was pruned from
        model = result.get("model") or result.get("variants", {}).get("dense", {}).get("source", "")
        for r in result["runs"]:
            if r.get("accuracy") is None:
                continue
            key = (model, r["device"], r["mode"], r["dtype"], r["batch_size"])
            setups.setdefault(key, {}).setdefault(r["variant"], []).append((r["accuracy"], r["latency_ms_median"]))
    points = []
    for (model, device, mode, dtype, batch), variants in sorted(setups.items(), key=str):
        curve = sorted(variants.get("dense", []) + variants.get("filter", []), key=lambda p: p[1])
        nm = variants.get("nm", [])
        for accuracy, ms in sorted(variants.get("hybrid", [])):
            same = cheapest_at_accuracy(curve, accuracy)
            nm_acc, nm_ms = max(nm) if nm else (None, None)
            points.append({
                "model": model, "device": device, "mode": mode, "dtype": dtype, "batch_size": batch,
                "hybrid_accuracy": accuracy, "hybrid_ms": ms, "filter_ms_same_accuracy": same,
                "speedup_over_filter": None if same is None else same / ms,
                "nm_accuracy": nm_acc, "nm_ms": nm_ms, "speedup_over_nm": None if nm_ms is None else nm_ms / ms,
            })  # fmt: skip
    return points


def cheapest_at_accuracy(curve: list[tuple[float, float]], accuracy: float) -> float | None:
    """The cost (MACs, or milliseconds) of the cheapest model of `accuracy` on a curve of (accuracy, cost)
    points, interpolated linearly between neighbours; None where the curve never reaches that accuracy.

    Example:
        >>> curve = [(90.0, 100.0), (80.0, 60.0), (86.0, 40.0), (84.0, 20.0)]  # 85% is met twice
        >>> cheapest_at_accuracy(curve, 85.0), cheapest_at_accuracy(curve, 95.0)
        (30.0, None)
    """
    found = None
    for (a1, m1), (a2, m2) in zip(curve, curve[1:], strict=False):
        if min(a1, a2) <= accuracy <= max(a1, a2):
            m = m1 if a1 == a2 else m1 + (accuracy - a1) * (m2 - m1) / (a2 - a1)
            found = m if found is None else min(found, m)
    return found


def frontier_points(rows: list[Row], nm_rows: list[Row]) -> dict[str, list[tuple]]:
    """The accuracy-versus-cost points of one setup: per run label a filter-only and a filter + N:M family,
    (effective MACs, accuracy mean, accuracy std, ratio) sorted by cost, plus the dense and 2:4-only models
    (a recipe measured at one ratio only: its filter + N:M point alone).

    Example:
        >>> result = '{"filter": {"macs": 60}, "dense": {"macs": 100}}'
        >>> row = {"metric": "l1", "ratio": 0.5, "seed": 0, "filter_accuracy": 80.0, "hybrid_accuracy": 79.0,
        ...     "effective_macs": 30, "dense_accuracy": 85.0, "result": result}
        >>> nm = {"accuracy": 84.0, "effective_macs": 51}
        >>> p = frontier_points([row], [nm])
        >>> p["l1 filter only"], p["l1 filter + 2:4"], p["dense"], p["2:4 only"]
        ([(60.0, 80.0, 0.0, 0.5)], [(30.0, 79.0, 0.0, 0.5)], [(100.0, 85.0, 0.0, 0.0)], [(51.0, 84.0, 0.0, 0.0)])
    """
    families: dict[str, list[tuple]] = {}
    dense_macs = []
    for label in sorted({run_label(r) for r in rows}, key=metric_order):
        by_ratio = _by_ratio([r for r in rows if run_label(r) == label])
        filter_only, hybrid = [], []
        for ratio, rs in sorted(by_ratio.items()):
            results = [_row_json(r["result"]) for r in rs]
            dense_macs += [res["dense"]["macs"] for res in results if "dense" in res]
            filter_macs = sum(res["filter"]["macs"] for res in results) / len(rs)
            filter_only.append((filter_macs, *mean_std([r["filter_accuracy"] for r in rs]), ratio))
            cost = sum(r["effective_macs"] for r in rs) / len(rs)
            hybrid.append((cost, *mean_std([r["hybrid_accuracy"] for r in rs]), ratio))
        if "+" not in label or len(by_ratio) > 1:  # a recipe at one ratio: its final model only, less clutter
            families[f"{label} filter only"] = sorted(filter_only)
        families[f"{label} filter + 2:4"] = sorted(hybrid)
    if dense_macs:
        dense = mean_std(list({r["seed"]: r["dense_accuracy"] for r in rows}.values()))
        families["dense"] = [(sum(dense_macs) / len(dense_macs), *dense, 0.0)]
    if nm_rows:
        cost = sum(r["effective_macs"] for r in nm_rows) / len(nm_rows)
        families["2:4 only"] = [(cost, *mean_std([r["accuracy"] for r in nm_rows]), 0.0)]
    return families


def has_full_results(rows: list[Row]) -> bool:
    """Rows written by a grid carry their full result (with the filter stage's MACs); hand-made rows may not."""
    try:
        return all(_row_json(r["result"])["filter"]["macs"] > 0 for r in rows)
    except (KeyError, TypeError, ValueError):
        return False


def measured_latencies(rows: list[Row]) -> dict[tuple, list[dict[str, Any]]]:
    """Runs pruned to a latency target, by setup (dataset, model, width, device, runtime, batch, dtype): each
    with its metric, allocation, target, measured and predicted latency (ms) and fine-tuned hybrid accuracy.

    Example:
        >>> measured_latencies([{"result": "{}"}])
        {}
    """
    found: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        result = _row_json(r["result"]) if isinstance(r.get("result"), str) else r.get("result") or {}
        lat = result.get("latency")
        if not lat:
            continue
        setup = (r["dataset"], r["model"], r["width"], lat["device"], lat["runtime"], lat["batch"], lat["dtype"])
        found.setdefault(setup, []).append({
            "metric": r["metric"], "allocation": _allocation(r), "seed": r["seed"], "target": lat["target"],
            "target_ms": lat["target_ms"],
            "dense_ms": lat["dense_ms"]["median"], "measured_ms": lat["pruned_ms"]["median"],
            "predicted_ms": lat["pruned_ms"]["predicted"], "accuracy": r["hybrid_accuracy"],
            "solves": len(lat.get("solves", [])) or 1, "first_landed": first_landed(lat),
        })  # fmt: skip
    return found


def first_landed(latency: dict[str, Any], within: float = 0.05) -> bool | None:
    """Whether a latency-target run's first solve measured within `within` of its target (above or below); None
    where the record has no solves.

    Example:
        >>> first_landed({"target_ms": 10.0, "solves": [{"measured_ms": 10.4}, {"measured_ms": 9.9}]})
        True
    """
    solves = latency.get("solves") or []
    if not solves or solves[0].get("measured_ms") is None:
        return None
    return abs(solves[0]["measured_ms"] / latency["target_ms"] - 1) <= within


def _allocation(row: Row) -> str:
    return _config(row).get("prune", {}).get("allocation", "global")


def _config(row: Row) -> dict[str, Any]:
    return _row_json(row["config"]) if isinstance(row.get("config"), str) else row.get("config") or {}


def versus_uniform(points: list[dict[str, Any]]) -> dict[tuple[str, float, str], tuple[float, float, float, int]]:
    """Accuracy of each (metric, target, allocation) other than uniform minus the uniform allocation's at the
    same metric and target, paired by seed: (mean, std, p, pairs)."""
    by_point: dict[tuple, dict[int, float]] = {}
    for p in points:
        by_point.setdefault((p["metric"], p["target"], p["allocation"]), {})[p["seed"]] = p["accuracy"]
    out = {}
    for (metric, target, allocation), accuracy in by_point.items():
        base = by_point.get((metric, target, "uniform"))
        seeds = sorted(set(accuracy) & set(base or {}))
        if allocation != "uniform" and seeds:
            out[(metric, target, allocation)] = (
                *paired_test([accuracy[s] for s in seeds], [base[s] for s in seeds]),
                len(seeds),
            )
    return out


def _row_json(text: str) -> Any:
    """A JSON column of a store row, with the bounds of any file we read (a store can be hand-made)."""
    return loads_json(text, "a result in the store")


def store_checkpoints(rows: list[Row]) -> set[tuple[str, ...]]:
    """Every checkpoint the stored rows' results name, as its last two path parts (`run-KEY/hybrid.safetensors`:
    the folder is the run's key), so a path written relative or absolute matches.

    Example:
        >>> sorted(store_checkpoints([{"result": '{"filter": {"checkpoint": "s.artifacts/run-1/l1-filter.st"}}'}]))
        [('run-1', 'l1-filter.st')]
    """
    found: set[tuple[str, ...]] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "checkpoint" and isinstance(value, str):
                    found.add(_path_key(value))
                else:
                    walk(value)

    for row in rows:
        walk(loads_json(row["result"], "store row") if isinstance(row.get("result"), str) else row.get("result"))
    return found


def bench_outside_store(bench: Row, checkpoints: set[tuple[str, ...]]) -> str | None:
    """Why a `bench` result is not of the store's runs (a variant whose checkpoint no stored run wrote, or no
    checkpoint named at all); None when every variant it timed is one of them.

    Example:
        >>> bench = {"variants": {"hybrid": {"source": "/x/run-1/l1-hybrid.st"}}}
        >>> bench_outside_store(bench, {("run-1", "l1-hybrid.st")}) is None, bench_outside_store(bench, set())
        (True, 'its hybrid model /x/run-1/l1-hybrid.st is no checkpoint of the store')
    """
    sources = {name: v.get("source") for name, v in (bench.get("variants") or {}).items() if isinstance(v, dict)}
    if not any(sources.values()):
        return "it names no checkpoints (a bench of a run folder or of checkpoint files does)"
    for name, source in sources.items():
        if source and _path_key(source) not in checkpoints:
            return f"its {name} model {source} is no checkpoint of the store"
    return None


def _path_key(path: str) -> tuple[str, ...]:
    return tuple(path.replace("\\", "/").rstrip("/").split("/")[-2:])
