"""Tables from stored results only: nothing here trains or measures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _fmt_acc(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _fmt_count(value: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.2f}{unit}"
    return str(value)


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured Markdown table with padded columns (readable as plain text too)."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=False)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=False)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def _stage_row(label: str, stage: str, s: dict[str, Any]) -> list[str]:
    return [
        label,
        stage,
        _fmt_acc(s.get("accuracy_oneshot_raw")),
        _fmt_acc(s.get("accuracy_oneshot")),
        _fmt_acc(s["accuracy"]),
        _fmt_count(s["params"]),
        _fmt_count(s["nonzero_params"]),
        _fmt_count(s["macs"]),
        _fmt_count(s["effective_macs"]),
    ]


def run_table(result: dict[str, Any]) -> str:
    """The comparison table of one `hybridprune run` result: every metric at every stage.

    Example:
        >>> s = {"accuracy": 90.0, "params": 10, "nonzero_params": 5, "macs": 2000, "effective_macs": 1000}
        >>> print(run_table({"dense": s, "results": []}).splitlines()[2])
        | dense  | dense | -            | -              | 90.00      | 10     | 5       | 2.00k | 1.00k     |
    """
    headers = [
        "metric",
        "stage",
        "one-shot raw",
        "one-shot recal",
        "fine-tuned",
        "params",
        "nonzero",
        "MACs",
        "eff. MACs",
    ]
    rows = [_stage_row("dense", "dense", result["dense"])]
    if "nm" in result:
        rows.append(_stage_row("(none)", "2:4 only", result["nm"]))
    for r in result["results"]:
        rows.append(_stage_row(r["metric"], "filter", r["filter"]))
        rows.append(_stage_row(r["metric"], "filter+N:M", r["hybrid"]))
    return markdown_table(headers, rows)


def layer_table(result: dict[str, Any]) -> str:
    """Per-layer view: the channel group each conv produces, the channels kept by the first metric's plan,
    and whether each layer took N:M masks (and why not)."""
    groups: dict[str, dict[str, Any]] = {}
    if result.get("results"):
        for g in result["results"][0]["plan"]["groups"]:
            groups.update({member: g for member in g["members"]})
    rows = []
    for e in result["layers"]:
        g = groups.get(e["name"])
        kept = f"{g['original']} -> {len(g['keep'])} ({100 * g['real_ratio']:.0f}% pruned)" if g else "-"
        rows.append(
            [
                e["name"].removeprefix("net."),
                e["kind"],
                "x".join(map(str, e["shape"])),
                g["name"].removeprefix("net.") if g else "-",
                kept,
                "N:M" if e["eligible"] else f"dense: {e['reason']}",
            ]
        )
    return markdown_table(["layer", "kind", "dense shape", "channel group", "channels kept", "N:M"], rows)


def bench_tables(result: dict[str, Any]) -> str:
    """Latency/throughput per variant and the speedup ratios of one `hybridprune bench` result."""
    runs = [
        [
            r["variant"],
            r["mode"],
            r["dtype"],
            str(r["batch_size"]),
            f"{r['latency_ms_median']:.3f}",
            f"{r['latency_ms_p10']:.3f}",
            f"{r['latency_ms_p90']:.3f}",
            f"{r['throughput']:.0f}",
            _fmt_acc(r.get("accuracy")),
        ]
        for r in result["runs"]
    ]
    keys = ["filter_over_dense", "nm_over_dense", "hybrid_over_dense", "hybrid_over_filter", "hybrid_over_nm"]
    ratios = [
        [s["mode"], s["dtype"], str(s["batch_size"]), *(f"{s[k]:.2f}x" if k in s else "-" for k in keys)]
        for s in result["speedups"]
    ]
    sizes = [
        [
            s["variant"],
            s["dtype"],
            _fmt_count(s["weight_bytes_dense"]),
            _fmt_count(s["weight_bytes_compressed"]),
            _fmt_count(s["weight_bytes_as_run"]),
        ]
        for s in result["weight_bytes"]
    ]
    return "\n\n".join(
        [
            markdown_table(
                ["variant", "mode", "dtype", "batch", "median ms", "p10 ms", "p90 ms", "images/s", "accuracy"], runs
            ),
            markdown_table(
                ["mode", "dtype", "batch", "filter/dense", "nm/dense", "hybrid/dense", "hybrid/filter", "hybrid/nm"],
                ratios,
            ),
            markdown_table(["variant", "dtype", "weight bytes dense", "N:M compressed", "as run"], sizes),
        ]
    )


def kernel_table(result: dict[str, Any], batch_size: int | None = None) -> str:
    """Which kernel each layer of each variant ran, and why (one batch size: the largest by default)."""
    batch = batch_size or max(layer["batch_size"] for layer in result["layers"])
    rows = [
        [
            layer["variant"],
            layer["name"],
            layer["kind"],
            "x".join(map(str, layer["gemm_shape"])),
            layer["kernel"],
            "-" if layer["dense_ms"] is None else f"{layer['dense_ms']:.3f}",
            "-" if layer["sparse_ms"] is None else f"{layer['sparse_ms']:.3f}",
            layer["reason"],
        ]
        for layer in result["layers"]
        if layer["batch_size"] == batch
    ]
    return markdown_table(["variant", "layer", "kind", "GEMM weight", "kernel", "dense ms", "sparse ms", "why"], rows)


# --- experiment grids (reads the store only) ---------------------------------------------------------

STAGE_COLUMNS = {
    "filter_oneshot": "filter one-shot",
    "filter_accuracy": "filter fine-tuned",
    "hybrid_oneshot": "hybrid one-shot",
    "hybrid_accuracy": "hybrid fine-tuned",
}


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    import statistics

    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def run_label(row: dict[str, Any]) -> str:
    """A run's metric, and its recovery recipe unless that is plain fine-tuning: `hybrid`, `hybrid+distill`."""
    recipe = row.get("recipe", "plain")
    return row["metric"] if recipe == "plain" else f"{row['metric']}+{recipe}"


