"""Markdown tables: of one run's result, of a `bench` result, and of a grid's stored rows (mean ± std over
seeds); the number formats they share; display names of stages and datasets.

Tables only present: the numbers come from results and from `statistics`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hybridprune.experiments.statistics import group_rows, mean_std, metric_order

STAGE_COLUMNS = {
    "filter_oneshot": "filter one-shot",
    "filter_accuracy": "filter fine-tuned",
    "hybrid_oneshot": "hybrid one-shot",
    "hybrid_accuracy": "hybrid fine-tuned",
}


def format_accuracy(value: float | None) -> str:
    """An accuracy in points with two decimals, '-' where there is none.

    Example:
        >>> format_accuracy(91.256), format_accuracy(None)
        ('91.26', '-')
    """
    return "-" if value is None else f"{value:.2f}"


def format_count(value: int) -> str:
    """A count with a k, M or G suffix.

    Example:
        >>> format_count(1234), format_count(5_600_000), format_count(12)
        ('1.23k', '5.60M', '12')
    """
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
        format_accuracy(s.get("accuracy_oneshot_raw")),
        format_accuracy(s.get("accuracy_oneshot")),
        format_accuracy(s["accuracy"]),
        format_count(s["params"]),
        format_count(s["nonzero_params"]),
        format_count(s["macs"]),
        format_count(s["effective_macs"]),
    ]


def run_table(result: dict[str, Any]) -> str:
    """The comparison table of one `hybridprune run` result: every metric at every stage it ran, each row named for
    what its model is (`filter+2:4` only where 2:4 masks were applied; no `2:4 only` row where none was built).

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
    nm = pattern_label(result)
    rows = [_stage_row("dense", "dense", result["dense"])]
    if result.get("nm"):
        rows.append(_stage_row("(none)", f"{nm} only", result["nm"]))
    for r in result["results"]:
        rows.append(_stage_row(r["metric"], "filter", r["filter"]))
        if r.get("hybrid"):
            rows.append(_stage_row(r["metric"], f"filter+{nm}", r["hybrid"]))
    return markdown_table(headers, rows)


def pattern_label(result: dict[str, Any]) -> str:
    """The N:M pattern a run applied, as its rows name it ('2:4' unless the config says another).

    Example:
        >>> pattern_label({"config": {"prune": {"nm": "1:4"}}}), pattern_label({})
        ('1:4', '2:4')
    """
    return str(result.get("config", {}).get("prune", {}).get("nm", "2:4"))


def masked_layers(result: dict[str, Any]) -> set[str]:
    """The layers that took N:M masks in the first metric's final model, or else in the 2:4-only model.

    Example:
        >>> sorted(masked_layers({"results": [{"hybrid": {"nm_layers": ["net.a"]}}], "nm": {"nm_layers": ["net.b"]}}))
        ['net.a']
    """
    first = (result.get("results") or [{}])[0]
    stage = first.get("hybrid") or result.get("nm") or {}
    return set(stage.get("nm_layers", []))


def layer_table(result: dict[str, Any]) -> str:
    """Per-layer view, layers named as in the JSON and the model (`net.features.0.conv`): the channel group each
    conv produces, the channels kept by the first metric's plan, and, where the run applied N:M masks, whether
    each layer took them (and why not); a run that applied none has no such column.

    Example:
        >>> layer = {"name": "net.fc", "kind": "linear", "shape": [10, 16], "eligible": True, "reason": ""}
        >>> print(layer_table({"layers": [layer], "results": []}).splitlines()[2])
        | net.fc | linear | 10x16       | -             | -             |
    """
    groups: dict[str, dict[str, Any]] = {}
    if result.get("results"):
        for g in result["results"][0]["plan"]["groups"]:
            groups.update({member: g for member in g["members"]})
    masked, nm = masked_layers(result), pattern_label(result)
    rows = []
    for e in result["layers"]:
        g = groups.get(e["name"])
        kept = f"{g['original']} -> {len(g['keep'])} ({100 * g['real_ratio']:.0f}% pruned)" if g else "-"
        kept += f"; {g['note']}" if g and g.get("note") else ""  # grouped convs: how the count was cut, or why not
        row = [e["name"], e["kind"], "x".join(map(str, e["shape"])), g["name"] if g else "-", kept]
        if masked:
            why = e["reason"] if not e["eligible"] else "eligible, not chosen by --nm-where"
            row.append(nm if e["name"] in masked else f"dense: {why}")
        rows.append(row)
    headers = ["layer", "kind", "dense shape", "channel group", "channels kept"]
    return markdown_table(headers + ([nm] if masked else []), rows)


