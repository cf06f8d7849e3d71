"""Precision per layer: which layers of an INT8 file stay in float, chosen from what each costs in accuracy and
buys in time, both measured. Only convs and linears are quantized here (their inputs and weights; adds and pooling
run in float), so every layer in float is exactly the fp32 graph.

A layer whose INT8 costs accuracy may stay in float where the budget allows (as Neural Compressor's fallback does,
but ordered by measurements of both sides):
1. **sensitivity**: for each quantizable layer (Conv, Gemm, MatMul), the graph with only that layer in INT8 is run
   on validation images (training images, never the test split); its sensitivity is the mean squared error of its
   logits against the fp32 graph's, relative to their mean square;
2. **cost**: the graph with every layer in INT8 but that one, timed round-robin with the all-INT8 graph in the
   target runtime: what keeping it in float costs in ms (a measured, in-context difference: the quantize and
   dequantize nodes it removes or adds are paid where they occur);
3. **solve**: layers ordered by sensitivity per ms of cost (the most accuracy for the least time first); the
   smallest prefix kept in float whose validation top-1, measured in the runtime, is within `max_drop` points of
   the fp32 graph's. The prefix length is found by doubling then bisection (O(log n) measured probes), which is
   exact where accuracy does not fall as more layers stay float along that order; every probe is recorded.

Calibration runs once (ONNX Runtime's calibration cache); every variant reuses its ranges.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hybridprune.deploy.runtimes import interleaved_times, load_onnx, quantiles

QUANTIZABLE_OPS = ("Conv", "Gemm", "MatMul")
MIN_COST_MS = 1e-3  # a layer whose float form measured no slower counts as this cheap (never divide by 0 or less)


@dataclass
class MixedPrecision:
    """The layers kept in float (graph node names), what was measured to choose them, and every probe."""

    float_nodes: list[str]
    fp32_top1: float  # validation top-1 of the fp32 graph, in the runtime
    int8_top1: float  # validation top-1 of the chosen file
    all_int8_top1: float
    max_drop: float
    validation_images: int
    sensitivity: dict[str, float] = field(default_factory=dict)
    float_cost_ms: dict[str, float] = field(default_factory=dict)
    probes: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def quantizable_nodes(path: Path) -> list[str]:
    """The names of the nodes INT8 would quantize (convs, linears), in graph order."""
    import onnx

    return [n.name for n in onnx.load(str(path)).graph.node if n.op_type in QUANTIZABLE_OPS]


def fallback_order(sensitivity: dict[str, float], cost_ms: dict[str, float]) -> list[str]:
    """Nodes by sensitivity per ms that keeping them in float costs, largest first (ties: graph order).

    Example:
        >>> fallback_order({"a": 0.1, "b": 0.4, "c": 0.4}, {"a": 1.0, "b": 4.0, "c": 1.0})
        ['c', 'a', 'b']
    """
    names = list(sensitivity)
    return sorted(names, key=lambda n: (-sensitivity[n] / max(cost_ms.get(n, 0.0), MIN_COST_MS), names.index(n)))


def shortest_prefix(count: int, good: Callable[[int], bool]) -> int:
    """The smallest k in [0, count] with good(k), probing 0, 1, 2, 4, ... then bisecting; good(count) is taken
    as true without probing it (every layer float is the fp32 graph).

    Example:
        >>> probed = []
        >>> shortest_prefix(20, lambda k: probed.append(k) or k >= 5), probed
        (5, [0, 1, 2, 4, 8, 6, 5])
    """
    if good(0):
        return 0
    low, k = 0, 1  # good(low) is False
    while k < count and not good(k):
        low, k = k, min(2 * k, count)
    high = k  # good(high), or high == count: every layer float, the fp32 graph, within any drop (never probed)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if good(mid) else (mid, high)
    return high


def validation_top1(session: Any, images: list[np.ndarray], labels: list[np.ndarray]) -> float:
    """Top-1 (%) of a runtime session on held-out training images."""
    predicted = [session.run(torch.from_numpy(x)).argmax(1).numpy() for x in images]
    correct = sum(int((p == y).sum()) for p, y in zip(predicted, labels, strict=True))
    return 100.0 * correct / sum(len(y) for y in labels)


def logits(session: Any, images: list[np.ndarray]) -> torch.Tensor:
    return torch.cat([session.run(torch.from_numpy(x)) for x in images])


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean squared error of `out` against `reference`, relative to the reference's mean square.

    Example:
        >>> round(relative_error(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 2.0])), 6)
        0.2
    """
    return float(((out - reference) ** 2).mean() / (reference**2).mean().clamp_min(1e-12))


def time_files(files: list[Path], runtime: str, x: torch.Tensor, rounds: int, threads: int | None) -> list[float]:
    """Median ms of each INT8 file in `runtime` on `x`, timed round-robin."""
    calls = [load_onnx(f, runtime, "int8", threads)[0].bound(x) for f in files]
    return [quantiles(t)[0] for t in interleaved_times(calls, rounds, torch.device("cpu"), warmup=2)]


Make = Callable[..., Path]  # make(name, nodes_to_quantize=None, nodes_to_exclude=None) -> an INT8 file


def choose_float_layers(
    make: Make,
    fp32: Path,
    nodes: list[str],
    runtime: str,
    validation: tuple[list[np.ndarray], list[np.ndarray]],
    timing_input: torch.Tensor,
    max_drop: float,
    rounds: int = 10,
    threads: int | None = None,
) -> tuple[Path, MixedPrecision]:
    """The INT8 file with the fewest layers kept in float whose validation top-1 in `runtime` is within `max_drop`
    points of the fp32 graph's (the module docstring says how), and what was measured to choose it."""
    images, labels = validation
    reference = load_onnx(fp32, runtime, "fp32", threads)[0]
    fp32_top1, ref = validation_top1(reference, images, labels), logits(reference, images)
    sensitivity = {}
    for i, node in enumerate(nodes):
        only = load_onnx(make(f"only-{i}", nodes_to_quantize=[node]), runtime, "int8", threads)[0]
        sensitivity[node] = relative_error(logits(only, images), ref)
    files = [make("all")]
    if len(nodes) > 1:  # one layer alone in float leaves nothing INT8 to time: its order needs no cost
        files += [make(f"but-{i}", nodes_to_exclude=[node]) for i, node in enumerate(nodes)]
        times = time_files(files, runtime, timing_input, rounds, threads)
        cost = {node: t - times[0] for node, t in zip(nodes, times[1:], strict=True)}
    else:
        cost = {node: 0.0 for node in nodes}
    order = fallback_order(sensitivity, cost)
    probes: list[dict[str, Any]] = []

    def good(k: int) -> bool:
        path = files[0] if k == 0 else make(f"float-{k}", nodes_to_exclude=order[:k])
        top1 = validation_top1(load_onnx(path, runtime, "int8", threads)[0], images, labels)
        probes.append({"float_layers": k, "top1": top1, "file": path})
        return top1 >= fp32_top1 - max_drop

    k = shortest_prefix(len(nodes), good)
    chosen = next((p for p in probes if p["float_layers"] == k), None)
    path = chosen["file"] if chosen else fp32  # every layer float: the fp32 graph itself
    result = MixedPrecision(order[:k], fp32_top1, chosen["top1"] if chosen else fp32_top1, probes[0]["top1"],
                            max_drop, sum(len(y) for y in labels), sensitivity, cost,
                            [{k: v for k, v in p.items() if k != "file"} for p in probes])  # fmt: skip
    return path, result
