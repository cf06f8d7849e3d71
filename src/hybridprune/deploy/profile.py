"""Measuring latency tables on this device: the whole model in context (`deploy.profile_context`: the device's
step structure, then the model with one group or one coupled pair of groups pruned at a time, which is what
predictions and latency targets use), and per-layer entries, dense and (where the device has a 2:4 kernel and
the layer can take masks) 2:4, which decide where 2:4 pays.

Per-layer entries: candidate kept counts of a group are the multiples of `step` up to its size (and the size
itself). Where a layer's input and output counts both vary, at most `max_points` of each are measured, evenly
spaced with both ends included, and `pruning.latency` interpolates between them. Entries already in the table
(from any model of the same layer shapes) are not measured again. Timings are medians of interleaved repeats
after warm-up, with the thread count pinned and recorded; the 10th and 90th percentiles are kept beside every
median. A timing is only as good as the machine is quiet: a load average above the idle cores is said in one
line.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone

import torch
from torch import nn
from tqdm.auto import tqdm

from hybridprune.config import NMPattern
from hybridprune.deploy.profile_context import measure_variants, profile_context
from hybridprune.deploy.quantize import precision_call
from hybridprune.deploy.runtimes import device_name, get_runtime, interleaved_times, quantiles, resolve_runtime
from hybridprune.deploy.runtimes.base import Call
from hybridprune.deploy.runtimes.pytorch import eager_call
from hybridprune.deploy.sparse import kernel_ineligibility, sparse_backend, sparse_module, to_inference_model
from hybridprune.deploy.timing import busy_note
from hybridprune.errors import HybridPruneError
from hybridprune.provenance import environment
from hybridprune.pruning.graph import ChannelGroup
from hybridprune.pruning.latency import Entry, LatencyTable, LayerCoupling, LayerShape, Setup, layer_latency
from hybridprune.pruning.latency_context import DEFAULT_STEP, ContextRecord
from hybridprune.pruning.nm import nm_mask, nm_prune_

CHUNK = 24  # entries built and timed together (bounds the memory of the layers alive at once)
MIN_TIMING_MS = 0.5  # a timing covers enough back-to-back calls to last this long: the clock's resolution


@dataclass(frozen=True)
class ProfileSettings:
    """How a table is measured: `setup` (runtime resolved, batch, dtype), the candidate step (None: the device's
    block, found by the step sweep), grid points per dimension, timed rounds per entry and intra-op threads."""

    setup: Setup
    step: int | None = None
    max_points: int = 9
    rounds: int = 15
    threads: int | None = None

    @property
    def precision(self) -> str:
        """The runtime's precision: fp32, fp16, bf16 or int8."""
        return PRECISION_OF_LATENCY_DTYPE[self.setup.dtype]

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dtype of the module and its input: the ONNX runtimes take an fp32 graph at every precision (they
        convert it themselves, or read its quantized form); PyTorch computes in the dtype itself."""
        if self.precision == "int8" or (self.precision == "bf16" and self.setup.runtime != "torch"):
            return torch.float32
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[self.setup.dtype]


PRECISION_OF_LATENCY_DTYPE = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int8": "int8"}


def runtime_call(module: nn.Module, x: torch.Tensor, settings: ProfileSettings) -> Call:
    """A no-argument callable running `module` on `x` at the settings' runtime and precision."""
    return precision_call(module, x, settings.setup.runtime, settings.precision, settings.threads)


