"""Where a model runs, and at what precision: one object per runtime behind one protocol (`base.Runtime`),
found through `RUNTIMES`, and how several calls are timed fairly against each other. Each name has one home:
the protocol, sessions and CPU flags in `base`, ONNX file checks in `files`, each runtime in its module. Imports
nothing above `deploy` (no experiments, no cli); each runtime imports its library only when it builds a session.

| runtime | module | devices | precisions |
| --- | --- | --- | --- |
| `torch` | `pytorch` | cpu, cuda | fp32, bf16 (channels-last on a CPU); fp16 on cuda; CUDA graphs on cuda |
| `onnxruntime` | `ort` | cpu | fp32, int8 (QDQ file) |
| `openvino` | `ov` | cpu | fp32 (f32 hint: fp32 means fp32), bf16 (CPUs with AMX or AVX512-BF16), int8 (QDQ file) |
| `tensorrt` | `trt` | cuda | fp32, fp16, int8 (QDQ file), sparse weights on: has not run yet |

Adding a runtime is one module with a `Runtime` subclass, its name in `config.RUNTIME_NAMES`, one line below.

`auto` (latency tables) is what a deployer would pick on the device: TensorRT on a GPU where it is installed,
else PyTorch with CUDA graphs; ONNX Runtime on a CPU where it is installed, else PyTorch. Calls are timed
round-robin (one call of each in turn, many rounds), so a machine that slows down for a while slows every
candidate alike.
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from hybridprune.config import LATENCY_RUNTIMES, RUNTIME_NAMES
from hybridprune.deploy.runtimes.base import Call, Runtime, Session
from hybridprune.deploy.runtimes.files import OnnxInfo, inspect_onnx
from hybridprune.deploy.runtimes.ort import OnnxRuntime
from hybridprune.deploy.runtimes.ov import OpenVinoRuntime
from hybridprune.deploy.runtimes.pytorch import TorchRuntime
from hybridprune.deploy.runtimes.trt import TensorRtRuntime
from hybridprune.deploy.timing import time_calls
from hybridprune.errors import HybridPruneError
from hybridprune.registry import Registry

RUNTIMES: Registry[Runtime] = Registry("runtime", RUNTIME_NAMES)
for _runtime in (TorchRuntime(), OnnxRuntime(), OpenVinoRuntime(), TensorRtRuntime()):
    RUNTIMES.register(_runtime.name)(_runtime)

PRECISION_OF_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def get_runtime(name: str) -> Runtime:
    """The runtime called `name` (one line listing the valid names otherwise).

    Example:
        >>> get_runtime("openvino").precisions["cpu"]
        ('fp32', 'bf16', 'int8')
    """
    return RUNTIMES.get(name)


def precision_of(dtype: torch.dtype) -> str:
    """The precision name of a torch dtype: float32 -> fp32, bfloat16 -> bf16, float16 -> fp16."""
    if dtype not in PRECISION_OF_DTYPE:
        raise HybridPruneError(f"no deployment precision for {dtype}; valid: float32, bfloat16, float16")
    return PRECISION_OF_DTYPE[dtype]


def resolve_runtime(name: str, device: torch.device) -> str:
    """The runtime `name` means on `device` (`auto` resolved), or one line saying why it cannot run here.

    Example:
        >>> resolve_runtime("torch", torch.device("cpu"))
        'torch'
    """
    if name not in LATENCY_RUNTIMES:
        raise HybridPruneError(f"unknown latency runtime {name!r}; valid: {', '.join(LATENCY_RUNTIMES)}")
    if name == "auto":
        preferred = "tensorrt" if device.type == "cuda" else "onnxruntime"
        return preferred if get_runtime(preferred).available(device) else "torch"
    runtime = get_runtime(name)
    precisions = runtime.precisions.get(device.type, ("fp32",))
    reason = runtime.unsupported("fp32" if "fp32" in precisions else precisions[0], device)
    if reason:
        raise HybridPruneError(f"--latency-runtime {name}: {reason}")
    return name


def module_call(module: nn.Module, x: torch.Tensor, runtime: str, threads: int | None = None) -> Call:
    """A no-argument callable running `module` on `x` in `runtime`, at the precision of x's dtype (the module
    on x's device and dtype)."""
    return get_runtime(runtime).session_of(module, x, precision_of(x.dtype), threads).bound(x)


