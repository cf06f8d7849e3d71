"""Latency tables: the measured time of every prunable layer at each channel count its groups can take, dense
and 2:4, on one device and runtime, and the latency of a pruned model predicted as the sum of its entries.

MACs are a model of the hardware; these tables are measurements (HALP, NeurIPS 2022; NetAdapt, ECCV 2018).
An entry is keyed by the layer's shape at a batch size, dtype and runtime (`LayerShape.key`), so layers of the
same shape, in one model or many, share it. A layer's input and output counts each follow a channel group
(`LayerCoupling`); where two groups meet, the table holds a grid of (input, output) counts and a count between
grid points is read by bilinear interpolation of the four measured corners (exact on grid points; between them
it assumes latency is locally linear in channels, which the step functions of real kernels break, so the grid
step is the user's to refine with `--latency-step`). Everything here is data: measuring is `deploy.profile`.
A table is JSON with the device, library versions and date; loading checks every field, and a table measured
on another device is refused, since its numbers say nothing about this one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hybridprune.errors import HybridPruneError
from hybridprune.outputs import write_json
from hybridprune.parse import read_json
from hybridprune.pruning.graph import ChannelGroup

TABLE_FORMAT = "hybridprune-latency-table"
# 3: whole-model measurements in context (`models`) and the device's step structure (`steps`); layer entries only
# where 2:4 is measured (2: ONNX Runtime entries timed with outputs bound once; 1: a fresh output array per call)
TABLE_VERSION = 3
KERNELS = ("dense", "2:4")


@dataclass(frozen=True)
class LayerShape:
    """A conv or linear layer's shape: what its latency depends on besides batch, dtype and runtime."""

    kind: str  # conv | linear
    c_in: int
    c_out: int
    h: int = 1  # input height and width (1 for linear)
    w: int = 1
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    def family(self, batch: int, dtype: str, runtime: str, kernel: str) -> str:
        """The key without channel counts: entries of one family differ only in (c_in, c_out)."""
        depthwise = "dw" if self.groups > 1 and self.groups == self.c_in == self.c_out else f"g{self.groups}"
        k, s, p, d = (f"{a}x{b}" for a, b in (self.kernel, self.stride, self.padding, self.dilation))
        return f"{self.kind}|b{batch}|hw{self.h}x{self.w}|k{k}|s{s}|p{p}|d{d}|{depthwise}|{dtype}|{runtime}|{kernel}"

    def key(self, batch: int, dtype: str, runtime: str, kernel: str) -> str:
        """The entry key: e.g. `conv|b64|hw32x32|k3x3|s1x1|p1x1|d1x1|g1|float32|onnxruntime|dense|16x32`."""
        return f"{self.family(batch, dtype, runtime, kernel)}|{self.c_in}x{self.c_out}"

    def module(self) -> nn.Module:
        """A freshly initialised layer of this shape (for measuring)."""
        if self.kind == "linear":
            return nn.Linear(self.c_in, self.c_out)
        return nn.Conv2d(self.c_in, self.c_out, self.kernel, self.stride, self.padding, self.dilation, self.groups)

    def input_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, self.c_in) if self.kind == "linear" else (batch, self.c_in, self.h, self.w)


@dataclass(frozen=True)
class LayerCoupling:
    """How one conv or linear layer's channel counts follow the channel groups.

    `out_group` sets its output channels (None: fixed, e.g. the head); `in_parts` are the groups that feed its
    input with how many of its dense input channels (or features, after a flatten) each one holds; the rest
    of its input is fixed. A depthwise conv's input count and groups equal its output count.
    """

    name: str
    dense: LayerShape
    out_group: str | None
    out_size: int  # the out group's dense size (channels of the layer per group channel: dense.c_out / out_size)
    in_parts: tuple[tuple[str, int, int], ...]  # (group, its dense size, input channels it holds)
    depthwise: bool = False

    def shape(self, counts: dict[str, int]) -> LayerShape:
        """The layer's shape when each group keeps `counts[group]` channels (missing groups: dense)."""
        c_out = self.dense.c_out
        if self.out_group is not None:
            c_out = self.dense.c_out * counts.get(self.out_group, self.out_size) // self.out_size
        if self.depthwise:
            return _replace(self.dense, c_in=c_out, c_out=c_out, groups=c_out)
        c_in = self.dense.c_in
        for group, size, held in self.in_parts:
            c_in += held * counts.get(group, size) // size - held
        return _replace(self.dense, c_in=c_in, c_out=c_out)