def resolve_settings(
    runtime: str,
    batch: int,
    dtype: str,
    device: torch.device,
    step: int | None = None,
    rounds: int = 15,
    points: int = 9,
) -> ProfileSettings:
    """Settings with `auto` resolved for `device`: the runtime a deployer would pick, fp16 on GPUs, fp32 on CPUs.

    Example:
        >>> resolve_settings("torch", 8, "auto", torch.device("cpu")).setup
        Setup(runtime='torch', batch=8, dtype='float32')
    """
    resolved = resolve_runtime(runtime, device)
    if dtype == "auto":
        dtype = "float16" if device.type == "cuda" else "float32"
    if device.type == "cpu" and dtype == "float16":
        raise HybridPruneError("--latency-dtype float16 is for GPUs; on a CPU: float32, bfloat16 or int8")
    if device.type == "cuda" and dtype == "int8":
        raise HybridPruneError("--latency-dtype int8 is measured in the CPU runtimes (onnxruntime, openvino) today")
    if device.type == "cpu" and dtype != "float32":
        reason = get_runtime(resolved).unsupported(PRECISION_OF_LATENCY_DTYPE[dtype], device)
        if reason:
            raise HybridPruneError(f"--latency-dtype {dtype}: {reason}")
    return ProfileSettings(Setup(resolved, batch, dtype), step=step, max_points=points, rounds=rounds)


def candidate_counts(size: int, step: int) -> list[int]:
    """Kept counts a group may take: multiples of `step` up to `size`, and `size` itself.

    Example:
        >>> candidate_counts(10, 4), candidate_counts(3, 4)
        ([4, 8, 10], [3])
    """
    return sorted({*range(step, size + 1, step), size})


def sample(values: list[int], max_points: int) -> list[int]:
    """At most `max_points` of `values`, evenly spaced, both ends included.

    Example:
        >>> sample(list(range(1, 11)), 4)
        [1, 4, 7, 10]
    """
    if len(values) <= max_points:
        return list(values)
    picks = {round(i * (len(values) - 1) / (max_points - 1)) for i in range(max_points)}
    return [values[i] for i in sorted(picks)]


def layer_grid(coupling: LayerCoupling, groups: dict[str, ChannelGroup], step: int, max_points: int) -> set[LayerShape]:
    """The shapes of one layer to measure: its out group's sampled counts times its input's sampled counts."""
    outs = [{}]
    if coupling.out_group is not None:
        size = groups[coupling.out_group].size
        outs = [{coupling.out_group: k} for k in sample(candidate_counts(size, step), max_points)]
    ins: list[dict[str, int]] = [{}]
    if coupling.in_parts and not coupling.depthwise:
        lists = {g: sample(candidate_counts(size, step), max_points) for g, size, _ in coupling.in_parts}
        points = max(len(v) for v in lists.values())  # several groups feed it (a concatenation): vary them together
        ins = [{g: v[round(j * (len(v) - 1) / max(1, points - 1))] for g, v in lists.items()} for j in range(points)]
    return {coupling.shape({**i, **o}) for i in ins for o in outs}


def sparse_possible(shape: LayerShape, device: torch.device, dtype: torch.dtype, nm_layer: bool) -> bool:
    """Whether a 2:4 entry exists for this shape: a layer that takes masks, a sparse kernel for its GEMM."""
    if not nm_layer or shape.groups != 1 or shape.c_in % 4:
        return False
    gemm = (shape.c_out, shape.c_in * shape.kernel[0] * shape.kernel[1])
    return not kernel_ineligibility(gemm, sparse_backend(device), dtype, NMPattern())


def profile_model(
    model: nn.Module,
    groups: list[ChannelGroup],
    couplings: list[LayerCoupling],
    table: LatencyTable,
    settings: ProfileSettings,
    device: torch.device,
    nm_layers: set[str],
    progress: bool = True,
) -> tuple[Entry, Entry]:
    """Measure every missing entry of the model's layers at their candidate counts into `table`, then the whole
    dense model as deployed; store the rest of the network (whole minus the sum of its dense layer entries) and
    return it with the whole model's latency."""
    check_device(table, device)
    wanted = _wanted_entries(groups, couplings, settings, device, nm_layers)
    missing = {k: v for k, v in wanted.items() if k not in table.entries}
    with pinned_threads(settings.threads) as threads:
        table.threads = threads
        if device.type == "cpu":
            say_if_busy(threads)
        measure_entries(missing, table, settings, device, progress)
        whole = measure_deployed(model, frozenset(), settings, device)
    dense_sum = sum(layer_latency(table, c.dense, settings.setup, "dense") for c in couplings)
    rest = Entry(whole.median_ms - dense_sum, whole.p10_ms - dense_sum, whole.p90_ms - dense_sum, whole.repeats)
    table.rest[rest_key(model, settings.setup)] = rest
    table.versions = environment()
    table.date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return rest, whole


