"""A job's deployed forms (`run --deploy`): which of its models are deployed, and the table that shows them.

The measuring is `deploy.deployment`'s; this module only names a result's variants (dense, 2:4-only, each
metric's filter-pruned and filter+2:4 models, as the run table names them) and prints what was measured.
"""

from __future__ import annotations

from typing import Any

from hybridprune.deploy.deployment import Variant
from hybridprune.experiments.statistics import mean_std, run_label
from hybridprune.experiments.tables import format_accuracy, markdown_table, pattern_label
from hybridprune.parse import loads_json
from hybridprune.pruning.checkpoint import load_checkpoint

DEPLOY_FOLDER = "deploy"  # inside a run folder: the deployed files and each form's record


def variant_stages(result: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(name, stage record) of every model a job result holds, dense first, named as the run table names them.

    Example:
        >>> s = {"accuracy": 90.0, "checkpoint": "x"}
        >>> [n for n, _ in variant_stages({"dense": s, "nm": s, "results": [{"metric": "l1", "filter": s}]})]
        ['dense', '2:4 only', 'l1 filter']
    """
    nm = pattern_label(result)
    stages = [("dense", result["dense"])]
    if result.get("nm"):
        stages.append((f"{nm} only", result["nm"]))
    for r in result["results"]:
        stages.append((f"{r['metric']} filter", r["filter"]))
        if r.get("hybrid"):
            stages.append((f"{r['metric']} filter+{nm}", r["hybrid"]))
    return stages


def load_variants(result: dict[str, Any], model: str) -> list[Variant]:
    """Every model of a job result, loaded from its checkpoint on the CPU (`model`: the run's model name, so a
    user's factory is named again), with its PyTorch top-1."""
    variants = []
    for name, stage in variant_stages(result):
        net, masks, _ = load_checkpoint(stage["checkpoint"], model)
        variants.append(Variant(name, net.cpu().eval(), masks, stage.get("accuracy")))
    return variants


def deployed_table(deployed: dict[str, Any]) -> str:
    """Each deployed form: its top-1 as trained (PyTorch) and in its runtime, and at each timed batch its median
    latency (10th-90th percentile) and speedup over the baseline (the dense model in the record's baseline runtime,
    ONNX Runtime fp32 where installed, timed in the same rounds).

    Example:
        >>> at_64 = {"median_ms": 2.0, "p10_ms": 1.9, "p90_ms": 2.2, "speedup": 7.5}
        >>> form = {"variant": "dense", "runtime": "openvino", "precision": "int8", "trained_top1": 91.0,
        ...         "top1": 90.5, "latency": {"64": at_64}}
        >>> [cell.strip() for cell in deployed_table({"forms": [form], "batch_sizes": [64]}).splitlines()[2].split("|")]
        ['', 'dense', 'openvino', 'int8', '91.00', '90.50', '-0.50', '2.000 (1.900-2.200)', '7.50x', '']
    """
    batches = [str(b) for b in deployed["batch_sizes"]]
    headers = ["variant", "runtime", "precision", "top-1 (PyTorch)", "top-1 deployed", "change"]
    headers += [h for b in batches for h in (f"ms at batch {b} (p10-p90)", f"x at {b}")]
    rows = []
    for f in deployed["forms"]:
        trained = f.get("trained_top1")
        change = "-" if trained is None else f"{f['top1'] - trained:+.2f}"
        floats = len(f.get("float_layers", []))
        precision = f"{f['precision']} ({floats} float)" if floats else f["precision"]  # precision per layer
        row = [f["variant"], f["runtime"], precision, format_accuracy(trained), format_accuracy(f["top1"]), change]
        for b in batches:
            t = f["latency"][b]
            row += [f"{t['median_ms']:.3f} ({t['p10_ms']:.3f}-{t['p90_ms']:.3f})", f"{t['speedup']:.2f}x"]
        rows.append(row)
    return markdown_table(headers, rows)


def fastest_within(deployed: dict[str, Any], dense_top1: float, points: float = 1.0) -> dict[str, Any] | None:
    # `points`: what "as accurate" means to the caller (1 point by default, the goal)
    """The fastest deployed form at the largest timed batch whose top-1 in its runtime is within `points` of the
    dense model's PyTorch top-1 (None when no form is).

    Example:
        >>> forms = [{"top1": 89.0, "latency": {"64": {"median_ms": 1.0}}},
        ...          {"top1": 90.5, "latency": {"64": {"median_ms": 2.0}}}]
        >>> fastest_within({"forms": forms, "batch_sizes": [1, 64]}, 91.0)["top1"]
        90.5
    """
    batch = str(max(deployed["batch_sizes"]))
    close = [f for f in deployed["forms"] if f["top1"] >= dense_top1 - points]
    return min(close, key=lambda f: f["latency"][batch]["median_ms"]) if close else None


def grid_deployed_table(rows: list[dict[str, Any]]) -> str:
    """The deployed forms of a grid's runs, over seeds: per setup (dataset, model, run, ratio), variant and
    precision, the runtime(s) chosen, top-1 in the runtime and its change from PyTorch (mean ± std), and the mean
    speedup over dense ONNX Runtime fp32 at each batch ('' when no run deployed anything).

    Example:
        >>> import json
        >>> form = {"variant": "l1 filter", "runtime": "openvino", "precision": "int8", "trained_top1": 90.0,
        ...         "top1": 89.5, "latency": {"64": {"speedup": 8.0}}}
        >>> row = lambda seed: {"dataset": "cifar10", "model": "alexnet", "width": 0.5, "metric": "l1", "ratio": 0.4,
        ...     "seed": seed, "result": json.dumps({"deployed": {"batch_sizes": [64], "forms": [form]}})}
        >>> [c.strip() for c in grid_deployed_table([row(0), row(1)]).splitlines()[2].split("|")[5:12]]
        ['l1 filter', 'openvino', 'int8', '89.50 ± 0.00', '-0.50 ± 0.00', '8.00x', '2']
    """
    groups: dict[tuple, list[tuple[int, dict[str, Any]]]] = {}
    batches: dict[str, None] = {}
    for row in rows:
        deployed = loads_json(row["result"], "a result in the store").get("deployed")
        for form in (deployed or {}).get("forms", []):
            setup = (row["dataset"], f"{row['model']} w{row['width']:g}", run_label(row), f"{row['ratio']:.2f}")
            key = (*setup, form["variant"], form["runtime"], form["precision"])
            groups.setdefault(key, []).append((row["seed"], form))
            batches |= dict.fromkeys(form["latency"])
    if not groups:
        return ""
    body = []
    for key, seeded in sorted(groups.items()):
        forms = [f for _, f in seeded]
        top1 = mean_std([f["top1"] for f in forms])
        change = mean_std([f["top1"] - f["trained_top1"] for f in forms])
        speed = [_mean_speedup(forms, b) for b in batches]
        seeds = str(len({s for s, _ in seeded}))
        body.append([*key, f"{top1[0]:.2f} ± {top1[1]:.2f}", f"{change[0]:+.2f} ± {change[1]:.2f}", *speed, seeds])
    headers = ["dataset", "model", "run", "ratio", "variant", "runtime", "precision", "top-1 deployed",
               "change", *(f"x at {b}" for b in batches), "seeds"]  # fmt: skip
    return markdown_table(headers, body)


def _mean_speedup(forms: list[dict[str, Any]], batch: str) -> str:
    values = [f["latency"][batch]["speedup"] for f in forms if batch in f["latency"]]
    return f"{sum(values) / len(values):.2f}x" if values else "-"