def _replace(shape: LayerShape, **changes: int) -> LayerShape:
    return LayerShape(**{**asdict(shape), **changes})


@torch.no_grad()
def layer_couplings(model: nn.Module, groups: list[ChannelGroup], example: torch.Tensor) -> list[LayerCoupling]:
    """Every conv and linear layer the forward pass calls, in order, with the groups its counts follow.

    Example:
        >>> from hybridprune.models.sources import build_model
        >>> from hybridprune.pruning.graph import channel_groups, dependency_graph, example_input
        >>> m = build_model("alexnet", width=0.25)
        >>> c = layer_couplings(m, channel_groups(m, dependency_graph(m)), example_input(m))
        >>> c[1].name, c[1].dense.c_in, c[1].in_parts, c[1].out_group
        ('net.features.2.conv', 16, (('net.features.0.conv', 16, 16),), 'net.features.2.conv')
    """
    inputs = _input_sizes(model, example)
    out_of = {p.name: g for g in groups for p in g.producers}
    parts: dict[str, list[tuple[str, int, int]]] = {}
    for g in groups:
        for consumer, held in g.consumers:
            parts.setdefault(consumer, []).append((g.name, g.size, held))
    couplings = []
    for name, (h, w) in inputs.items():
        module = model.get_submodule(name)
        group = out_of.get(name)
        dense = _shape_of(module, h, w)
        depthwise = dense.kind == "conv" and dense.groups > 1 and dense.groups == dense.c_in == dense.c_out
        couplings.append(
            LayerCoupling(
                name,
                dense,
                group.name if group else None,
                group.size if group else dense.c_out,
                tuple(parts.get(name, ())),
                depthwise,
            )  # fmt: skip
        )
    return couplings


def _input_sizes(model: nn.Module, example: torch.Tensor) -> dict[str, tuple[int, int]]:
    """Input height and width of every conv and linear layer, in the order the forward pass calls them."""
    sizes: dict[str, tuple[int, int]] = {}

    def record(name: str):  # noqa: ANN202 - a forward hook
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            sizes.setdefault(name, tuple(inputs[0].shape[2:4]) if inputs[0].dim() == 4 else (1, 1))

        return hook

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    handles = [m.register_forward_hook(record(n)) for n, m in layers]
    was_training = model.training
    try:
        model.eval()
        model(example[:1])
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return sizes


def _shape_of(module: nn.Module, h: int, w: int) -> LayerShape:
    if isinstance(module, nn.Linear):
        return LayerShape("linear", module.in_features, module.out_features)
    if isinstance(module.padding, str):
        raise HybridPruneError(f"a conv with padding={module.padding!r} cannot be profiled yet; use numeric padding")
    return LayerShape("conv", module.in_channels, module.out_channels, h, w, tuple(module.kernel_size),
                      tuple(module.stride), tuple(module.padding), tuple(module.dilation), module.groups)  # fmt: skip


# --- the table -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One measured latency: the median and the 10th and 90th percentiles of interleaved repeats, in ms."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int