def _wanted_entries(
    groups: list[ChannelGroup],
    couplings: list[LayerCoupling],
    settings: ProfileSettings,
    device: torch.device,
    nm_layers: set[str] | frozenset[str],
    sparse_only: bool = False,
) -> dict[str, tuple[LayerShape, str]]:
    """Key -> (shape, kernel) of every grid entry of the layers (`sparse_only`: only of layers with a 2:4 entry)."""
    by_name, step = {g.name: g for g in groups}, settings.step or DEFAULT_STEP
    wanted: dict[str, tuple[LayerShape, str]] = {}
    for c in couplings:
        for shape in layer_grid(c, by_name, step, settings.max_points):
            sparse = sparse_possible(shape, device, settings.torch_dtype, c.name in nm_layers)
            if sparse_only and not sparse:
                continue
            for kernel in ("dense", "2:4") if sparse else ("dense",):
                wanted[shape.key(settings.setup.batch, settings.setup.dtype, settings.setup.runtime, kernel)] = (
                    shape, kernel)  # fmt: skip
    return wanted


def profile_in_context(
    model: nn.Module,
    groups: list[ChannelGroup],
    couplings: list[LayerCoupling],
    table: LatencyTable,
    settings: ProfileSettings,
    device: torch.device,
    nm_layers: set[str] | frozenset[str] = frozenset(),
    progress: bool = True,
) -> ContextRecord:
    """The model's in-context record on this device (measured, or reused from `table`), plus per-layer dense and
    2:4 entries of the layers that have a 2:4 kernel here (none on a CPU), at the record's step."""
    check_device(table, device)
    with pinned_threads(settings.threads) as threads:
        table.threads = threads
        if device.type == "cpu":
            say_if_busy(threads)
        record = profile_context(model, groups, couplings, table, settings, device, rest_key(model, settings.setup),
                                 points=settings.max_points, progress=progress)  # fmt: skip
        at_step = replace(settings, step=record.step)
        wanted = _wanted_entries(groups, couplings, at_step, device, nm_layers, sparse_only=True)
        measure_entries({k: v for k, v in wanted.items() if k not in table.entries}, table, at_step, device, progress)
    table.versions = environment()
    table.date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return record