def group_rows(rows: list[dict[str, Any]], column: str) -> dict[tuple, dict[int, float]]:
    """(dataset, model, width, metric[+recipe], ratio) -> {seed: value}."""
    groups: dict[tuple, dict[int, float]] = {}
    for r in rows:
        key = (r["dataset"], r["model"], r["width"], run_label(r), r["ratio"])
        groups.setdefault(key, {})[r["seed"]] = r[column]
    return groups


def accuracy_table(rows: list[dict[str, Any]], column: str) -> tuple[list[str], list[list[str]]]:
    """Rows per (dataset, model, metric), one column per ratio, cells 'mean +- std (n)'."""
    groups = group_rows(rows, column)
    ratios = sorted({k[4] for k in groups})
    setups = sorted({k[:4] for k in groups}, key=lambda k: (k[0], k[1], k[2], _metric_order(k[3])))
    body = []
    for ds, model, width, metric in setups:
        cells = []
        for ratio in ratios:
            values = list(groups.get((ds, model, width, metric, ratio), {}).values())
            m, s = mean_std(values) if values else (None, None)
            cells.append("-" if m is None else f"{m:.2f} ± {s:.2f} ({len(values)})")
        body.append([ds, f"{model} w{width:g}", metric, *cells])
    return ["dataset", "model", "metric", *[f"ratio {r:g}" for r in ratios]], body


def dense_table(rows: list[dict[str, Any]], nm_rows: list[dict[str, Any]] | None = None) -> str:
    """One line per (dataset, model): the dense baselines' accuracy over seeds, and their 2:4-only models'."""
    per_seed: dict[tuple, dict[int, float]] = {}
    for r in rows:
        per_seed.setdefault((r["dataset"], r["model"], r["width"]), {})[r["seed"]] = r["dense_accuracy"]
    nm: dict[tuple, list[dict[str, Any]]] = {}
    for r in nm_rows or []:
        nm.setdefault((r["dataset"], r["model"], r["width"]), []).append(r)
    body = []
    for key, seeds in sorted(per_seed.items()):
        m, sd = mean_std(list(seeds.values()))
        row = [key[0], f"{key[1]} w{key[2]:g}", f"{m:.2f} ± {sd:.2f} ({len(seeds)})"]
        if nm_rows is not None:
            found = nm.get(key, [])
            nm_mean, nm_sd = mean_std([r["accuracy"] for r in found]) if found else (None, None)
            row.append("-" if nm_mean is None else f"{nm_mean:.2f} ± {nm_sd:.2f} ({len(found)})")
        body.append(row)
    headers = ["dataset", "model", "dense accuracy"] + (["2:4-only, fine-tuned"] if nm_rows is not None else [])
    return markdown_table(headers, body)