@dataclass
class LatencyTable:
    """Measured layer latencies on one device, and each profiled model's rest-of-network constant.

    Example:
        >>> t = LatencyTable("cpu-test")
        >>> s = LayerShape("linear", 8, 8)
        >>> t.add(s.key(1, "float32", "torch", "dense"), Entry(0.5, 0.4, 0.6, 9))
        >>> t.lookup(s, 1, "float32", "torch", "dense")
        0.5
    """

    device: str
    versions: dict[str, Any] = field(default_factory=dict)
    date: str = ""
    entries: dict[str, Entry] = field(default_factory=dict)
    rest: dict[str, Entry] = field(default_factory=dict)  # model label and setup -> the rest of the network
    threads: int | None = None
    # model label and setup -> its in-context record (JSON-ready; read with `latency_context.context_record`)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    # runtime, batch, dtype and swept layer -> {"block", "counts", "ms"}: where latency moves with channel counts
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)

    def add(self, key: str, entry: Entry) -> None:
        self.entries[key] = entry
        self._index = None

    def lookup(self, shape: LayerShape, batch: int, dtype: str, runtime: str, kernel: str) -> float | None:
        """The layer's latency: its entry, or a bilinear interpolation of its family's grid; None if neither."""
        key = shape.key(batch, dtype, runtime, kernel)
        exact = self.entries.get(key)
        if exact is not None:
            return exact.median_ms
        families = self._families()
        if key not in self._interpolated:  # the solver asks for the same shapes many times
            grid = families.get(shape.family(batch, dtype, runtime, kernel))
            self._interpolated[key] = None if grid is None else _interpolate(grid, shape.c_in, shape.c_out)
        return self._interpolated[key]

    def _families(self) -> dict[str, dict[tuple[int, int], float]]:
        if getattr(self, "_index", None) is None:
            index: dict[str, dict[tuple[int, int], float]] = {}
            for key, entry in self.entries.items():
                family, _, counts = key.rpartition("|")
                c_in, c_out = (int(v) for v in counts.split("x"))
                index.setdefault(family, {})[(c_in, c_out)] = entry.median_ms
            self._index, self._interpolated = index, {}
        return self._index

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": TABLE_FORMAT,
            "version": TABLE_VERSION,
            "device": self.device,
            "threads": self.threads,
            "date": self.date or datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": self.versions,
            "entries": {k: asdict(e) for k, e in sorted(self.entries.items())},
            "rest": {k: asdict(e) for k, e in sorted(self.rest.items())},
            "models": dict(sorted(self.models.items())),
            "steps": dict(sorted(self.steps.items())),
        }

    def save(self, path: str | Path, record: bool = False) -> Path:
        """Write the table atomically as JSON (`record`: list it among a run folder's files)."""
        return write_json(path, self.to_dict(), record=record)


def _interpolate(grid: dict[tuple[int, int], float], c_in: int, c_out: int) -> float | None:
    """Bilinear interpolation over the smallest measured rectangle around (c_in, c_out) in one family; None
    when no measured rectangle encloses it. Layers of one shape family can be measured on different grids,
    so the rectangle is searched among the nearest measured counts on each side, not read off one product grid.
    """
    if all(i == o for i, o in grid) and c_in == c_out:  # a depthwise family: channels in = out, one dimension
        line = {i: v for (i, _), v in grid.items()}
        pairs = _brackets(sorted(line), c_in)
        if not pairs:
            return None
        lo, hi = min(pairs, key=lambda p: p[1] - p[0])
        return line[lo] if hi == lo else line[lo] + (c_in - lo) / (hi - lo) * (line[hi] - line[lo])
    ins, outs = sorted({i for i, _ in grid}), sorted({o for _, o in grid})
    rectangle = _smallest_rectangle(grid, _brackets(ins, c_in), _brackets(outs, c_out))
    if rectangle is None:
        return None
    i0, i1, o0, o1 = rectangle
    a = 0.0 if i1 == i0 else (c_in - i0) / (i1 - i0)
    b = 0.0 if o1 == o0 else (c_out - o0) / (o1 - o0)
    t00, t01, t10, t11 = grid[(i0, o0)], grid[(i0, o1)], grid[(i1, o0)], grid[(i1, o1)]
    return (1 - a) * ((1 - b) * t00 + b * t01) + a * ((1 - b) * t10 + b * t11)