def rest_key(model: nn.Module, setup: Setup) -> str:
    """Which model and setup a rest-of-network constant belongs to: the model's layers, shapes and input."""
    shapes = [tuple(m.weight.shape) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    source = getattr(getattr(model, "source", None), "label", type(model).__name__)
    digest = hashlib.sha256((str(shapes) + str(getattr(model, "input_shape", ""))).encode()).hexdigest()[:12]
    return f"{source}|{setup.runtime}|b{setup.batch}|{setup.dtype}|{digest}"


def check_device(table: LatencyTable, device: torch.device) -> None:
    here = device_name(device)
    if table.device != here:
        raise HybridPruneError(
            f"the latency table was measured on {table.device!r}, not on {here!r}; profile this device"
        )


def new_table(device: torch.device) -> LatencyTable:
    return LatencyTable(device_name(device))


def measure_entries(
    wanted: dict[str, tuple[LayerShape, str]],
    table: LatencyTable,
    settings: ProfileSettings,
    device: torch.device,
    progress: bool = True,
) -> None:
    """Time each (shape, kernel) into `table`, CHUNK entries interleaved at a time."""
    items = sorted(wanted.items())
    bar = tqdm(total=len(items), desc="profile layers", unit="entry", disable=not progress or not items)
    size = 1 if device.type == "cuda" else CHUNK  # on an H200, many CUDA-graph and cuSPARSELt layers alive at
    for start in range(0, len(items), size):  # once faulted (illegal memory access); one at a time did not
        chunk = items[start : start + size]
        calls = [_layer_call(shape, kernel, settings, device) for _, (shape, kernel) in chunk]
        for (key, _), times in zip(chunk, _timed(calls, settings, device), strict=True):
            table.add(key, Entry(*quantiles(times), len(times)))
        bar.update(len(chunk))
    bar.close()


def measure_model(
    model: nn.Module, settings: ProfileSettings, device: torch.device, rounds: int | None = None, eager: bool = False
) -> Entry:
    """The whole model's latency in the settings' runtime, batch and dtype (median of interleaved repeats);
    `eager`: no CUDA graph (a model with cuSPARSELt layers)."""
    x = torch.rand(settings.setup.batch, *model.input_shape, device=device, dtype=settings.torch_dtype)
    net = model.to(device=device, dtype=settings.torch_dtype).eval()
    call = eager_call(net, x) if eager else runtime_call(net, x, settings)
    times = _timed([call], settings, device, rounds or max(settings.rounds, 30))[0]
    model.float()
    return Entry(*quantiles(times), len(times))


def measure_deployed(
    model: nn.Module, sparse: frozenset[str] | set[str], settings: ProfileSettings, device: torch.device
) -> Entry:
    """The model's latency as it would be deployed: 2:4 masks on the layers in `sparse`, BatchNorm folded and
    those layers on the sparse kernel (PyTorch runtime), or the runtime's own graph of it (which folds too)."""
    net = copy.deepcopy(model).to(device)
    if settings.setup.runtime == "torch":
        masks = {n: m for n, m in nm_prune_(net).items() if n in sparse} if sparse else {}
        # the layers in `sparse` were chosen by their measured entries: all of them run sparse, 3x3 convs too
        net = to_inference_model(net, masks, device, settings.torch_dtype, choose="sparse-all").model
        net.input_shape = model.input_shape
    return measure_model(net, settings, device, eager=bool(sparse) and device.type == "cuda")


def _layer_call(shape: LayerShape, kernel: str, settings: ProfileSettings, device: torch.device):  # noqa: ANN202
    dtype = settings.torch_dtype
    module = shape.module().to(device=device, dtype=dtype).eval()
    x = torch.rand(shape.input_shape(settings.setup.batch), device=device, dtype=dtype)
    if kernel == "2:4":
        with torch.no_grad():
            module.weight.mul_(nm_mask(module.weight))
        module = sparse_module(module, sparse_backend(device))
        if shape.kind == "conv":
            x = x.contiguous(memory_format=torch.channels_last)
        if device.type == "cuda":  # cuSPARSELt calls are not captured in CUDA graphs (seen to fault on an H200)
            return eager_call(module, x)
    return runtime_call(module, x, settings)


def _timed(
    calls: list, settings: ProfileSettings, device: torch.device, rounds: int | None = None
) -> list[list[float]]:
    """Interleaved timings, each covering enough back-to-back calls to outlast the clock's resolution."""
    probe = interleaved_times(calls, 3, device, warmup=2)
    shortest = min(min(t) for t in probe)
    per_round = max(1, math.ceil(MIN_TIMING_MS / max(shortest, 1e-3)))
    return interleaved_times(calls, rounds or settings.rounds, device, warmup=0, per_round=per_round)


@contextlib.contextmanager
def pinned_threads(threads: int | None) -> Iterator[int]:
    """torch's intra-op threads fixed for the block (ONNX Runtime sessions take the same number)."""
    before = torch.get_num_threads()
    threads = threads or before
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)


def say_if_busy(threads: int) -> None:
    """One line when other work shares the CPU being timed (a load average above its idle cores)."""
    note = busy_note(threads)
    if note:
        print(f"note: {note}", file=sys.stderr)