def _metric_order(label: str) -> tuple[int, str]:
    order = ["l1", "l2", "output_l1", "fpgm", "taylor", "hybrid", "hybrid_output", "random"]
    metric = label.split("+")[0]
    return (order.index(metric) if metric in order else len(order), label)


def paired_differences(rows: list[dict[str, Any]], column: str, metric: str, baseline: str) -> list[dict[str, Any]]:
    """metric minus baseline, paired by seed, per (dataset, model, ratio), with a paired t-test."""
    from scipy import stats

    groups = group_rows(rows, column)
    out = []
    for (ds, model, width, m, ratio), values in sorted(groups.items()):
        if m != metric or (ds, model, width, baseline, ratio) not in groups:
            continue
        base = groups[(ds, model, width, baseline, ratio)]
        seeds = sorted(set(values) & set(base))
        if not seeds:
            continue
        diffs = [values[s] - base[s] for s in seeds]
        mean, std = mean_std(diffs)
        p = (
            float(stats.ttest_rel([values[s] for s in seeds], [base[s] for s in seeds]).pvalue)
            if len(seeds) > 1 and std > 0
            else float("nan")
        )
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


def recipe_comparison(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
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


def _setup(row: dict[str, Any]) -> tuple:
    return row["dataset"], row["model"], row["width"], row["ratio"], row["metric"]


def _mean_wall(rows: list[dict[str, Any]]) -> float:
    return sum(r["wall_time_s"] for r in rows) / len(rows)


def iso_accuracy(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
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
    setups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        setups.setdefault((row["dataset"], row["model"], row["width"], run_label(row)), []).append(row)
    points = []
    for (dataset, model, width, metric), group in sorted(setups.items()):
        by_ratio: dict[float, list[dict[str, Any]]] = {}
        for row in group:
            by_ratio.setdefault(row["ratio"], []).append(row)

        def mean(values: list[float]) -> float:
            return sum(values) / len(values)

        curve = [
            (mean([r["filter_accuracy"] for r in rs]), mean([json.loads(r["result"])["filter"]["macs"] for r in rs]))
            for _, rs in sorted(by_ratio.items())
        ]
        dense_macs = [json.loads(r["result"]).get("dense", {}).get("macs") for r in group]
        if all(dense_macs):  # the dense model is the filter-only model at ratio 0
            curve.insert(0, (mean(list({r["seed"]: r["dense_accuracy"] for r in group}.values())), mean(dense_macs)))
        if len(by_ratio) < 2:  # one ratio is no curve (a recipe measured at one ratio only)
            continue
        for ratio, rs in sorted(by_ratio.items()):
            accuracy, macs = mean([r["hybrid_accuracy"] for r in rs]), mean([r["macs"] for r in rs])
            effective = mean([r["effective_macs"] for r in rs])
            same = _interpolate_macs(curve, accuracy)
            points.append({
                "dataset": dataset, "model": model, "width": width, "metric": metric, "ratio": ratio,
                "hybrid_accuracy": accuracy, "hybrid_macs": macs, "hybrid_effective_macs": effective,
                "filter_macs_same_accuracy": same,
                "macs_ratio": None if same is None else same / macs,
                "effective_macs_ratio": None if same is None else same / effective,
            })  # fmt: skip
    return points


def latency_iso_accuracy(bench_results: list[dict[str, Any]]) -> list[dict[str, Any]]:
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
            same = _interpolate_macs(curve, accuracy)
            nm_acc, nm_ms = max(nm) if nm else (None, None)
            points.append({
                "model": model, "device": device, "mode": mode, "dtype": dtype, "batch_size": batch,
                "hybrid_accuracy": accuracy, "hybrid_ms": ms, "filter_ms_same_accuracy": same,
                "speedup_over_filter": None if same is None else same / ms,
                "nm_accuracy": nm_acc, "nm_ms": nm_ms, "speedup_over_nm": None if nm_ms is None else nm_ms / ms,
            })  # fmt: skip
    return points


def _interpolate_macs(curve: list[tuple[float, float]], accuracy: float) -> float | None:
    """MACs of the cheapest filter-only model of `accuracy` on the (accuracy, MACs) curve; None outside it."""
    found = None
    for (a1, m1), (a2, m2) in zip(curve, curve[1:], strict=False):
        if min(a1, a2) <= accuracy <= max(a1, a2):
            m = m1 if a1 == a2 else m1 + (accuracy - a1) * (m2 - m1) / (a2 - a1)
            found = m if found is None else min(found, m)
    return found


def _check_one_setting_per_point(rows: list[dict[str, Any]]) -> None:
    """Rows of the same setup, label, ratio and seed with different settings (two grids in one store, e.g. other
    fine-tuning epochs) would be averaged as one point: refuse, and say how to choose."""
    from hybridprune.errors import HybridPruneError

    seen: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        point = (r["dataset"], r["model"], r["width"], run_label(r), r["ratio"], r["seed"])
        other = seen.setdefault(point, r)
        if other["key"] != r["key"]:
            raise HybridPruneError(
                f"the store holds two runs of {run_label(r)} at ratio {r['ratio']:g}, seed {r['seed']} with different "
                f"settings (experiments {other['experiment']} and {r['experiment']}); report one grid at a time: "
                "--grid experiments/NAME.yaml"
            )


def write_grid_report(
    rows: list[dict[str, Any]],
    out: str | Path,
    bench_files: list[str] | None = None,
    nm_rows: list[dict[str, Any]] | None = None,
) -> list[Path]:
    """Markdown and CSV tables, paired differences, and PNG plots from store rows (and the baselines' 2:4-only
    models, where the store has them)."""
    import csv
    import io

    from hybridprune.outputs import write_text

    _check_one_setting_per_point(rows)
    out = Path(out)
    written, md = [], ["# Experiment report", "", f"{len(rows)} finished runs, read from the store.", ""]
    md += ["## Dense baselines: top-1 accuracy (%), mean ± std (seeds)", "", dense_table(rows, nm_rows or None), ""]
    for column, title in STAGE_COLUMNS.items():
        headers, body = accuracy_table(rows, column)
        md += [f"## Top-1 accuracy (%), {title}: mean ± std (seeds)", "", markdown_table(headers, body), ""]
        buf = io.StringIO()
        csv.writer(buf).writerows([headers, *body])
        written.append(write_text(out / f"accuracy-{column}.csv", buf.getvalue()))
    diffs = [
        d
        for column in ("hybrid_oneshot", "hybrid_accuracy")
        for metric in ("hybrid", "hybrid_output")
        for base in ("l1", "output_l1")
        for d in paired_differences(rows, column, metric, base)
    ]
    if diffs:
        md += [
            "## Hybrid metrics minus baselines (points), paired by seed, two-sided paired t-test",
            "",
            markdown_table(
                ["dataset", "ratio", "stage", "difference", "mean ± std", "n", "p"],
                [
                    [
                        d["dataset"],
                        f"{d['ratio']:g}",
                        STAGE_COLUMNS[d["column"]],
                        f"{d['metric']} - {d['baseline']}",
                        f"{d['mean_diff']:+.2f} ± {d['std_diff']:.2f}",
                        str(d["n"]),
                        "n/a" if d["p_value"] != d["p_value"] else f"{d['p_value']:.3f}",
                    ]
                    for d in diffs
                ],
            ),
            "",
        ]
    recipes = recipe_comparison(rows)
    if recipes:
        md += [
            "## Recovery recipes against plain fine-tuning (filter + N:M, fine-tuned), paired by seed",
            "",
            "Each recipe keeps the total fine-tuning epochs; time is the run's wall time over plain's (same machine).",
            "",
            markdown_table(
                ["dataset", "model", "ratio", "recipe", "accuracy", "- dense", "- plain (paired)", "n", "p", "time"],
                [
                    [
                        dataset_label(c["dataset"]),
                        f"{c['model']} w{c['width']:g}",
                        f"{c['ratio']:g}",
                        f"{c['metric']}+{c['recipe']}",
                        f"{c['accuracy']:.2f} ± {c['std']:.2f}",
                        f"{c['gap_to_dense']:+.2f}",
                        f"{c['mean_diff']:+.2f} ± {c['std_diff']:.2f}",
                        str(c["n"]),
                        "n/a" if c["p_value"] != c["p_value"] else f"{c['p_value']:.3f}",
                        f"{c['time_ratio']:.2f}x",
                    ]
                    for c in recipes
                ],
            ),
            "",
        ]
    iso = [p for p in iso_accuracy(rows) if p["filter_macs_same_accuracy"] is not None] if _has_results(rows) else []
    if iso:
        md += [
            "## Iso-accuracy: the filter-only model of the same accuracy as each hybrid model",
            "",
            "Filter-only MACs at the hybrid model's accuracy, interpolated linearly between the filter-only models",
            "of neighbouring ratios (same metric, mean over seeds); the ratios say how many times more MACs it needs",
            "than the hybrid model, counting the hybrid's 2:4 layers in full (MACs) or at half (effective MACs).",
            "Hybrid points outside the range of the filter-only accuracies are left out.",
            "",
            markdown_table(
                [
                    "dataset",
                    "model",
                    "metric",
                    "ratio",
                    "hybrid acc.",
                    "filter-only MACs at that acc.",
                    "x hybrid MACs",
                    "x hybrid effective MACs",
                ],
                [
                    [
                        dataset_label(p["dataset"]),
                        f"{p['model']} w{p['width']:g}",
                        p["metric"],
                        f"{p['ratio']:g}",
                        f"{p['hybrid_accuracy']:.2f}",
                        f"{p['filter_macs_same_accuracy'] / 1e6:.2f}M",
                        f"{p['macs_ratio']:.2f}x",
                        f"{p['effective_macs_ratio']:.2f}x",
                    ]
                    for p in iso
                ],
            ),  # fmt: skip
            "",
        ]
    if bench_files:
        md += _latency_section([json.loads(Path(f).read_text()) for f in bench_files])
    written += _plots(rows, out, bench_files or [], nm_rows or [])
    md += [f"![{p.stem}]({p.name})" for p in written if p.suffix == ".png"]
    written.append(write_text(out / "report.md", "\n".join(md) + "\n"))
    return written


def _latency_section(bench_results: list[dict[str, Any]]) -> list[str]:
    points = latency_iso_accuracy(bench_results)
    if not points:
        return []

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    def times(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}x"

    return [
        "## Iso-accuracy, measured: latency from `bench` results",
        "",
        "Median latency per batch as measured on the device named (a CPU runs N:M layers dense: no speedup from",
        "2:4 there). The filter-only latency at the hybrid model's accuracy is interpolated between the bench's",
        "filter-only models and the dense model; '-' where the hybrid accuracy lies outside them.",
        "",
        markdown_table(
            [
                "model",
                "device",
                "mode",
                "dtype",
                "batch",
                "hybrid acc.",
                "hybrid ms",
                "filter-only ms at that acc.",
                "speedup",
                "2:4-only acc.",
                "2:4-only ms",
                "speedup over 2:4-only",
            ],
            [
                [
                    p["model"],
                    p["device"],
                    p["mode"],
                    p["dtype"],
                    str(p["batch_size"]),
                    f"{p['hybrid_accuracy']:.2f}",
                    ms(p["hybrid_ms"]),
                    ms(p["filter_ms_same_accuracy"]),
                    times(p["speedup_over_filter"]),
                    _fmt_acc(p["nm_accuracy"]),
                    ms(p["nm_ms"]),
                    times(p["speedup_over_nm"]),
                ]
                for p in points
            ],
        ),  # fmt: skip
        "",
    ]


def _plots(rows: list[dict[str, Any]], out: Path, bench_files: list[str], nm_rows: list[dict[str, Any]]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for ds, model, width in sorted({(r["dataset"], r["model"], r["width"]) for r in rows}):
        setup = [r for r in rows if (r["dataset"], r["model"], r["width"]) == (ds, model, width)]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=False)
        single = len({r["ratio"] for r in setup}) == 1  # one ratio: metrics side by side, not a flat line
        for ax, column in zip(axes, ("hybrid_oneshot", "hybrid_accuracy"), strict=True):
            groups = group_rows(setup, column)
            metrics = sorted({k[3] for k in groups}, key=_metric_order)
            for i, metric in enumerate(metrics):
                points = sorted((k[4], mean_std(list(v.values()))) for k, v in groups.items() if k[3] == metric)
                ax.errorbar(
                    [i] if single else [p[0] for p in points],
                    [p[1][0] for p in points],
                    yerr=[p[1][1] for p in points],
                    marker="o",
                    capsize=3,
                    label=metric,
                )
            title = f"{dataset_label(ds)}, {model} w{width:g}: {STAGE_COLUMNS[column]}"
            if single:
                ax.set_xticks(range(len(metrics)), metrics, rotation=30)
                title += f" at ratio {setup[0]['ratio']:g}"
            ax.set(title=title, xlabel="metric" if single else "filter ratio", ylabel="top-1 accuracy (%)")
            ax.grid(alpha=0.3)
        if not single:
            axes[0].legend()
        written.append(
            _save_figure(fig, plt, out / f"accuracy-{_slug(dataset_label(ds))}-{_slug(model)}-w{width:g}.png")
        )
    if _has_results(rows):
        for setup in sorted({(r["dataset"], r["model"], r["width"]) for r in rows}):
            written.append(_frontier_plot(setup, rows, nm_rows, out, plt))
    for bench_file in bench_files:
        written.append(_pareto_plot(Path(bench_file), out, plt))
    return written


def frontier_points(rows: list[dict[str, Any]], nm_rows: list[dict[str, Any]]) -> dict[str, list[tuple]]:
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
    for label in sorted({run_label(r) for r in rows}, key=_metric_order):
        by_ratio: dict[float, list[dict[str, Any]]] = {}
        for r in rows:
            if run_label(r) == label:
                by_ratio.setdefault(r["ratio"], []).append(r)
        filter_only, hybrid = [], []
        for ratio, rs in sorted(by_ratio.items()):
            results = [json.loads(r["result"]) for r in rs]
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


def _frontier_plot(
    setup: tuple, rows: list[dict[str, Any]], nm_rows: list[dict[str, Any]], out: Path, plt: Any
) -> Path:
    """Accuracy against effective MACs: filter-only and filter + 2:4 families, the dense and 2:4-only models."""
    mine = [r for r in rows if (r["dataset"], r["model"], r["width"]) == setup]
    nm = [r for r in nm_rows if (r["dataset"], r["model"], r["width"]) == setup]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in frontier_points(mine, nm).items():
        single = name in ("dense", "2:4 only")
        ax.errorbar(
            [p[0] / 1e6 for p in points],
            [p[1] for p in points],
            yerr=[p[2] for p in points],
            marker="*" if single else "s" if "2:4" in name else "o",
            markersize=12 if single else 6,
            linestyle="none" if single else "--" if "filter only" in name else "-",
            capsize=3,
            label=name,
        )
    ds, model, width = setup
    ax.set(
        title=f"{dataset_label(ds)}, {model} w{width:g}: accuracy vs cost",
        xlabel="effective MACs per image (millions; N:M layers counted at N/M)",
        ylabel="top-1 accuracy (%), fine-tuned",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save_figure(fig, plt, out / f"frontier-{_slug(dataset_label(ds))}-{_slug(model)}-w{width:g}.png")


def _pareto_plot(bench_file: Path, out: Path, plt: Any) -> Path:
    """Accuracy versus best throughput of the four variants of one `bench` result."""
    result = json.loads(bench_file.read_text())
    best: dict[str, dict[str, Any]] = {}
    for r in result["runs"]:
        if r.get("accuracy") is not None and r["throughput"] > best.get(r["variant"], {}).get("throughput", 0):
            best[r["variant"]] = r
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, r) in enumerate(best.items()):
        ax.scatter(r["throughput"], r["accuracy"], s=50)
        ax.annotate(  # staggered labels: variants of equal speed or accuracy would overlap
            f"{name} (batch {r['batch_size']})",
            (r["throughput"], r["accuracy"]),
            textcoords="offset points",
            xytext=(-95 if i % 2 else 5, 10 - 12 * i),
        )
    ax.margins(0.2)
    ax.set(
        xlabel="throughput (images/s)",
        ylabel="top-1 accuracy (%)",
        title=f"accuracy vs throughput ({next(iter(best.values()))['device'] if best else 'no accuracies'})",
    )
    ax.grid(alpha=0.3)
    return _save_figure(fig, plt, out / f"pareto-{bench_file.stem}.png")


def _save_figure(fig: Any, plt: Any, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _has_results(rows: list[dict[str, Any]]) -> bool:
    """Rows written by a grid carry their full result (with the filter stage's MACs); hand-made rows may not."""
    try:
        return all(json.loads(r["result"])["filter"]["macs"] > 0 for r in rows)
    except (KeyError, TypeError, ValueError):
        return False


def dataset_label(name: str) -> str:
    """A dataset's name for titles: `npz:../data/cifar10` -> `cifar10`, registered names as they are.

    Example:
        >>> dataset_label("npz:../shared/data/cifar10/"), dataset_label("digits")
        ('cifar10', 'digits')
    """
    if name.startswith("npz:"):
        return Path(name[4:]).name.removesuffix(".npz") or name
    return name


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text).strip("_")