def _smallest_rectangle(
    grid: dict[tuple[int, int], float], in_pairs: list[tuple[int, int]], out_pairs: list[tuple[int, int]]
) -> tuple[int, int, int, int] | None:
    """The measured rectangle (all four corners in `grid`) of least area (+1 per side, so lines count) among
    the bracketing pairs; pairs are scanned narrowest first and a scan stops once it cannot do better."""
    best, best_area = None, float("inf")
    outs = sorted(out_pairs, key=lambda p: p[1] - p[0])
    for i0, i1 in sorted(in_pairs, key=lambda p: p[1] - p[0]):
        if outs and (i1 - i0 + 1) * (outs[0][1] - outs[0][0] + 1) >= best_area:
            break
        for o0, o1 in outs:
            area = (i1 - i0 + 1) * (o1 - o0 + 1)
            if area >= best_area:
                break
            if all((i, o) in grid for i in (i0, i1) for o in (o0, o1)):
                best, best_area = (i0, i1, o0, o1), area
                break
    return best


def _brackets(values: list[int], x: int, near: int = 12) -> list[tuple[int, int]]:
    """Pairs (low <= x <= high) of measured values, from the `near` closest on each side (x counts as both)."""
    below = [v for v in values if v <= x][-near:]
    above = [v for v in values if v >= x][:near]
    return [(lo, hi) for lo in below for hi in above]


def load_table(path: str | Path, device: str | None = None) -> LatencyTable:
    """Read a table written by `LatencyTable.save`, checking every field; with `device`, refuse another's.

    Every problem is one HybridPruneError line naming the file and what is wrong.
    """
    path = Path(path)
    if not path.exists():
        raise HybridPruneError(f"latency table {path} does not exist; `hybridprune profile` writes one")
    return table_from_dict(read_json(path, "latency table"), str(path), device)


def table_from_dict(raw: Any, where: str, device: str | None = None) -> LatencyTable:
    if not isinstance(raw, dict) or raw.get("format") != TABLE_FORMAT:
        raise HybridPruneError(f"{where} is not a hybridprune latency table (format {TABLE_FORMAT!r} missing)")
    if raw.get("version") != TABLE_VERSION:
        raise HybridPruneError(
            f"{where}: latency table version {raw.get('version')!r}; this version reads {TABLE_VERSION} (timings "
            "of another version do not mix with this one's): profile again"
        )
    missing = [k for k in ("device", "date", "versions", "entries", "rest", "models", "steps") if k not in raw]
    if missing:
        raise HybridPruneError(f"{where}: latency table lacks {', '.join(missing)}")
    if not isinstance(raw["device"], str) or not raw["device"]:
        raise HybridPruneError(f"{where}: device must be a name, got {raw['device']!r}")
    if device is not None and raw["device"] != device:
        raise HybridPruneError(
            f"{where} was measured on {raw['device']!r}, not on this device ({device!r}); profile this device"
        )
    entries = {k: _entry(v, f"{where}: entry {k!r}") for k, v in _mapping(raw["entries"], where, "entries").items()}
    for key in entries:
        _check_key(key, where)
    rest = {
        k: _entry(v, f"{where}: rest {k!r}", allow_negative=True)
        for k, v in _mapping(raw["rest"], where, "rest").items()
    }
    models, steps = _mapping(raw["models"], where, "models"), _mapping(raw["steps"], where, "steps")
    for name, value in (*models.items(), *steps.items()):
        _mapping(value, where, f"record {name!r}")
    threads = raw.get("threads")
    return LatencyTable(raw["device"], dict(raw["versions"]) if isinstance(raw["versions"], dict) else {},
                        str(raw["date"]), entries, rest, threads if isinstance(threads, int) else None,
                        dict(models), dict(steps))  # fmt: skip


# One call of one layer, or of a whole model at the largest batch, takes milliseconds to seconds on any device
# `profile` runs on; a timing of a minute or more is a corrupted or hand-edited table.
MAX_ENTRY_MS = 60_000.0