def load_onnx(
    path: str | Path, runtime: str, precision: str, threads: int | None = None, device: str = "cpu"
) -> tuple[Session, OnnxInfo]:
    """A session of an ONNX file in `runtime` at `precision`, after the file is checked (`inspect_onnx`) and
    its kind matches the precision: int8 takes a quantized (QDQ) file, the float precisions a float one.

    Example:
        >>> load_onnx("/nonexistent.onnx", "onnxruntime", "fp32")
        Traceback (most recent call last):
        ...
        hybridprune.errors.HybridPruneError: /nonexistent.onnx does not exist; give an ONNX file
    """
    info = inspect_onnx(path)
    rt = get_runtime(runtime)
    rt.check(precision, device)
    if precision == "int8" and not info.quantized:
        raise HybridPruneError(f"{info.path} holds no quantized operators; make an INT8 file with `hybridprune "
                               "quantize`, or give a float precision")  # fmt: skip
    if precision != "int8" and info.quantized:
        raise HybridPruneError(f"{info.path} is quantized (QDQ); run it at int8, not {precision}")
    return rt.load(info.path, precision, threads, device), info


def available_pairs(device: torch.device | str = "cpu", onnx_only: bool = False) -> list[tuple[str, str]]:
    """Every (runtime, precision) that can run on `device` here, in registry order.

    Example:
        >>> ("torch", "fp32") in available_pairs("cpu")
        True
    """
    return [
        (name, precision)
        for name in RUNTIMES
        if not (onnx_only and not get_runtime(name).reads_onnx)
        for precision in get_runtime(name).available(device)
    ]


def parse_pairs(text: str, device: torch.device | str = "cpu") -> list[tuple[str, str]]:
    """'onnxruntime:int8,openvino:bf16' -> [(runtime, precision), ...], each checked to run on `device` here;
    `installed`: every pair that does (`available_pairs`).

    Example:
        >>> parse_pairs("onnxruntime:fp32, torch:fp32")
        [('onnxruntime', 'fp32'), ('torch', 'fp32')]
    """
    if text.strip() == "installed":
        return available_pairs(device)
    pairs = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        name, _, precision = item.partition(":")
        if not precision:
            raise HybridPruneError(f"{item!r} is not RUNTIME:PRECISION (e.g. openvino:bf16), nor `installed`")
        get_runtime(name).check(precision, device)
        pairs.append((name, precision))
    if not pairs:
        raise HybridPruneError(f"no RUNTIME:PRECISION pairs in {text!r} (e.g. onnxruntime:int8,openvino:bf16)")
    return list(dict.fromkeys(pairs))


def runtime_versions(*names: str) -> dict[str, str | None]:
    """The versions of the named runtimes' libraries (all runtimes when none is named), for the record."""
    out: dict[str, str | None] = {}
    for name in names or tuple(RUNTIMES):
        out |= get_runtime(name).versions()
    return out


def device_name(device: torch.device) -> str:
    """The device's model name, as a table records it: the GPU's name, or the CPU's model from /proc/cpuinfo."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def interleaved_times(
    calls: Sequence[Call], rounds: int, device: torch.device, warmup: int = 3, per_round: int = 1
) -> list[list[float]]:
    """Milliseconds of `rounds` timings of each call, taken round-robin after `warmup` untimed calls each; a
    timing covers `per_round` back-to-back calls (divided back to one), so very short calls are measurable.

    Example:
        >>> times = interleaved_times([lambda: None, lambda: sum(range(100))], 5, torch.device("cpu"))
        >>> [len(t) for t in times]
        [5, 5]
    """
    for call in calls:
        time_calls(call, 0, device, warmup)
    times: list[list[float]] = [[] for _ in calls]

    def repeated(call: Call) -> Call:
        return call if per_round == 1 else lambda: [call() for _ in range(per_round)]

    batch = [repeated(c) for c in calls]
    for _ in range(rounds):
        for i, call in enumerate(batch):
            times[i].append(time_calls(call, 1, device, warmup=0)[0] / per_round)
    return times


def quantiles(times: list[float]) -> tuple[float, float, float]:
    """Median, 10th and 90th percentile of a list of times."""
    t = torch.tensor(times, dtype=torch.float64)
    return float(t.quantile(0.5)), float(t.quantile(0.1)), float(t.quantile(0.9))
