"""The PNG figures of a grid report: accuracy against filter ratio per setup, accuracy against cost (the
frontier of filter-only, filter + 2:4, dense and 2:4-only models), and accuracy against measured throughput
for each `bench` result.

matplotlib is imported by `write_plots` alone, since it is slow to import and only reports need it; the
figure helpers take its `pyplot` as an argument.
"""

from __future__ import annotations

from pathlib import Path
from statistics import fmean
from typing import Any

from hybridprune.experiments.statistics import (
    Row,
    frontier_points,
    group_rows,
    has_full_results,
    mean_std,
    measured_latencies,
    metric_order,
)
from hybridprune.experiments.tables import STAGE_COLUMNS, dataset_label
from hybridprune.parse import read_json


def write_plots(rows: list[Row], out: Path, bench_files: list[str], nm_rows: list[Row]) -> list[Path]:
    """Every figure of a report into `out`; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setups = sorted({(r["dataset"], r["model"], r["width"]) for r in rows})
    written = [_accuracy_plot(setup, rows, out, plt) for setup in setups]
    if has_full_results(rows):
        written += [_frontier_plot(setup, rows, nm_rows, out, plt) for setup in setups]
    written += [_measured_plot(setup, runs, out, plt) for setup, runs in sorted(measured_latencies(rows).items())]
    return written + [_pareto_plot(Path(bench_file), out, plt) for bench_file in bench_files]


def _accuracy_plot(setup: tuple, rows: list[Row], out: Path, plt: Any) -> Path:
    """One-shot and fine-tuned hybrid accuracy against filter ratio, one line per run label (mean ± std)."""
    ds, model, width = setup
    mine = [r for r in rows if (r["dataset"], r["model"], r["width"]) == setup]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=False)
    single = len({r["ratio"] for r in mine}) == 1  # one ratio: metrics side by side, not a flat line
    for ax, column in zip(axes, ("hybrid_oneshot", "hybrid_accuracy"), strict=True):
        groups = group_rows(mine, column)
        metrics = sorted({k[3] for k in groups}, key=metric_order)
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
            title += f" at ratio {mine[0]['ratio']:g}"
        ax.set(title=title, xlabel="metric" if single else "filter ratio", ylabel="top-1 accuracy (%)")
        ax.grid(alpha=0.3)
    if not single:
        axes[0].legend()
    return save_figure(fig, plt, out / f"accuracy-{_slug(dataset_label(ds))}-{_slug(model)}-w{width:g}.png")


def _frontier_plot(setup: tuple, rows: list[Row], nm_rows: list[Row], out: Path, plt: Any) -> Path:
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
        xlabel="effective MACs per image (millions; N:M layers at N/M)",  # a model of the hardware: see the report
        ylabel="top-1 accuracy (%), fine-tuned",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, plt, out / f"frontier-{_slug(dataset_label(ds))}-{_slug(model)}-w{width:g}.png")


def _measured_plot(setup: tuple, runs: list[dict], out: Path, plt: Any) -> Path:
    """Fine-tuned hybrid accuracy against measured latency of the runs pruned to a latency target, one series
    per metric, the target of each as a vertical tick; the dense model's measured latency as a dashed line."""
    ds, model, width, device, runtime, batch, dtype = setup
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for metric in sorted({r["metric"] for r in runs}, key=metric_order):
        mine = sorted((r["measured_ms"], r["accuracy"]) for r in runs if r["metric"] == metric)
        ax.plot([m for m, _ in mine], [a for _, a in mine], marker="o", linestyle="none", label=metric)
    dense = fmean(r["dense_ms"] for r in runs)
    ax.axvline(dense, linestyle="--", color="gray", label=f"dense ({dense:.2f} ms)")
    for target in sorted({r["target_ms"] for r in runs}):
        ax.axvline(target, linestyle=":", color="lightgray")
    ax.set(title=f"{dataset_label(ds)}, {model} w{width:g}: accuracy vs measured latency",
           xlabel=f"measured latency (ms), {device}, {runtime}, batch {batch}, {dtype}",
           ylabel="top-1 accuracy (%), fine-tuned")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    name = f"latency-{_slug(dataset_label(ds))}-{_slug(model)}-w{width:g}-{_slug(runtime)}-b{batch}.png"
    return save_figure(fig, plt, out / name)


def _pareto_plot(bench_file: Path, out: Path, plt: Any) -> Path:
    """Accuracy versus best throughput of the four variants of one `bench` result."""
    result = read_json(bench_file, "bench results")
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
    return save_figure(fig, plt, out / f"pareto-{bench_file.stem}.png")


def save_figure(fig: Any, plt: Any, path: Path) -> Path:
    """Write `fig` as a PNG at `path` (folders made) with every label inside the image, then close it."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")  # no label cut at the edge, whatever its length
    plt.close(fig)
    return path


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text).strip("_")
