"""Post-training static INT8 of any hybridprune model as an ONNX QDQ file, with its accuracy measured in the
runtime that will run it.

The steps, each checked:
1. export (`export.export_onnx`): eval mode, BatchNorm folded into the convs it follows, normalisation inside,
   dynamic batch; a BatchNormalization node left in the graph is counted and said;
2. ONNX Runtime's pre-processing (`quant_pre_process`): ONNX shape inference and graph optimisation;
3. calibration on training images read through the project's own loader (`data.batching.batches`, images in
   [0, 1] as training reads them; the normalisation is inside the graph), `minmax`, `entropy` or `percentile`;
4. `quantize_static` in QDQ format: weights int8, symmetric, per output channel (zero point 0, so a zero weight
   stays exactly zero: the 2:4 pattern survives, and is counted in the file to be sure); activations uint8
   (`u8s8`) or int8 (`s8s8`); the graph's inputs and outputs stay float;
5. `auto` format: both formats are made and timed in the target runtime (with the fp32 graph in the same
   round-robin), and the faster one is kept: on this Xeon ONNX Runtime ran S8S8 slower than fp32 and U8S8
   faster, so the choice is measured, not assumed;
6. top-1 of the fp32 graph and of the INT8 file on the test split, both in the target runtime, and the largest
   logit difference between them.
Nothing is written until every step has passed; the file is written atomically.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from hybridprune.config import NMPattern, QuantizeConfig
from hybridprune.data.batching import batches
from hybridprune.deploy.accuracy import Split, evaluate_session
from hybridprune.deploy.export import count_broken_groups, export_onnx
from hybridprune.deploy.mixed_precision import (
    QUANTIZABLE_OPS,
    MixedPrecision,
    choose_float_layers,
    quantizable_nodes,
)
from hybridprune.deploy.runtimes import (
    device_name,
    get_runtime,
    interleaved_times,
    load_onnx,
    module_call,
    quantiles,
    runtime_versions,
)
from hybridprune.deploy.runtimes.base import Call, Session
from hybridprune.errors import HybridPruneError, first_line
from hybridprune.hardware import cpu_isa
from hybridprune.outputs import atomic_target

FORMAT_NAMES = ("u8s8", "s8s8")


@dataclass
class QuantizeReport:
    """What `quantize` made and measured (all of it goes into `--json`)."""

    out: str
    runtime: str
    format: str
    format_choice: str  # "measured" (auto) or "given"
    latency_ms: dict[str, float]  # median per graph timed at `timing_batch`: fp32 and the INT8 format(s)
    timing_batch: int
    fp32_top1: float
    int8_top1: float
    test_images: int
    top1_agreement: float
    max_logit_diff: float
    max_abs_logit: float
    calibration: dict[str, Any]
    weights: dict[str, Any]
    batchnorm_nodes_left: int
    versions: dict[str, Any] = field(default_factory=dict)
    cpu: dict[str, Any] = field(default_factory=dict)
    mixed_precision: dict[str, Any] | None = None  # with max_drop: the layers kept float and how they were chosen

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def choose_format(times: dict[str, list[float]]) -> str:
    """The format whose median time is smallest (the first listed on a tie).

    Example:
        >>> choose_format({"u8s8": [2.0, 2.1, 1.9], "s8s8": [5.0, 4.0, 6.0]})
        'u8s8'
    """
    candidates = {name: t for name, t in times.items() if name in FORMAT_NAMES and t}
    if not candidates:
        raise HybridPruneError(f"no timings of an INT8 format to choose from; valid formats: {', '.join(FORMAT_NAMES)}")
    return min(candidates, key=lambda name: float(np.median(candidates[name])))


def check_quantize_setup(cfg: QuantizeConfig, calibration: Split) -> None:
    """Before any work: the quantizer and the target runtime are installed and can run fp32 and int8 on this
    CPU, and the calibration split holds enough images."""
    try:
        import onnxruntime.quantization  # noqa: F401
    except ImportError:
        raise HybridPruneError('quantize needs onnx and onnxruntime: pip install -e ".[export]"') from None
    runtime = get_runtime(cfg.runtime)
    for precision in ("fp32", "int8"):
        runtime.check(precision, "cpu")
    if len(calibration) == 0:
        raise HybridPruneError("no calibration data: the training split is empty")
    if len(calibration) < cfg.calibration_images:
        raise HybridPruneError(
            f"too few images to calibrate: the training split has {len(calibration)}, --calibration-images asks "
            f"for {cfg.calibration_images}; give at most {len(calibration)}"
        )
    if cfg.max_drop is not None and len(calibration) < cfg.validation_images:
        raise HybridPruneError(
            f"too few images to validate a precision per layer: the training split has {len(calibration)}, "
            f"--validation-images asks for {cfg.validation_images}; give at most {len(calibration)}"
        )


def quantize(
    model: nn.Module,
    calibration: Split,
    test: Split,
    out: str | Path,
    cfg: QuantizeConfig | None = None,
    *,
    masks: dict[str, torch.Tensor] | None = None,
    pattern: NMPattern = NMPattern(),
    seed: int = 0,
    threads: int | None = None,
    progress: bool = True,
    data_name: str = "the dataset",
    record: bool = False,
) -> QuantizeReport:
    """Write `out`, the INT8 QDQ file of `model` calibrated on `cfg.calibration_images` images of `calibration`
    (seeded by `seed`), after measuring it on `test` in `cfg.runtime`; returns what was measured. `record`: list
    `out` in its folder's manifest (a run folder's files, which --overwrite may remove).

    Example:
        >>> import tempfile
        >>> from hybridprune.data.datasets import load_dataset
        >>> from hybridprune.models.sources import build_model
        >>> data = load_dataset("digits")
        >>> net = build_model("alexnet", in_channels=1, width=0.125)
        >>> cfg = QuantizeConfig(calibration_images=32, format="u8s8", rounds=1)
        >>> out = Path(tempfile.mkdtemp()) / "m-int8.onnx"
        >>> report = quantize(net, data.train, data.test.subset(64, 0), out, cfg, progress=False)
        >>> out.is_file(), report.format, report.weights["zeros_lost"]
        (True, 'u8s8', 0)
    """
    cfg = cfg or QuantizeConfig()
    check_quantize_setup(cfg, calibration)
    images = calibration_batches(calibration, cfg.calibration_images, cfg.batch_size, seed)
    with tempfile.TemporaryDirectory(prefix="hybridprune-quantize-") as folder:
        work = Path(folder)
        shape = (1, calibration.channels, calibration.image_size, calibration.image_size)  # plain modules need it
        fp32 = export_onnx(model, work / "fp32.onnx", cfg.opset, example_inputs=torch.zeros(shape))
        folded = batchnorm_nodes(fp32)
        prepared = preprocess(fp32, work / "prepared.onnx")
        formats = FORMAT_NAMES if cfg.format == "auto" else (cfg.format,)
        files, seconds = {}, {}
        for fmt in formats:
            start = time.perf_counter()
            files[fmt] = quantize_file(prepared, work / f"{fmt}.onnx", images, fmt, cfg.calibration_method, progress,
                                       cache=work / f"{fmt}-ranges.json")  # per-layer precision reuses the ranges
            seconds[fmt] = time.perf_counter() - start
            check_scales(files[fmt])
        times = time_graphs({"fp32": fp32, **files}, cfg.runtime, cfg.batch_size, cfg.rounds, threads, images[0])
        chosen = choose_format(times) if cfg.format == "auto" else cfg.format
        mixed = None
        if cfg.max_drop is not None:
            files[chosen], mixed = per_layer_precision(prepared, fp32, work, images, chosen, calibration, cfg, seed,
                                                       threads)  # fmt: skip
        weights = weight_report(prepared, files[chosen], masks or {}, pattern)
        accuracy = compare_accuracy(fp32, files[chosen], test, cfg, threads, progress)
        with atomic_target(out, record=record) as tmp:
            shutil.copyfile(files[chosen], tmp)
    return QuantizeReport(
        out=str(out),
        runtime=cfg.runtime,
        format=chosen,
        format_choice="measured" if cfg.format == "auto" else "given",
        latency_ms={name: quantiles(t)[0] for name, t in times.items()},
        timing_batch=cfg.batch_size,
        **accuracy,
        calibration={
            "images": cfg.calibration_images,
            "method": cfg.calibration_method,
            "batch_size": cfg.batch_size,
            "seed": seed,
            "split": f"{data_name} train",
            "seconds": {k: round(v, 2) for k, v in seconds.items()},
            "weights": "int8, symmetric, per output channel",
            "activations": {"u8s8": "uint8, asymmetric, per tensor", "s8s8": "int8, asymmetric, per tensor"}[chosen],
            "quant_format": "QDQ",
        },
        weights=weights,
        batchnorm_nodes_left=folded,
        versions=runtime_versions("onnxruntime", cfg.runtime) | {"onnx": _onnx_version()},
        cpu={"name": device_name(torch.device("cpu")), **cpu_isa()},
        mixed_precision=None if mixed is None else mixed.to_dict(),
    )


def per_layer_precision(
    prepared: Path, fp32: Path, work: Path, images: list[np.ndarray], fmt: str, train: Split, cfg: QuantizeConfig,
    seed: int, threads: int | None,
) -> tuple[Path, MixedPrecision]:  # fmt: skip
    """The INT8 file of `fmt` with the fewest layers in float within `cfg.max_drop` on validation images
    (`deploy.mixed_precision`); calibrated once, every variant reusing the ranges. All float is refused."""
    validation = [(x.numpy().astype(np.float32), y.numpy()) for x, y in
                  batches(train.subset(cfg.validation_images, seed + 1), cfg.batch_size)]  # fmt: skip
    cache = work / f"{fmt}-ranges.json"

    def make(name: str, **nodes: list[str]) -> Path:
        return quantize_file(prepared, work / f"{fmt}-{name}.onnx", images, fmt, cfg.calibration_method, False,
                             cache=cache, op_types=QUANTIZABLE_OPS, **nodes)  # fmt: skip

    reps = -(-cfg.batch_size // len(images[0]))
    x = torch.from_numpy(np.concatenate([images[0]] * reps)[: cfg.batch_size])
    nodes = quantizable_nodes(prepared)
    path, mixed = choose_float_layers(make, fp32, nodes, cfg.runtime, ([v[0] for v in validation],
                                      [v[1] for v in validation]), x, cfg.max_drop, cfg.rounds, threads)  # fmt: skip
    if len(mixed.float_nodes) == len(nodes):
        raise HybridPruneError(
            f"no layer can run INT8 within --max-drop {cfg.max_drop:g}: on {mixed.validation_images} validation "
            f"images fp32 scores {mixed.fp32_top1:.2f}%, all-INT8 {mixed.all_int8_top1:.2f}%; allow a larger drop "
            "or deploy the fp32 graph (export)"
        )
    return path, mixed


def calibration_batches(split: Split, count: int, batch_size: int, seed: int) -> list[np.ndarray]:
    """`count` seeded training images as float32 batches in [0, 1], read once (every format calibrates on
    the same images); a non-finite image is refused."""
    out = [x.numpy().astype(np.float32) for x, _ in batches(split.subset(count, seed), batch_size)]
    if not out or not all(np.isfinite(b).all() for b in out):
        raise HybridPruneError("the calibration images hold non-finite values (NaN or inf); nothing was written")
    return out


def preprocess(source: Path, target: Path) -> Path:
    """ONNX Runtime's pre-processing for quantization: shape inference and graph optimisation (symbolic shape
    inference is for dynamic shapes inside the graph, which these CNNs do not have)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with _quiet():
        try:
            quant_pre_process(str(source), str(target), skip_symbolic_shape=True)
        except Exception as e:  # noqa: BLE001 - an operator the optimiser cannot handle
            raise HybridPruneError(f"ONNX Runtime's pre-processing failed ({first_line(e)})") from None
    return target


