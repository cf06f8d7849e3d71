"""ONNX Runtime as a runtime: its CPU execution provider, fp32, and int8 from a QDQ file (its own quantizer's
output, `deploy.quantize`). Sessions pin the intra-op threads and do not spin between runs, so that runtimes
timed in one round-robin do not steal each other's cores."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from hybridprune.deploy.runtimes.base import Call, OnnxModel, Runtime, Session
from hybridprune.errors import HybridPruneError, first_line


class OrtSession(Session):
    def __init__(self, session: Any) -> None:
        self.session = session
        self.input = session.get_inputs()[0].name

    def run(self, x: torch.Tensor) -> torch.Tensor:
        feed = {self.input: x.detach().cpu().float().numpy()}
        return torch.from_numpy(np.asarray(self.session.run(None, feed)[0])).float()

    def bound(self, x: torch.Tensor) -> Call:
        # outputs go into buffers allocated once, as a latency-critical deployment binds them: a fresh output
        # array per call would add page faults in proportion to its size, which a whole graph (reusing its
        # arena) never pays, and so skew a table of single layers against the model they add up to
        feed = {self.input: np.ascontiguousarray(x.detach().cpu().float().numpy())}
        binding = self.session.io_binding()
        for name, array in feed.items():
            binding.bind_cpu_input(name, array)
        outputs: list = []  # the buffers stay alive as long as the call
        for meta, first in zip(self.session.get_outputs(), self.session.run(None, feed), strict=True):
            buffer = np.empty_like(first)
            binding.bind_output(meta.name, "cpu", 0, buffer.dtype, buffer.shape, buffer.ctypes.data)
            outputs.append(buffer)
        session = self.session

        def call() -> list:
            session.run_with_iobinding(binding)
            return outputs

        return call


class OnnxRuntime(Runtime):
    name = "onnxruntime"
    library = "onnxruntime"
    install = 'pip install -e ".[export]"'
    precisions: ClassVar = {"cpu": ("fp32", "int8")}

    def load(self, model: OnnxModel, precision: str, threads: int | None = None, device: str = "cpu") -> OrtSession:
        import onnxruntime as ort

        self.check(precision, device)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads must not steal cores
        source = str(model) if isinstance(model, (str, Path)) else model
        try:
            session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - ONNX Runtime's errors for a graph it cannot load
            raise HybridPruneError(f"onnxruntime cannot load {_label(model)} ({first_line(e)})") from None
        return OrtSession(session)


def _label(model: OnnxModel) -> str:
    return "the exported graph" if isinstance(model, bytes) else str(model)
