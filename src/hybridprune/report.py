"""Tables from stored results only: nothing here trains or measures."""

from __future__ import annotations

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
    """Per-layer view: filters kept by the first metric's plan, and whether each layer took N:M masks."""
    kept = {}
    if result.get("results"):
        kept = {lp["name"] + ".conv": lp for lp in result["results"][0]["plan"]["layers"]}
    rows = []
    for e in result["layers"]:
        plan = kept.get(e["name"])
        filters = f"{plan['original']} -> {len(plan['keep'])} ({100 * plan['real_ratio']:.0f}% pruned)" if plan else "-"
        rows.append(
            [
                e["name"],
                e["kind"],
                "x".join(map(str, e["shape"])),
                filters,
                "N:M" if e["eligible"] else f"dense: {e['reason']}",
            ]
        )
    return markdown_table(["layer", "kind", "dense shape", "filters kept", "N:M"], rows)


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
