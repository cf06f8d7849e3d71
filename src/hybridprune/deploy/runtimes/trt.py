"""TensorRT as a runtime (needs the `tensorrt` package and a CUDA GPU): an engine built from the ONNX graph, fp16,
or int8 from a QDQ file (explicit quantization: TensorRT places int8 kernels where the file's Q/DQ pairs say),
(or fp32), always with sparse weights enabled so 2:4 layers may take sparse tensor-core kernels where TensorRT measures
them faster. The same engine from the command line:

    trtexec --onnx=model-int8.onnx --int8 --fp16 --sparsity=enable    # or --fp16 alone for a float file

It has not run: no machine used so far had TensorRT and a GPU. It is built and kept so that the protocol holds
it, and `tensorrt` is refused with one line where it is not installed or there is no GPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from hybridprune.deploy.runtimes.base import Call, OnnxModel, Runtime, Session
from hybridprune.errors import HybridPruneError

MAX_BATCH = 1024  # the largest batch an engine built from a dynamic-batch file takes


class TensorRtSession(Session):  # pragma: no cover - needs TensorRT and a GPU
    def __init__(self, engine: Any, device: torch.device) -> None:
        self.engine, self.device = engine, device
        self.context = engine.create_execution_context()
        self.input, self.output = engine.get_tensor_name(0), engine.get_tensor_name(1)

    def _bind(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(self.device, torch.float32).contiguous()  # the graph's input is float32 whatever runs inside
        self.context.set_input_shape(self.input, tuple(x.shape))
        out = torch.empty(tuple(self.context.get_tensor_shape(self.output)), device=self.device)
        self.context.set_tensor_address(self.input, x.data_ptr())
        self.context.set_tensor_address(self.output, out.data_ptr())
        return x, out

    def run(self, x: torch.Tensor) -> torch.Tensor:
        _, out = self._bind(x)
        self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream)
        torch.cuda.synchronize(self.device)
        return out.float().cpu()

    def bound(self, x: torch.Tensor) -> Call:
        buffers = self._bind(x)
        stream = torch.cuda.current_stream(self.device).cuda_stream
        return lambda: (self.context.execute_async_v3(stream), buffers)


class TensorRtRuntime(Runtime):
    name = "tensorrt"
    library = "tensorrt"
    install = "pip install tensorrt, on a machine with a CUDA GPU"
    precisions: ClassVar = {"cuda": ("fp32", "fp16", "int8")}

    def load(
        self, model: OnnxModel, precision: str, threads: int | None = None, device: str = "cuda"
    ) -> TensorRtSession:  # pragma: no cover - needs TensorRT and a GPU
        import tensorrt as trt

        self.check(precision, device)
        logger = trt.Logger(trt.Logger.ERROR)
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        data = Path(model).read_bytes() if isinstance(model, (str, Path)) else model
        if not parser.parse(data):
            raise HybridPruneError(f"TensorRT cannot parse the ONNX graph: {parser.get_error(0)}")
        config = builder.create_builder_config()
        if precision in ("fp16", "int8"):  # fp16 wherever int8 does not apply
            config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
        _dynamic_batch_profile(builder, network, config)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise HybridPruneError("TensorRT could not build an engine of the ONNX graph")
        engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
        return TensorRtSession(engine, torch.device(device if ":" in str(device) else "cuda"))

    def session_of(self, module: Any, x: torch.Tensor, precision: str, threads: int | None = None) -> Session:
        self.check(precision, x.device)  # before exporting anything
        return super().session_of(module, x, precision, threads)


def _dynamic_batch_profile(builder: Any, network: Any, config: Any) -> None:  # pragma: no cover - needs TensorRT
    """Batch sizes 1 to MAX_BATCH for a graph whose batch is dynamic (the files `export` writes)."""
    tensor = network.get_input(0)
    shape = tuple(tensor.shape)
    if shape[0] != -1:
        return
    rest = shape[1:]
    profile = builder.create_optimization_profile()
    profile.set_shape(tensor.name, (1, *rest), (min(64, MAX_BATCH), *rest), (MAX_BATCH, *rest))
    config.add_optimization_profile(profile)
