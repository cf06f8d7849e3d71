"""OpenVINO as a runtime (the `openvino` extra): its CPU plugin reading the ONNX file directly.

Precision is set, never left to the plugin: by default OpenVINO computes in bf16 wherever the CPU has AMX or
AVX512-BF16, so "fp32" here sets the inference precision hint to f32 (fp32 means fp32), "bf16" sets it to bf16
(refused on a CPU without native bf16), and "int8" runs a QDQ file with the f32 hint, so the quantized layers run
int8 (OpenVINO's low-precision transformations read the QuantizeLinear/DequantizeLinear pairs) and whatever the
quantizer left in float runs fp32, as the file says. One stream, latency hint, pinned thread count.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from hybridprune.deploy.runtimes.base import Call, OnnxModel, Runtime, Session
from hybridprune.errors import HybridPruneError

HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}


class OpenVinoSession(Session):
    def __init__(self, compiled: Any) -> None:
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self.output = compiled.output(0)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        result = self.request.infer({0: np.ascontiguousarray(x.detach().cpu().float().numpy())})
        return torch.from_numpy(np.array(result[self.output], dtype=np.float32, copy=True))

    def bound(self, x: torch.Tensor) -> Call:
        import openvino as ov

        array = np.ascontiguousarray(x.detach().cpu().float().numpy())
        request = self.compiled.create_infer_request()
        request.set_input_tensor(ov.Tensor(array, shared_memory=True))
        request.infer()  # the output buffer is allocated here, once

        def call() -> object:
            request.infer()
            return array  # keeps the shared input alive as long as the call

        return call


class OpenVinoRuntime(Runtime):
    name = "openvino"
    library = "openvino"
    install = 'pip install -e ".[openvino]"'
    precisions: ClassVar = {"cpu": ("fp32", "bf16", "int8")}

    def load(
        self, model: OnnxModel, precision: str, threads: int | None = None, device: str = "cpu"
    ) -> OpenVinoSession:
        import openvino as ov

        self.check(precision, device)
        config = {
            "INFERENCE_PRECISION_HINT": HINTS[precision],
            "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads()),
            "NUM_STREAMS": 1,
            "PERFORMANCE_HINT": "LATENCY",
        }
        core = ov.Core()
        try:
            graph = core.read_model(str(model) if isinstance(model, (str, Path)) else model)
            compiled = core.compile_model(graph, "CPU", config)
        except RuntimeError as e:
            where = "the exported graph" if isinstance(model, bytes) else str(model)
            raise HybridPruneError(f"openvino cannot load {where} ({last_line(e)})") from None
        return OpenVinoSession(compiled)

    def versions(self) -> dict[str, str | None]:
        if not self.installed():
            return {"openvino": None}
        import openvino as ov

        return {"openvino": ov.get_version()}


def last_line(e: BaseException, limit: int = 200) -> str:
    """OpenVINO's message, whose first lines only say which source file threw: its last non-empty line.

    Example:
        >>> last_line(RuntimeError("Exception from core.cpp:105:\\nUnable to read the model.\\n"))
        'Unable to read the model.'
    """
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[-1][:limit] if lines else type(e).__name__