def quantize_file(
    source: Path,
    target: Path,
    images: list[np.ndarray],
    fmt: str,
    method: str,
    progress: bool = True,
    *,
    cache: Path | None = None,
    nodes_to_quantize: list[str] | None = None,
    nodes_to_exclude: list[str] | None = None,
    op_types: tuple[str, ...] | None = None,
) -> Path:
    """`source` quantized statically to `target` (QDQ, per-channel symmetric int8 weights, `fmt` activations);
    `cache`: the calibration ranges, computed on the first call and reused by later ones; `nodes_to_quantize` /
    `nodes_to_exclude`: only those nodes INT8 / those kept float; `op_types`: only nodes of these types INT8."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}  # fmt: skip
    activation = {"u8s8": QuantType.QUInt8, "s8s8": QuantType.QInt8}[fmt]
    reader = _Reader(images, f"calibrate {fmt}", progress)
    with _quiet():
        try:
            quantize_static(
                str(source),
                str(target),
                reader,
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                weight_type=QuantType.QInt8,
                activation_type=activation,
                calibrate_method=methods[method],
                extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
                nodes_to_quantize=nodes_to_quantize,
                nodes_to_exclude=nodes_to_exclude,
                op_types_to_quantize=list(op_types) if op_types else None,
                **({"calibration_cache_path": str(cache)} if cache is not None else {}),
            )
        except Exception as e:  # noqa: BLE001 - the quantizer's errors, non-finite ranges among them
            raise HybridPruneError(f"quantization failed ({first_line(e)}); nothing was written") from None
    return target


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over batches held in memory, with a progress bar."""

    def __init__(self, images: list[np.ndarray], desc: str, progress: bool) -> None:
        self.images, self.position = images, 0
        total = sum(len(b) for b in images)
        self.bar = tqdm(total=total, desc=desc, unit="img", disable=None if progress else True, leave=False)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.images):
            self.bar.close()
            return None
        batch = self.images[self.position]
        self.position += 1
        self.bar.update(len(batch))
        return {"images": batch}

    def rewind(self) -> None:
        self.position = 0