def latency_tables(result: dict[str, Any]) -> str:
    """For each metric pruned to a latency target: the target, the dense and pruned latency predicted beside
    measured, every solve, and per channel group the kept count, its predicted saving and whether its layers run
    2:4 ('' when no metric ran with a latency target).

    Example:
        >>> latency_tables({"results": [{"metric": "l1"}]})
        ''
    """
    parts = []
    for r in result.get("results", []):
        lat = r.get("latency")
        if not lat:
            continue
        d, p = lat["dense_ms"], lat["pruned_ms"]
        parts.append(
            f"{r['metric']}: target {lat['target']:g} x {d['median']:.3f} ms = {lat['target_ms']:.3f} ms on "
            f"{lat['device']} ({lat['runtime']}, batch {lat['batch']}, {lat['dtype']}, {lat['threads']} threads); "
            f"pruned: predicted {p['predicted']:.3f} ms, measured {p['median']:.3f} ms "
            f"(p10-p90 {p['p10']:.3f}-{p['p90']:.3f}), "
            f"{100 * (p['median'] / lat['target_ms'] - 1):+.1f}% off the target after {len(lat['solves'])} solve(s)"
            f"{' (exact)' if lat['exact'] else ''}; 2:4 ({lat['nm_rule']}) on {len(lat['sparse_layers'])} layer(s)"
            + (f"; {lat['notice']}" if lat.get("notice") else "")
        )
        sparse = set(lat["sparse_layers"])
        members = {g["name"]: g["members"] for g in r.get("plan", {}).get("groups", [])}
        rows = [
            [g["group"], f"{g['size']} -> {g['kept']}", f"{g['predicted_saving_ms']:.3f}",
             "2:4" if sparse & set(members.get(g["group"], ())) else "dense"]
            for g in lat["groups"]
        ]  # fmt: skip
        parts.append(markdown_table(["channel group", "channels kept", "predicted saving ms", "layers"], rows))
    return "\n\n".join(parts)


def bench_tables(result: dict[str, Any]) -> str:
    """Latency/throughput per variant and the speedup ratios of one `hybridprune bench` result."""
    runs = [
        [
            r["variant"],
            r["mode"],
            r["dtype"],
            str(r["batch_size"]),
            f"{r['latency_ms_median']:.3f}",
            f"{100 * _spread(r):.0f}%",
            f"{r['latency_ms_p10']:.3f}",
            f"{r['latency_ms_p90']:.3f}",
            f"{r['throughput']:.0f}",
            format_accuracy(r.get("accuracy")),
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
            format_count(s["weight_bytes_dense"]),
            format_count(s["weight_bytes_compressed"]),
            format_count(s["weight_bytes_as_run"]),
        ]
        for s in result["weight_bytes"]
    ]
    return "\n\n".join(
        [
            markdown_table(
                ["variant", "mode", "dtype", "batch", "median ms", "spread", "p10 ms", "p90 ms", "images/s",
                 "accuracy"],
                runs,
            ),
            markdown_table(
                ["mode", "dtype", "batch", "filter/dense", "nm/dense", "hybrid/dense", "hybrid/filter", "hybrid/nm"],
                ratios,
            ),
            markdown_table(["variant", "dtype", "weight bytes dense", "N:M compressed", "as run"], sizes),
        ]
    )


def _spread(run: dict[str, Any]) -> float:
    """The p10-p90 width of a timing as a share of its median (computed for benches written before it was kept)."""
    if "spread" in run:
        return run["spread"]
    return (run["latency_ms_p90"] - run["latency_ms_p10"]) / run["latency_ms_median"]


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


# --- experiment grids (from the store's rows) ---------------------------------------------------------


def accuracy_table(rows: list[dict[str, Any]], column: str) -> tuple[list[str], list[list[str]]]:
    """Rows per (dataset, model, metric), one column per ratio, cells 'mean +- std (n)'."""
    groups = group_rows(rows, column)
    ratios = sorted({k[4] for k in groups})
    setups = sorted({k[:4] for k in groups}, key=lambda k: (k[0], k[1], k[2], metric_order(k[3])))
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


def dataset_label(name: str) -> str:
    """A dataset's name for titles: `npz:../data/cifar10` -> `cifar10`, registered names as they are.

    Example:
        >>> dataset_label("npz:../shared/data/cifar10/"), dataset_label("digits")
        ('cifar10', 'digits')
    """
    if name.startswith("npz:"):
        return Path(name[4:]).name.removesuffix(".npz") or name
    return name