def profile_report(
    model: nn.Module,
    table: LatencyTable,
    settings: ProfileSettings,
    device: torch.device,
    ratios: tuple[float, ...] = (),
    progress: bool = True,
    variants: tuple[tuple[str, dict[str, float]], ...] = (),
    layers: bool = False,
) -> dict:
    """Profile `model` into `table` in context, then check it: the dense model, copies pruned uniformly at each
    ratio in `ratios` and the named `variants` (group -> kept fraction; missing groups: dense), counts rounded to
    the table's step, each measured
    interleaved with the dense model, predicted beside measured. `layers`: also measure per-layer entries and
    give the per-layer prediction (rest + sum of entries, the design of table version 2) beside, for comparison.

    Example:
        >>> from hybridprune.models.sources import build_model
        >>> s = ProfileSettings(Setup("torch", 2, "float32"), step=8, max_points=2, rounds=3)
        >>> r = profile_report(build_model("alexnet", width=0.125), new_table(torch.device("cpu")), s,
        ...                    torch.device("cpu"), ratios=(0.5,), progress=False)
        >>> [row["model"] for row in r["checks"]], all(row["predicted_ms"] > 0 for row in r["checks"])
        (['dense', 'uniform 0.5'], True)
    """
    from hybridprune.pruning.graph import channel_groups, dependency_graph, example_input
    from hybridprune.pruning.latency import layer_couplings, predict_latency
    from hybridprune.pruning.latency_context import ContextModel
    from hybridprune.pruning.nm import eligible_layers
    from hybridprune.pruning.plan import kept_count

    groups = channel_groups(model, dependency_graph(model))
    couplings = layer_couplings(model, groups, example_input(model))
    record = profile_in_context(model, groups, couplings, table, settings, device, eligible_layers(model), progress)
    context, exact = ContextModel(record, couplings), ContextModel(record)
    def kept(g: ChannelGroup, ratio: float) -> int:
        return kept_count(g.size, ratio, record.group_steps.get(g.name, record.step))

    named = [(f"uniform {r:g}", {g.name: kept(g, r) for g in groups}) for r in ratios]
    named += [(n, {g.name: kept(g, 1 - f[g.name]) for g in groups if g.name in f}) for n, f in variants]
    rest = None
    if layers:
        rest = profile_model(model, groups, couplings, table, replace(settings, step=record.step), device, set(),
                             progress)[0].median_ms  # fmt: skip
    with pinned_threads(settings.threads):
        dense, measured = measure_variants(model, groups, [c for _, c in named], settings, device, progress)
    checks = []
    for name, counts, entry in [("dense", {}, dense), *((n, c, e) for (n, c), e in zip(named, measured, strict=True))]:
        row = _check_row(name, entry, context.predict(counts)) | {"expansion_predicted_ms": exact.predict(counts)}
        if rest is not None:
            per_layer = predict_latency(couplings, counts, table, settings.setup, rest)[0]
            row |= {"per_layer_predicted_ms": per_layer, "per_layer_error": per_layer / entry.median_ms - 1}
        checks.append(row | {"counts": counts})
    candidates = {g.name: record.candidates(g.name) for g in groups}
    return {"device": table.device, "threads": table.threads, **asdict(settings.setup), "step": record.step,
            "block": record.block, "forced_step": settings.step is not None,
            "indistinguishable": {g: ks for g, ks in context.indistinguishable(candidates).items() if ks},
            "models_measured": 1 + sum(map(len, record.single.values())) + sum(map(len, record.pairs.values())),
            "floor_ms": record.floor.median_ms, "entries": len(table.entries), "checks": checks}  # fmt: skip


def _check_row(name: str, measured: Entry, predicted: float) -> dict:
    return {
        "model": name,
        "predicted_ms": predicted,
        "measured_ms": measured.median_ms,
        "measured_p10_ms": measured.p10_ms,
        "measured_p90_ms": measured.p90_ms,
        "error": predicted / measured.median_ms - 1,
    }
