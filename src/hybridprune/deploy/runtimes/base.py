"""The protocol every runtime follows, and what all of them share: sessions, ONNX in memory, the CPU's
instruction sets.

A `Runtime` says whether it is installed here, which devices and precisions it takes (and, on a CPU, whether
the CPU has the instructions a precision needs), builds a `Session` from a module or an ONNX file at a precision,
and reports its versions. A `Session` runs float32 images to float32 logits (`run`) and gives a no-argument
callable with its input bound once (`bound`), which is what timing calls.
"""

from __future__ import annotations

import importlib.util
import io
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from hybridprune.config import DEPLOY_PRECISIONS
from hybridprune.errors import HybridPruneError, first_line
from hybridprune.hardware import BF16_FLAGS, cpu_flags, native_bf16

Call = Callable[[], object]
OnnxModel = bytes | str | Path  # an ONNX graph in memory, or a file


class Session:
    """A model ready to run in one runtime at one precision: float32 images in, float32 logits out."""

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a batch of images (float32, on the CPU)."""
        raise NotImplementedError

    def bound(self, x: torch.Tensor) -> Call:
        """A no-argument callable running `x` with its buffers bound once, as a latency-critical deployment
        would (what timing calls)."""
        raise NotImplementedError


class Runtime:
    """One runtime: what it needs, what it runs, how it loads a model. Subclasses set the class attributes and
    `load` (and `session_of` where the runtime runs modules rather than ONNX graphs)."""

    name: ClassVar[str]
    library: ClassVar[str]  # the module that must be importable
    install: ClassVar[str]  # how to get it
    precisions: ClassVar[dict[str, tuple[str, ...]]]  # device type -> precisions it runs there
    reads_onnx: ClassVar[bool] = True

    def installed(self) -> bool:
        return importlib.util.find_spec(self.library) is not None

    def unsupported(self, precision: str, device: torch.device | str = "cpu") -> str | None:
        """Why `precision` cannot run on `device` here (what is missing), or None when it can."""
        kind = torch.device(device).type
        if precision not in DEPLOY_PRECISIONS:
            return f"unknown precision {precision!r}; valid: {', '.join(DEPLOY_PRECISIONS)}"
        if kind not in self.precisions:
            return f"{self.name} runs on {' or '.join(self.precisions)}, not on {kind}"
        if precision not in self.precisions[kind]:
            return f"{self.name} runs {', '.join(self.precisions[kind])} on {kind}, not {precision}"
        if not self.installed():
            return f"{self.name} is not installed ({self.install})"
        if kind == "cuda" and not torch.cuda.is_available():
            return f"{self.name} on cuda needs a CUDA GPU, and torch sees none"
        return self.cpu_lacks(precision) if kind == "cpu" else None

    def cpu_lacks(self, precision: str) -> str | None:
        """What this CPU lacks for `precision` (None: nothing)."""
        if precision == "bf16" and native_bf16(cpu_flags()) is None:
            need = f"{self.name} bf16 needs a CPU with native bf16 ({' or '.join(BF16_FLAGS)})"
            if native_bf16(cpu_flags(cap="")) is not None:  # the CPU has it; the environment caps the kernels
                return f"{need}; ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA')} keeps the kernels below it"
            return f"{need}; this one has neither"
        return None

    def check(self, precision: str, device: torch.device | str = "cpu") -> None:
        """Raise one line naming what is missing when `precision` cannot run on `device` here."""
        reason = self.unsupported(precision, device)
        if reason:
            raise HybridPruneError(reason)

    def available(self, device: torch.device | str = "cpu") -> list[str]:
        """The precisions this runtime can run on `device` here."""
        return [p for p in self.precisions.get(torch.device(device).type, ()) if self.unsupported(p, device) is None]

    def load(self, model: OnnxModel, precision: str, threads: int | None = None, device: str = "cpu") -> Session:
        """A session of an ONNX graph (bytes or a checked file) at `precision`; int8 reads a QDQ graph."""
        raise HybridPruneError(f"{self.name} runs PyTorch modules, not ONNX files")

    def session_of(
        self, module: nn.Module, x: torch.Tensor, precision: str, threads: int | None = None
    ) -> Session:
        """A session of `module` at `precision` for inputs shaped like `x` (exported to ONNX in memory where the
        runtime reads ONNX). int8 needs calibration, so it comes from a QDQ file (`deploy.quantize`)."""
        if precision == "int8":
            raise HybridPruneError(f"{self.name} int8 runs a QDQ file: make one with `hybridprune quantize` first")
        return self.load(onnx_bytes(module, x), precision, threads, x.device.type)

    def versions(self) -> dict[str, str | None]:
        """The library's version, for the record (None when it is not installed)."""
        if not self.installed():
            return {self.library: None}
        module = importlib.import_module(self.library)
        return {self.library: str(getattr(module, "__version__", "unknown"))}


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