def check_scales(path: Path) -> None:
    """Every scale in the QDQ file is finite and positive: calibration statistics that were not (an activation
    that overflowed to inf or became NaN) would make a file that computes garbage."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.input[1] in inits:
            scale = numpy_helper.to_array(inits[node.input[1]])
            if not (np.isfinite(scale).all() and (scale > 0).all()):
                raise HybridPruneError(
                    f"non-finite calibration statistics at {node.input[0]!r} (scale {scale.ravel()[:3].tolist()}): "
                    "the model's activations overflow or are NaN on the calibration images; nothing was written"
                )
    if any(o.type.tensor_type.elem_type != onnx.TensorProto.FLOAT for o in model.graph.output):
        raise HybridPruneError("the quantized graph's outputs are not float; nothing was written")


def weight_report(fp32: Path, int8: Path, masks: dict[str, Any], pattern: NMPattern) -> dict[str, Any]:
    """Do the zeros of the float weights stay zero in the int8 weights, and does each N:M layer keep its
    pattern? Anything lost is refused (symmetric weights quantize zero to zero, so it would be a bug)."""
    import onnx
    from onnx import numpy_helper

    dense = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(fp32)).graph.initializer}
    quantized = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(int8)).graph.initializer}
    zeros = lost = layers = 0
    for name, w in dense.items():
        q = quantized.get(f"{name}_quantized")
        if q is None or q.shape != w.shape:
            continue
        layers += 1
        zeros += int((w == 0).sum())
        lost += int(((w == 0) & (q != 0)).sum())
    nm = {n: quantized.get(f"{n}.weight_quantized") for n in masks}
    broken = sum(count_broken_groups(q, pattern) for q in nm.values() if q is not None)
    report = {"int8_layers": layers, "zeros_fp32": zeros, "zeros_lost": lost, "nm_layers": len(nm),
              "nm_layers_found": sum(q is not None for q in nm.values()), "nm_broken_groups": broken,
              "pattern": str(pattern)}  # fmt: skip
    if lost or broken:
        raise HybridPruneError(f"quantization broke the sparsity: {lost} zero weights became nonzero, {broken} "
                               f"groups break {pattern}; nothing was written")  # fmt: skip
    return report


def time_graphs(
    files: dict[str, Path], runtime: str, batch: int, rounds: int, threads: int | None, sample: np.ndarray
) -> dict[str, list[float]]:
    """Milliseconds per call of each file in `runtime` (fp32 as fp32, the others as int8), interleaved, at
    `batch` images (calibration images repeated to fill it)."""
    reps = -(-batch // len(sample))
    x = torch.from_numpy(np.concatenate([sample] * reps)[:batch])
    calls = {}
    for name, path in files.items():
        session, _ = load_onnx(path, runtime, "fp32" if name == "fp32" else "int8", threads)
        calls[name] = session.bound(x)
    times = interleaved_times(list(calls.values()), rounds, torch.device("cpu"), warmup=2)
    return dict(zip(calls, times, strict=True))


def compare_accuracy(
    fp32: Path, int8: Path, test: Split, cfg: QuantizeConfig, threads: int | None, progress: bool
) -> dict[str, Any]:
    """Top-1 of the fp32 graph and of the INT8 file in the target runtime, and how far their logits are apart."""
    sessions = {p: load_onnx(f, cfg.runtime, p, threads)[0] for p, f in (("fp32", fp32), ("int8", int8))}
    results = {
        p: evaluate_session(s, test, cfg.batch_size, keep_logits=True, progress=progress, desc=f"{cfg.runtime} {p}")
        for p, s in sessions.items()
    }
    a, b = results["fp32"].logits, results["int8"].logits
    return {
        "fp32_top1": results["fp32"].top1,
        "int8_top1": results["int8"].top1,
        "test_images": results["int8"].images,
        "top1_agreement": 100.0 * float((a.argmax(1) == b.argmax(1)).float().mean()),
        "max_logit_diff": float((a - b).abs().max()),
        "max_abs_logit": float(a.abs().max()),
    }


def batchnorm_nodes(path: Path) -> int:
    """BatchNormalization nodes left in an exported graph (0 when every BatchNorm was folded into its conv)."""
    import onnx

    return sum(n.op_type == "BatchNormalization" for n in onnx.load(str(path)).graph.node)


def _onnx_version() -> str:
    import onnx

    return onnx.__version__


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ONNX Runtime's quantizer logs advice through the root logger (pre-processing hints, per-tensor notes) and
    prints to stdout: quiet for the call, restored after."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the entropy calibrator prints its bin counts
            yield
    finally:
        root.setLevel(level)


def timing_session(
    model: nn.Module, x: torch.Tensor, runtime: str, precision: str, threads: int | None = None, fmt: str = "u8s8"
) -> Session:
    """A session of `model` in `runtime` at `precision` for timing, at any batch of inputs shaped like `x`: the
    graph `export_onnx` writes (BatchNorm folded, dynamic batch) for the ONNX runtimes, the module for torch.
    int8 is calibrated on a few random images (speed does not depend on the ranges; accuracy does: measure it
    with `quantize`), activations `fmt` (u8s8: faster than s8s8 in both CPU runtimes on the Xeon measured).

    Example:
        >>> from hybridprune.models.sources import build_model
        >>> net = build_model("alexnet", in_channels=1, width=0.125)
        >>> s = timing_session(net, torch.rand(1, 1, 32, 32), "onnxruntime", "int8")
        >>> tuple(s.run(torch.rand(3, 1, 32, 32)).shape)
        (3, 10)
    """
    rt = get_runtime(runtime)
    rt.check(precision, x.device)
    if not rt.reads_onnx:
        return rt.session_of(model, x, precision, threads)
    with tempfile.TemporaryDirectory(prefix="hybridprune-deploy-") as folder:
        fp32 = export_onnx(model, Path(folder) / "fp32.onnx", example_inputs=x[:1].detach().cpu().float())
        if precision != "int8":
            return rt.load(fp32, precision, threads, x.device.type)
        images = [torch.rand(8, *x.shape[1:], generator=torch.Generator().manual_seed(0)).numpy()]
        prepared = preprocess(fp32, Path(folder) / "prepared.onnx")
        int8 = quantize_file(prepared, Path(folder) / "int8.onnx", images, fmt, "minmax", progress=False)
        return load_onnx(int8, runtime, "int8", threads, x.device.type)[0]


def precision_call(
    module: nn.Module, x: torch.Tensor, runtime: str, precision: str, threads: int | None = None
) -> Call:
    """A no-argument callable running `module` on `x` in `runtime` at `precision`, as a latency table times it:
    int8 as a QDQ graph (`timing_session`: its quantize and dequantize nodes are timed with it), bf16 in an ONNX
    runtime by the runtime's own conversion of the fp32 graph, anything else at the dtype of `x`.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(8, 8, 3), nn.ReLU())
        >>> call = precision_call(net, torch.rand(2, 8, 8, 8), "onnxruntime", "int8")
        >>> call() is not None
        True
    """
    if precision == "int8" or (precision == "bf16" and get_runtime(runtime).reads_onnx):
        return timing_session(module, x, runtime, precision, threads).bound(x)
    return module_call(module, x, runtime, threads)
