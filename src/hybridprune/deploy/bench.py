"""Latency and throughput of model variants: dense, filter-pruned, N:M-only and hybrid, in one run.

Variants are timed round-robin (a few calls of each in turn, many rounds), so a noisy machine
slows them alike and the ratios stay meaningful. CUDA timing uses events after a warm-up.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from hybridprune.config import NMPattern
from hybridprune.deploy.export import onnxruntime_session
from hybridprune.deploy.runtimes.pytorch import cuda_graph_call, eager_call
from hybridprune.deploy.sparse import InferenceModel, to_inference_model
from hybridprune.deploy.timing import busy_note, time_calls
from hybridprune.errors import HybridPruneError
from hybridprune.models import sources
from hybridprune.models.sources import build_model, input_shape
from hybridprune.parse import read_json
from hybridprune.pruning.checkpoint import load_checkpoint
from hybridprune.pruning.graph import as_example
from hybridprune.pruning.metrics import ScoringContext, score_filters
from hybridprune.pruning.nm import nm_prune_
from hybridprune.pruning.plan import apply_filter_plan_, plan_filter_pruning

VARIANTS = ("dense", "filter", "nm", "hybrid")
MAX_BATCH = 65_536


@dataclass
class Variant:
    """One model to time: its name (dense, filter, nm, hybrid), weights, masks and known accuracy."""

    name: str
    model: nn.Module
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    accuracy: float | None = None
    source: str = "synthetic"


def parse_batch_sizes(text: str) -> list[int]:
    """'1,16,64' -> [1, 16, 64]; anything but positive integers is bad input."""
    try:
        sizes = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        sizes = []
    if not sizes or any(not (1 <= s <= MAX_BATCH) for s in sizes):
        raise HybridPruneError(f"batch sizes must be integers in [1, {MAX_BATCH}] separated by commas, got {text!r}")
    return sizes


def parse_dtypes(text: str) -> list[torch.dtype]:
    from hybridprune.deploy.sparse import DTYPES_BY_NAME

    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [n for n in names if n not in DTYPES_BY_NAME]
    if bad or not names:
        raise HybridPruneError(f"unknown dtype {', '.join(bad) or text!r}; valid: {', '.join(DTYPES_BY_NAME)}")
    return [DTYPES_BY_NAME[n] for n in names]


# --- building the variants ------------------------------------------------------------------------


def variants_from_run(out_dir: str | Path, metric: str | None = None, user_model: str | None = None) -> list[Variant]:
    """The variants saved by `hybridprune run` in OUT_DIR, with their test accuracies: dense, filter-pruned, and the
    2:4-only and hybrid models where the run made them (a run that applied no 2:4 made neither)."""
    out = Path(out_dir)
    results_file = out / "results.json"
    if not results_file.is_file():
        raise HybridPruneError(f"{out} is not a finished `hybridprune run` folder (no results.json)")
    result = read_json(results_file, "run results")
    metrics = [r["metric"] for r in result["results"]]
    metric = metric or ("hybrid" if "hybrid" in metrics else metrics[0])
    if metric not in metrics:
        raise HybridPruneError(f"metric {metric!r} is not in {out}; it has {', '.join(metrics)}")
    item = next(r for r in result["results"] if r["metric"] == metric)
    if "nm" not in result and "hybrid" in item:
        raise HybridPruneError(f"{out} has no 2:4-only model (made by `hybridprune run`, not by `prune`)")
    paths = {"dense": result["dense"], "filter": item["filter"], "nm": result.get("nm"), "hybrid": item.get("hybrid")}
    return [
        variant_from_file(name, out / Path(stage["checkpoint"]).name, stage.get("accuracy"), user_model)
        for name, stage in paths.items()
        if stage
    ]


def variants_from_checkpoints(paths: dict[str, str], user_model: str | None = None) -> list[Variant]:
    """Variants from explicit checkpoint files, keyed by variant name."""
    return [variant_from_file(name, Path(path), None, user_model) for name, path in paths.items() if path]


def variant_from_file(name: str, path: Path, accuracy: float | None = None, user_model: str | None = None) -> Variant:
    """The variant `name` from one checkpoint file; the nm and hybrid variants must carry N:M masks."""
    model, masks, _ = load_checkpoint(path, user_model)
    if name in ("nm", "hybrid") and not masks:
        raise HybridPruneError(f"{path} has no N:M masks, so it cannot be the {name} variant")
    return Variant(name, model, masks, accuracy, str(path))


def synthetic_variants(
    width: float | None = None,
    channels: int = 3,
    image_size: int = 32,
    num_classes: int = 10,
    filter_ratio: float = 0.4,
    round_to: int = 16,
    pattern: NMPattern = NMPattern(),
    model: str = "alexnet",
    seed: int = 0,
) -> list[Variant]:
    """Untrained variants of the right shapes, for any model: speed does not depend on trained weights.

    Example:
        >>> [v.name for v in synthetic_variants(width=0.125, round_to=8)]
        ['dense', 'filter', 'nm', 'hybrid']
    """
    torch.manual_seed(seed)
    dense = build_model(model, in_channels=channels, num_classes=num_classes, image_size=image_size, width=width)
    filtered = copy.deepcopy(dense)
    ctx = ScoringContext(filtered, seed=seed)
    apply_filter_plan_(filtered, plan_filter_pruning(score_filters("random", ctx), filter_ratio, round_to, ctx.groups))
    nm, hybrid = copy.deepcopy(dense), copy.deepcopy(filtered)
    return [
        Variant("dense", dense),
        Variant("filter", filtered),
        Variant("nm", nm, nm_prune_(nm, pattern)),
        Variant("hybrid", hybrid, nm_prune_(hybrid, pattern)),
    ]


# --- timing -------------------------------------------------------------------------------------


def weight_bytes(inference: InferenceModel, variant: Variant, dtype: torch.dtype, pattern: NMPattern) -> dict:
    """Bytes of conv and linear weights: as run, and with every N:M layer compressed (values + 2-bit indices)."""
    elem = torch.finfo(dtype).bits // 8
    dense = compressed = run = 0
    modules = dict(variant.model.named_modules())
    sparse = set(inference.sparse_layers)
    for name, m in modules.items():
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        full = m.weight.numel() * elem
        packed = int(m.weight.numel() * pattern.density * (elem + 0.25)) if name in variant.masks else full
        dense, compressed, run = dense + full, compressed + packed, run + (packed if name in sparse else full)
    return {"weight_bytes_dense": dense, "weight_bytes_compressed": compressed, "weight_bytes_as_run": run}


def _ort_forward(session: Any, x: torch.Tensor) -> Callable[[], object]:
    feed = {"images": x.cpu().numpy()}
    return lambda: session.run(None, feed)


def _summary(
    variant: Variant, mode: str, batch: int, dtype: torch.dtype, device: torch.device, times: list[float]
) -> dict[str, Any]:
    t = torch.tensor(times)
    median = float(t.quantile(0.5))
    return {
        "variant": variant.name,
        "mode": mode,
        "batch_size": batch,
        "dtype": str(dtype).replace("torch.", ""),
        "device": str(device),
        "latency_ms_median": median,
        "latency_ms_p10": float(t.quantile(0.1)),
        "latency_ms_p90": float(t.quantile(0.9)),
        "spread": float(t.quantile(0.9) - t.quantile(0.1)) / median,  # p10-p90 width as a share of the median
        "throughput": batch / median * 1e3,
        "samples": len(times),
        "accuracy": variant.accuracy,
    }


def bench(
    variants: Sequence[Variant],
    device: torch.device,
    dtypes: Sequence[torch.dtype],
    batch_sizes: Sequence[int],
    *,
    rounds: int = 10,
    calls: int = 5,
    warmup: int = 3,
    choose: str = "sparse",
    cuda_graphs: bool = True,
    pattern: NMPattern = NMPattern(),
    progress: bool = True,
    onnxruntime: bool = False,
    example_inputs: torch.Tensor | None = None,
    deployments: Sequence[tuple[str, str]] = (),
    threads: int | None = None,
) -> dict[str, Any]:
    """Time every variant at every batch size and dtype; returns runs, per-layer kernels and weight bytes.

    `onnxruntime`: also time each variant exported to ONNX and run by ONNX Runtime (CPU, float32 only).
    `deployments`: also time each variant in these (runtime, precision) pairs (`deploy.quantize.timing_session`;
    their rows carry the runtime as mode and the precision as dtype, timed with the first dtype's rounds).
    Variants may hold any nn.Module: `example_inputs` (a batch they take) gives the input shape that plain
    modules do not know; its values are not used (timed batches are random).

    Example:
        >>> import torchvision
        >>> from hybridprune.pruning.nm import nm_prune_
        >>> dense = torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.25)
        >>> x = torch.zeros(1, 3, 32, 32)
        >>> nm = copy.deepcopy(dense)
        >>> variants = [Variant("dense", dense), Variant("nm", nm, nm_prune_(nm, example_inputs=x))]
        >>> out = bench(variants, torch.device("cpu"), [torch.float32], [2], rounds=1, calls=1, warmup=0,
        ...             progress=False, example_inputs=x)
        >>> sorted({r["variant"] for r in out["runs"]})
        ['dense', 'nm']
    """
    if onnxruntime and (device.type != "cpu" or any(d != torch.float32 for d in dtypes)):
        raise HybridPruneError("the onnxruntime variant runs on the CPU in float32 only")
    example = None if example_inputs is None else as_example(example_inputs)[:1].cpu()
    sessions = {v.name: onnxruntime_session(v.model, example_inputs=example) for v in variants} if onnxruntime else {}
    deployed = deployment_sessions(variants, deployments, device, example, threads)
    runs: list[dict[str, Any]] = []
    layers: list[dict[str, Any]] = []
    sizes: list[dict[str, Any]] = []
    notices: set[str] = set()
    total = len(dtypes) * len(batch_sizes) * rounds
    busy = busy_note(torch.get_num_threads()) if device.type == "cpu" else None  # said before and after timing
    bar = tqdm(total=total, desc="bench", unit="round", disable=None if progress else True, leave=False)
    for dtype in dtypes:
        for batch in batch_sizes:
            x = torch.rand(batch, *input_shape(variants[0].model, example), device=device, dtype=dtype)
            converted = {
                v.name: to_inference_model(v.model, v.masks, device, dtype, choose=choose, pattern=pattern, example=x)
                for v in variants
            }
            layers += _layer_rows(converted, batch, dtype)
            if batch == batch_sizes[0]:  # weights do not depend on the batch
                sizes += _weight_rows(variants, converted, dtype, pattern)
            extra = {("onnxruntime", name): _ort_forward(s, x) for name, s in sessions.items()}
            if dtype == dtypes[0]:
                extra |= {key: s.bound(x.float()) for key, s in deployed.items()}
            runs += _time_round_robin(
                variants, converted, x, device, dtype, rounds, calls, warmup, cuda_graphs, bar, extra
            )
            notices |= {c.notice.strip() for c in converted.values() if c.notice}
    bar.close()
    for r in runs:  # a deployment's mode is RUNTIME:PRECISION: the runtime is its mode, the precision its dtype
        r["mode"], r["dtype"] = r["mode"].split(":") if ":" in r["mode"] else (r["mode"], r["dtype"])
    busy = busy or (busy_note(torch.get_num_threads()) if device.type == "cpu" else None)
    return {
        "notices": sorted(notices) + [n for n in (busy, spread_note(runs)) if n],
        "runs": runs,
        "speedups": speedups(runs),
        "layers": layers,
        "weight_bytes": sizes,
    }


SPREAD_NOTE = 0.25  # timings whose p10-p90 width exceeds this share of their median are called out


def spread_note(runs: list[dict[str, Any]]) -> str | None:
    """A line when some timings spread widely (p10 to p90 over SPREAD_NOTE of the median), or None.

    Example:
        >>> spread_note([{"spread": 0.1}]) is None, spread_note([{"spread": 0.6}, {"spread": 0.1}])[:50]
        (True, '1 of 2 timings spread by more than 25% of their me')
    """
    wide = [r["spread"] for r in runs if r["spread"] > SPREAD_NOTE]
    if not wide:
        return None
    return (f"{len(wide)} of {len(runs)} timings spread by more than {SPREAD_NOTE:.0%} of their median (p10-p90, up "
            f"to {max(wide):.0%}): rerun with more --rounds on a quiet machine")  # fmt: skip


def deployment_sessions(
    variants: Sequence[Variant],
    pairs: Sequence[tuple[str, str]],
    device: torch.device,
    example: torch.Tensor | None,
    threads: int | None = None,
) -> dict[tuple[str, str], Any]:
    """(f"{runtime}:{precision}", variant name) -> a session of the variant there, for timing."""
    from hybridprune.deploy.quantize import timing_session

    x = torch.zeros(1, *input_shape(variants[0].model, example), device=device) if pairs else None
    return {(f"{rt}:{p}", v.name): timing_session(v.model, x, rt, p, threads) for rt, p in pairs for v in variants}


def _layer_rows(converted: dict[str, InferenceModel], batch: int, dtype: torch.dtype) -> list[dict[str, Any]]:
    """Which kernel each layer of each converted variant runs, and why, at one batch size and dtype."""
    return [
        {"variant": name, "batch_size": batch, "dtype": _dtype_name(dtype), **layer.__dict__}
        for name, c in converted.items()
        for layer in c.layers
    ]


def _weight_rows(
    variants: Sequence[Variant], converted: dict[str, InferenceModel], dtype: torch.dtype, pattern: NMPattern
) -> list[dict[str, Any]]:
    """Each variant's weight bytes in one dtype (`weight_bytes`)."""
    return [
        {"variant": v.name, "dtype": _dtype_name(dtype), **weight_bytes(converted[v.name], v, dtype, pattern)}
        for v in variants
    ]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _time_round_robin(
    variants: Sequence[Variant],
    converted: dict[str, InferenceModel],
    x: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype,
    rounds: int,
    calls: int,
    warmup: int,
    cuda_graphs: bool,
    bar: tqdm,
    extra_modes: dict[tuple[str, str], Callable[[], object]] | None = None,
) -> list[dict[str, Any]]:
    modes = {("eager", v.name): eager_call(converted[v.name].model, x) for v in variants}
    modes.update(extra_modes or {})
    if cuda_graphs and device.type == "cuda":
        for v in variants:
            try:
                modes[("cuda_graph", v.name)] = cuda_graph_call(converted[v.name].model, x)
            except Exception as e:  # noqa: BLE001 - a kernel that cannot be captured: report eager only, and say why
                converted[v.name].notice += f" cuda graph capture failed: {str(e).splitlines()[0]}"
    times: dict[tuple[str, str], list[float]] = {key: [] for key in modes}
    for fn in modes.values():
        time_calls(fn, 0, device, warmup)
    for _ in range(rounds):
        for key, fn in modes.items():
            times[key] += time_calls(fn, calls, device, warmup=0)
        bar.update(1)
    by_name = {v.name: v for v in variants}
    return [_summary(by_name[name], mode, x.shape[0], dtype, device, t) for (mode, name), t in times.items()]


def speedups(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Throughput ratios at each (mode, dtype, batch): every variant over dense, hybrid over filter and over nm."""
    table: dict[tuple, dict[str, float]] = {}
    for r in runs:
        table.setdefault((r["mode"], r["dtype"], r["batch_size"]), {})[r["variant"]] = r["throughput"]
    out = []
    for (mode, dtype, batch), tp in table.items():
        row: dict[str, Any] = {"mode": mode, "dtype": dtype, "batch_size": batch}
        for name in ("filter", "nm", "hybrid"):
            if name in tp and "dense" in tp:
                row[f"{name}_over_dense"] = tp[name] / tp["dense"]
        for base in ("filter", "nm"):
            if "hybrid" in tp and base in tp:
                row[f"hybrid_over_{base}"] = tp["hybrid"] / tp[base]
        out.append(row)
    return out


def model_label(variant: Variant) -> str:
    return sources.model_label(variant.model)