def _mapping(value: Any, where: str, name: str) -> dict:
    if not isinstance(value, dict):
        raise HybridPruneError(f"{where}: {name} must be a mapping of keys to timings")
    return value


def read_entry(value: Any, where: str) -> Entry:
    """One timing read back from a table, checked (non-negative, finite, bounded); one line otherwise."""
    return _entry(value, where)


def _entry(value: Any, where: str, allow_negative: bool = False) -> Entry:
    names = ("median_ms", "p10_ms", "p90_ms")
    if not isinstance(value, dict) or any(n not in value for n in (*names, "repeats")):
        raise HybridPruneError(f"{where} must hold median_ms, p10_ms, p90_ms and repeats")
    times = [value[n] for n in names]
    for name, t in zip(names, times, strict=True):
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
            raise HybridPruneError(f"{where}: {name} must be a finite number of milliseconds, got {t!r}")
        if t < 0 and not allow_negative:
            raise HybridPruneError(f"{where}: {name} is negative ({t}); a time cannot be")
        if abs(t) > MAX_ENTRY_MS:
            raise HybridPruneError(
                f"{where}: {name} is {t:g} ms; a timed call beyond {MAX_ENTRY_MS:,} ms (one minute) is not a "
                "measurement `profile` makes: profile again"
            )
    repeats = value["repeats"]
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise HybridPruneError(f"{where}: repeats must be a positive integer, got {repeats!r}")
    return Entry(float(times[0]), float(times[1]), float(times[2]), repeats)


def _check_key(key: str, where: str) -> None:
    parts = key.split("|")
    ok = len(parts) == 12 and parts[0] in ("conv", "linear") and parts[10] in KERNELS
    try:
        c_in, c_out = (int(v) for v in parts[-1].split("x"))
        ok = ok and c_in > 0 and c_out > 0
    except ValueError:
        ok = False
    if not ok:
        raise HybridPruneError(f"{where}: {key!r} is not a latency-table key (e.g. {_EXAMPLE_KEY})")


_EXAMPLE_KEY = LayerShape("conv", 16, 32, 32, 32, (3, 3), (1, 1), (1, 1)).key(64, "float32", "onnxruntime", "dense")


# --- prediction ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    """Where the latencies hold: runtime, batch size and dtype (the device is the table's)."""

    runtime: str
    batch: int
    dtype: str


def layer_latency(table: LatencyTable, shape: LayerShape, setup: Setup, kernel: str) -> float:
    """A layer's table latency; a missing entry is a caller's bug (profile measures every candidate)."""
    value = table.lookup(shape, setup.batch, setup.dtype, setup.runtime, kernel)
    if value is None:
        raise HybridPruneError(
            f"the latency table has no entry for {shape.key(setup.batch, setup.dtype, setup.runtime, kernel)}; "
            "profile the model again (it measures the missing entries)"
        )
    return value


def predict_latency(
    couplings: list[LayerCoupling],
    counts: dict[str, int],
    table: LatencyTable,
    setup: Setup,
    rest_ms: float,
    sparse: set[str] = frozenset(),
) -> tuple[float, dict[str, float]]:
    """Predicted model latency (ms) when groups keep `counts` and the layers in `sparse` run 2:4: the rest of
    the network plus the sum of the layers' entries; also each layer's share.

    Example:
        >>> t = LatencyTable("cpu-test")
        >>> c = LayerCoupling("fc", LayerShape("linear", 8, 4), None, 4, (("g", 8, 8),))
        >>> for n in (4, 8):
        ...     t.add(LayerShape("linear", n, 4).key(1, "float32", "torch", "dense"), Entry(n / 8, n / 8, n / 8, 1))
        >>> predict_latency([c], {"g": 6}, t, Setup("torch", 1, "float32"), rest_ms=1.0)
        (1.75, {'fc': 0.75})
    """
    per_layer = {
        c.name: layer_latency(table, c.shape(counts), setup, "2:4" if c.name in sparse else "dense") for c in couplings
    }
    return rest_ms + sum(per_layer.values()), per_layer
