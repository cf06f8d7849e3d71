"""The report of an experiment grid: report.md with every table, a CSV file per accuracy table, and the
figures, from the store's rows (and optional `bench` results) only: nothing here trains or measures.

Each section of report.md is a function returning its Markdown lines (none when it has nothing to show);
`write_grid_report` puts them in order. The numbers come from `statistics`, the tables from `tables`, the
figures from `plots`.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from hybridprune.errors import HybridPruneError
from hybridprune.experiments.deployed import grid_deployed_table
from hybridprune.experiments.plots import write_plots
from hybridprune.experiments.statistics import (
    Row,
    bench_outside_store,
    has_full_results,
    iso_accuracy,
    latency_iso_accuracy,
    mean_std,
    measured_latencies,
    paired_differences,
    recipe_comparison,
    run_label,
    store_checkpoints,
    versus_uniform,
)
from hybridprune.experiments.tables import (
    STAGE_COLUMNS,
    accuracy_table,
    dataset_label,
    dense_table,
    format_accuracy,
    markdown_table,
)
from hybridprune.outputs import write_text
from hybridprune.parse import read_json


def write_grid_report(
    rows: list[Row],
    out: str | Path,
    bench_files: list[str] | None = None,
    nm_rows: list[Row] | None = None,
) -> list[Path]:
    """Markdown and CSV tables, paired differences, and PNG plots from store rows (and the baselines' 2:4-only
    models, where the store has them); returns the files written, report.md last."""
    _check_one_setting_per_point(rows)
    benches = _benches_of_the_store(bench_files or [], rows + (nm_rows or []))  # refused before anything is written
    out = Path(out)
    md = ["# Experiment report", "", f"{len(rows)} finished runs, read from the store.", ""]
    md += _section("Dense baselines: top-1 accuracy (%), mean ± std (seeds)", dense_table(rows, nm_rows or None))
    written = []
    for column, title in STAGE_COLUMNS.items():
        headers, body = accuracy_table(rows, column)
        md += _section(f"Top-1 accuracy (%), {title}: mean ± std (seeds)", markdown_table(headers, body))
        written.append(write_text(out / f"accuracy-{column}.csv", _csv([headers, *body])))
    md += _differences_section(rows) + _recipes_section(rows) + _iso_section(rows) + _measured_section(rows)
    md += _equal_latency_section(rows) + _deployed_section(rows)
    if benches:
        md += _latency_section(benches)
    written += write_plots(rows, out, bench_files or [], nm_rows or [])
    if any(p.name.startswith("frontier-") for p in written):
        md += ["Effective MACs count N:M layers at N/M: a model of the hardware, not a measurement.", ""]
    md += [f"![{p.stem}]({p.name})" for p in written if p.suffix == ".png"]
    written.append(write_text(out / "report.md", "\n".join(md) + "\n"))
    return written


def _benches_of_the_store(bench_files: list[str], rows: list[Row]) -> list[dict]:
    """The bench results, each of models the store's runs wrote; a bench of anything else is refused in one line
    (its latencies would be set beside accuracies of other models)."""
    checkpoints, results = store_checkpoints(rows), []
    for path in bench_files:
        result = read_json(path, "bench results")
        why = bench_outside_store(result, checkpoints)
        if why:
            raise HybridPruneError(
                f"--bench {path} is not a bench of this store's runs: {why}; bench the store's checkpoints "
                "(python benchmarks/iso_latency.py writes such files)"
            )
        results.append(result)
    return results


def _check_one_setting_per_point(rows: list[Row]) -> None:
    """Rows of the same setup, label, ratio and seed with different settings (two grids in one store, e.g. other
    fine-tuning epochs) would be averaged as one point: refuse, and say how to choose."""
    seen: dict[tuple, Row] = {}
    for r in rows:
        point = (r["dataset"], r["model"], r["width"], run_label(r), r["ratio"], r["seed"])
        other = seen.setdefault(point, r)
        if other["key"] != r["key"]:
            raise HybridPruneError(
                f"the store holds two runs of {run_label(r)} at ratio {r['ratio']:g}, seed {r['seed']} with different "
                f"settings (experiments {other['experiment']} and {r['experiment']}); report one grid at a time: "
                "--grid experiments/NAME.yaml"
            )


def _section(title: str, table: str, *notes: str) -> list[str]:
    """A section of report.md: its title, the notes as one paragraph (if any), and its table."""
    return [f"## {title}", "", *notes, *([""] if notes else []), table, ""]


def _csv(rows: list[list[str]]) -> str:
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return buf.getvalue()


def _p_value(p: float) -> str:
    return "n/a" if math.isnan(p) else f"{p:.3f}"


def _differences_section(rows: list[Row]) -> list[str]:
    """Each hybrid metric minus each baseline metric, one-shot and fine-tuned, paired by seed."""
    diffs = [
        d
        for column in ("hybrid_oneshot", "hybrid_accuracy")
        for metric in ("hybrid", "hybrid_output")
        for base in ("l1", "output_l1")
        for d in paired_differences(rows, column, metric, base)
    ]
    if not diffs:
        return []
    table = markdown_table(
        ["dataset", "ratio", "stage", "difference", "mean ± std", "n", "p"],
        [
            [d["dataset"], f"{d['ratio']:g}", STAGE_COLUMNS[d["column"]], f"{d['metric']} - {d['baseline']}",
             f"{d['mean_diff']:+.2f} ± {d['std_diff']:.2f}", str(d["n"]), _p_value(d["p_value"])]
            for d in diffs
        ],
    )  # fmt: skip
    return _section("Hybrid metrics minus baselines (points), paired by seed, two-sided paired t-test", table)


def _recipes_section(rows: list[Row]) -> list[str]:
    """Each recovery recipe against plain fine-tuning of the same metric, ratio and seeds."""
    recipes = recipe_comparison(rows)
    if not recipes:
        return []
    table = markdown_table(
        ["dataset", "model", "ratio", "recipe", "accuracy", "- dense", "- plain (paired)", "n", "p", "time"],
        [
            [dataset_label(c["dataset"]), f"{c['model']} w{c['width']:g}", f"{c['ratio']:g}",
             f"{c['metric']}+{c['recipe']}", f"{c['accuracy']:.2f} ± {c['std']:.2f}", f"{c['gap_to_dense']:+.2f}",
             f"{c['mean_diff']:+.2f} ± {c['std_diff']:.2f}", str(c["n"]), _p_value(c["p_value"]),
             f"{c['time_ratio']:.2f}x"]
            for c in recipes
        ],
    )  # fmt: skip
    return _section(
        "Recovery recipes against plain fine-tuning (filter + N:M, fine-tuned), paired by seed",
        table,
        "Each recipe keeps the total fine-tuning epochs; time is the run's wall time over plain's (same machine).",
    )


def _iso_section(rows: list[Row]) -> list[str]:
    """The MACs of the filter-only model as accurate as each hybrid model (rows with full results only)."""
    iso = (
        [p for p in iso_accuracy(rows) if p["filter_macs_same_accuracy"] is not None] if has_full_results(rows) else []
    )
    if not iso:
        return []
    table = markdown_table(
        ["dataset", "model", "metric", "ratio", "hybrid acc.", "filter-only MACs at that acc.", "x hybrid MACs",
         "x hybrid effective MACs"],
        [
            [dataset_label(p["dataset"]), f"{p['model']} w{p['width']:g}", p["metric"], f"{p['ratio']:g}",
             f"{p['hybrid_accuracy']:.2f}", f"{p['filter_macs_same_accuracy'] / 1e6:.2f}M", f"{p['macs_ratio']:.2f}x",
             f"{p['effective_macs_ratio']:.2f}x"]
            for p in iso
        ],
    )  # fmt: skip
    return _section(
        "Iso-accuracy: the filter-only model of the same accuracy as each hybrid model",
        table,
        "Filter-only MACs at the hybrid model's accuracy, interpolated linearly between the filter-only models",
        "of neighbouring ratios (same metric, mean over seeds); the ratios say how many times more MACs it needs",
        "than the hybrid model, counting the hybrid's 2:4 layers in full (MACs) or at half (effective MACs).",
        "Hybrid points outside the range of the filter-only accuracies are left out.",
    )


def _measured_section(rows: list[Row]) -> list[str]:
    """Runs pruned to a latency target: target, measured and predicted latency, accuracy, mean ± std (seeds), and
    each allocation's accuracy minus uniform allocation's at the same target, paired by seed."""
    found = measured_latencies(rows)
    if not found:
        return []
    body = []
    for (ds, model, width, device, runtime, batch, dtype), runs in sorted(found.items()):
        by_point: dict[tuple, list[dict]] = {}
        for run in runs:
            by_point.setdefault((run["metric"], run["target"], run["allocation"]), []).append(run)
        paired = versus_uniform(runs)
        for (metric, target, allocation), points in sorted(by_point.items()):
            cells = [mean_std([p[k] for p in points]) for k in ("target_ms", "measured_ms", "predicted_ms", "accuracy")]
            diff = paired.get((metric, target, allocation))
            versus = "-" if diff is None else f"{diff[0]:+.2f} ± {diff[1]:.2f} (p {_p_value(diff[2])}, n {diff[3]})"
            landed = [p["first_landed"] for p in points if p.get("first_landed") is not None]
            first = f"{sum(landed)} of {len(landed)}" if landed else "-"
            solves = f"{sum(p.get('solves', 1) for p in points) / len(points):.1f}"
            body.append([dataset_label(ds), f"{model} w{width:g}", f"{device}, {runtime}, batch {batch}, {dtype}",
                         metric, allocation, f"{target:g}", *(f"{m:.3f} ± {s:.3f}" for m, s in cells[:3]),
                         f"{cells[3][0]:.2f} ± {cells[3][1]:.2f}", versus, first, solves,
                         str(len(points))])  # fmt: skip
    headers = ["dataset", "model", "measured on", "metric", "allocation", "target", "target ms", "measured ms",
               "predicted ms", "hybrid accuracy (%)", "- uniform (paired)", "first solve within 5%", "solves",
               "seeds"]  # fmt: skip
    return _section("Pruned to a measured latency target: latency (ms) and accuracy, mean ± std (seeds)",
                    markdown_table(headers, body),
                    "Uniform allocation under a target keeps one fraction of every group, the largest whose "
                    "predicted latency fits the budget (corrected by measurement like the others): pruning by one "
                    "ratio everywhere, at the same measured latency. 'First solve within 5%': runs whose first "
                    "solve measured within 5% of the target; 'solves': mean solves per run (more than one: the "
                    "correction loop was needed).")  # fmt: skip


def _equal_latency_section(rows: list[Row]) -> list[str]:
    """Each allocation's accuracy minus uniform's at the same measured latency (uniform's frontier, per seed)."""
    from hybridprune.experiments.frontiers import equal_latency_comparison

    body = []
    for (ds, model, width, device, runtime, batch, dtype), runs in sorted(measured_latencies(rows).items()):
        where = f"{device}, {runtime}, batch {batch}, {dtype}"
        for r in equal_latency_comparison(runs):
            diff = "-" if r["difference"] is None else (
                f"{r['difference']:+.2f} ± {r['std']:.2f} (p {_p_value(r['p'])}, n {r['pairs']})")  # fmt: skip
            base = "-" if r["baseline_accuracy"] is None else f"{r['baseline_accuracy']:.2f}"
            body.append([dataset_label(ds), f"{model} w{width:g}", where, r["metric"],
                         r["allocation"], f"{r['target']:g}", f"{r['measured_ms'][0]:.3f}",
                         f"{r['accuracy'][0]:.2f}", base, diff, str(r["outside"])])  # fmt: skip
    if not body:
        return []
    headers = ["dataset", "model", "measured on", "metric", "allocation", "target", "measured ms", "accuracy (%)",
               "uniform at that latency", "- uniform (paired)", "outside uniform's range"]  # fmt: skip
    return _section("Allocations at equal measured latency: accuracy minus uniform's, read off uniform's frontier",
                    markdown_table(headers, body),
                    "Uniform's accuracy at each run's measured latency is interpolated along uniform's frontier "
                    "(its runs at every target, same metric and seed); runs outside that range are counted, not "
                    "extrapolated.")  # fmt: skip


def _deployed_section(rows: list[Row]) -> list[str]:
    """The runs' deployed forms (a grid with `deploy:`): top-1 in each runtime and speed, over seeds."""
    table = grid_deployed_table(rows)
    if not table:
        return []
    return _section("Deployed: top-1 (%) measured in the runtime, and speed over the dense baseline",
                    table, "Each run deploys its dense baseline, its filter-pruned and its filter+2:4 models; every "
                    "form is timed in the same rounds as the dense model in ONNX Runtime fp32 (PyTorch fp32 where "
                    "ONNX Runtime is not installed), the ratio is that model's time over the form's; the runtime of "
                    "a bare precision is the one measured fastest on the dense model in that run.")  # fmt: skip


def _latency_section(bench_results: list[dict]) -> list[str]:
    """Measured latency at equal accuracy, from `bench` results with accuracies."""
    points = latency_iso_accuracy(bench_results)
    if not points:
        return []

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    def times(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}x"

    table = markdown_table(
        ["model", "device", "mode", "dtype", "batch", "hybrid acc.", "hybrid ms", "filter-only ms at that acc.",
         "speedup", "2:4-only acc.", "2:4-only ms", "speedup over 2:4-only"],
        [
            [p["model"], p["device"], p["mode"], p["dtype"], str(p["batch_size"]), f"{p['hybrid_accuracy']:.2f}",
             ms(p["hybrid_ms"]), ms(p["filter_ms_same_accuracy"]), times(p["speedup_over_filter"]),
             format_accuracy(p["nm_accuracy"]), ms(p["nm_ms"]), times(p["speedup_over_nm"])]
            for p in points
        ],
    )  # fmt: skip
    return _section(
        "Iso-accuracy, measured: latency from `bench` results",
        table,
        "Median latency per batch as measured on the device named (a CPU runs N:M layers dense: no speedup from",
        "2:4 there). The filter-only latency at the hybrid model's accuracy is interpolated between the bench's",
        "filter-only models and the dense model; '-' where the hybrid accuracy lies outside them.",
    )
