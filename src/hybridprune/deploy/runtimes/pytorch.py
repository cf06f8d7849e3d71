"""PyTorch eager as a runtime: fp32 anywhere; bf16 on a CPU in channels-last (oneDNN's bf16 convolutions on AMX
or AVX512-BF16); fp16 and bf16 on CUDA, where one forward pass is captured as a CUDA graph and replayed, which
removes per-kernel launch overhead (what a deployer would do for small layers)."""

from __future__ import annotations

import copy
from typing import ClassVar

import torch
from torch import nn

from hybridprune.deploy.runtimes.base import Call, Runtime, Session

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def fastest_call(module: nn.Module, x: torch.Tensor) -> Call:
    """A CUDA graph on a GPU (eager where a kernel cannot be captured); eager on a CPU."""
    if x.device.type == "cuda":
        try:
            return cuda_graph_call(module, x)
        except Exception:  # noqa: BLE001 - a kernel that cannot be captured runs eagerly (with launch overhead)
            torch.cuda.synchronize(x.device)
    return eager_call(module, x)


class TorchSession(Session):
    """A module at one dtype and memory format on one device."""

    def __init__(self, module: nn.Module, dtype: torch.dtype, device: torch.device, channels_last: bool) -> None:
        self.module, self.dtype, self.device, self.channels_last = module, dtype, device, channels_last

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        """x on the session's device and dtype; channels-last where the session runs so, else as given (a caller
        timing a channels-last input keeps it)."""
        x = x.to(device=self.device, dtype=self.dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def run(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.module(self._input(x)).float().cpu()

    def bound(self, x: torch.Tensor) -> Call:
        return fastest_call(self.module, self._input(x))


class TorchRuntime(Runtime):
    name = "torch"
    library = "torch"
    install = "pip install torch"
    precisions: ClassVar = {"cpu": ("fp32", "bf16"), "cuda": ("fp32", "fp16", "bf16")}
    reads_onnx = False

    def session_of(
        self, module: nn.Module, x: torch.Tensor, precision: str, threads: int | None = None
    ) -> TorchSession:
        """The module at `precision` on x's device: converted on a copy (the caller's module is left as it
        is) unless it already has that dtype; bf16 on a CPU runs channels-last."""
        self.check(precision, x.device)
        dtype = DTYPES[precision]
        channels_last = precision == "bf16" and x.device.type == "cpu"
        first = next(module.parameters(), None)
        same = first is None or (first.dtype == dtype and first.device == x.device)
        net = module if same and not channels_last else copy.deepcopy(module).to(device=x.device, dtype=dtype)
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        return TorchSession(net.eval(), dtype, x.device, channels_last)

    def versions(self) -> dict[str, str | None]:
        return {"torch": torch.__version__, "cuda": torch.version.cuda}
