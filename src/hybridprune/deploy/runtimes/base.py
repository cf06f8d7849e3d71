"""How a module is run for timing on each runtime, and how several are timed fairly against each other.

- `torch`: PyTorch eager, `inference_mode`; on a GPU the call is captured once as a CUDA graph and replayed,
  which removes per-kernel launch overhead (what a deployer would do for small layers).
- `onnxruntime`: the module exported to ONNX in memory and run by an ONNX Runtime CPU session with pinned
  intra-op threads and no spinning between runs.
- `tensorrt`: needs the `tensorrt` package and a CUDA GPU; an engine is built from the same ONNX graph with
  fp16 and, for 2:4 layers, sparse weights enabled. It has not run on a machine with TensorRT yet.

`auto` is what a deployer would pick on the device: TensorRT on a GPU where it is installed, else PyTorch with
CUDA graphs; ONNX Runtime on a CPU where it is installed, else PyTorch. Calls are timed round-robin (one call
of each in turn, many rounds), so a machine that slows down for a while slows every candidate alike.
"""

from __future__ import annotations

import importlib.util
import io
import platform
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from hybridprune.config import LATENCY_RUNTIMES
from hybridprune.deploy.timing import time_calls
from hybridprune.errors import HybridPruneError, first_line

Call = Callable[[], object]


def resolve_runtime(name: str, device: torch.device) -> str:
    """The runtime `name` means on `device` (`auto` resolved), or one line saying why it cannot run here.

    Example:
        >>> resolve_runtime("torch", torch.device("cpu"))
        'torch'
    """
    if name not in LATENCY_RUNTIMES:
        raise HybridPruneError(f"unknown latency runtime {name!r}; valid: {', '.join(LATENCY_RUNTIMES)}")
    installed = {r: importlib.util.find_spec(r) is not None for r in ("onnxruntime", "tensorrt")}
    if name == "auto":
        if device.type == "cuda":
            return "tensorrt" if installed["tensorrt"] else "torch"
        return "onnxruntime" if installed["onnxruntime"] else "torch"
    if name == "onnxruntime" and (device.type != "cpu" or not installed["onnxruntime"]):
        raise HybridPruneError('--latency-runtime onnxruntime runs on the CPU with pip install -e ".[export]"')
    if name == "tensorrt" and (device.type != "cuda" or not installed["tensorrt"]):
        raise HybridPruneError("--latency-runtime tensorrt needs a CUDA GPU and the tensorrt package installed")
    return name


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


def module_call(module: nn.Module, x: torch.Tensor, runtime: str, threads: int | None = None) -> Call:
    """A no-argument callable running `module` on `x` in `runtime` (the module on x's device and dtype)."""
    if runtime == "onnxruntime":
        return _ort_call(module, x, threads)
    if runtime == "tensorrt":
        return _tensorrt_call(module, x)
    if x.device.type == "cuda":
        try:
            return cuda_graph_call(module, x)
        except Exception:  # noqa: BLE001 - a kernel that cannot be captured runs eagerly (with launch overhead)
            torch.cuda.synchronize(x.device)
            return eager_call(module, x)
    return eager_call(module, x)


def eager_call(module: nn.Module, x: torch.Tensor) -> Call:
    def call() -> object:
        with torch.inference_mode():
            return module(x)

    return call


def cuda_graph_call(module: nn.Module, x: torch.Tensor) -> Call:
    """Capture one forward pass as a CUDA graph; replaying it removes per-kernel launch overhead."""
    static_x = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.inference_mode():
        for _ in range(3):
            module(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.inference_mode():
        module(static_x)
    return graph.replay


def onnx_bytes(module: nn.Module, x: torch.Tensor) -> bytes:
    """The module exported to ONNX (TorchScript exporter), in memory."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(module.cpu().float().eval(), (x.cpu().float(),), buffer, input_names=["x"],
                              output_names=["y"], opset_version=17, dynamo=False)  # fmt: skip
        except Exception as e:  # noqa: BLE001 - an operator ONNX lacks
            raise HybridPruneError(f"ONNX export of {type(module).__name__} failed ({first_line(e)})") from None
    return buffer.getvalue()


def _ort_call(module: nn.Module, x: torch.Tensor, threads: int | None) -> Call:
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads must not steal cores
    session = ort.InferenceSession(onnx_bytes(module, x), options, providers=["CPUExecutionProvider"])
    outputs: list = []  # the buffers stay alive as long as the call
    feed = {session.get_inputs()[0].name: x.cpu().float().numpy()}
    # outputs go into buffers allocated once, as a latency-critical deployment binds them: a fresh output array
    # per call would add page faults in proportion to its size, which a whole graph (reusing its arena) never
    # pays, and so skew a table of single layers against the model they add up to
    binding = session.io_binding()
    for name, array in feed.items():
        binding.bind_cpu_input(name, array)
    for meta, first in zip(session.get_outputs(), session.run(None, feed), strict=True):
        buffer = np.empty_like(first)
        binding.bind_output(meta.name, "cpu", 0, buffer.dtype, buffer.shape, buffer.ctypes.data)
        outputs.append(buffer)

    def call() -> list:
        session.run_with_iobinding(binding)
        return outputs

    return call


def _tensorrt_call(module: nn.Module, x: torch.Tensor) -> Call:  # pragma: no cover - needs TensorRT and a GPU
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes(module, x)):
        raise HybridPruneError(f"TensorRT cannot parse {type(module).__name__}: {parser.get_error(0)}")
    config = builder.create_builder_config()
    if x.dtype == torch.float16:
        config.set_flag(trt.BuilderFlag.FP16)
    config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    engine = trt.Runtime(logger).deserialize_cuda_engine(builder.build_serialized_network(network, config))
    context = engine.create_execution_context()
    out = torch.empty(tuple(context.get_tensor_shape("y")), device=x.device, dtype=x.dtype)
    context.set_tensor_address("x", x.data_ptr())
    context.set_tensor_address("y", out.data_ptr())
    stream = torch.cuda.current_stream().cuda_stream
    return lambda: context.execute_async_v3(stream)


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
