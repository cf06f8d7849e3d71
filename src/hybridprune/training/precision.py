"""The precision training computes in: the one named, or `auto`, chosen by measuring.

`auto` on a GPU is bf16 where the GPU has it, else fp16 (with a gradient scaler). On a CPU it is bf16 only where
the CPU computes bf16 natively (AMX or AVX512-BF16) and a training step of this model on a batch of its data
measured at least `MIN_GAIN` times faster in bf16 than in fp32 (here, on AMX: the default job in 48 s against
73 s); fp32 elsewhere, since emulated bf16 is slower and costs accuracy for nothing. The weights stay float32
under every precision (autocast computes in bf16, the optimizer updates float32 weights), so 2:4 masks re-zero
them exactly, as in fp32.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hybridprune.errors import HybridPruneError
from hybridprune.hardware import native_bf16
from hybridprune.pruning.graph import output_tensors

MIN_GAIN = 1.1  # bf16 must save a tenth of a step: below that, timing noise could pick it for nothing
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """A resolved training precision and, when `auto` chose it, why (one line to show the user)."""

    name: str
    reason: str = ""

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The dtype autocast computes in; None for fp32 (no autocast)."""
        return DTYPES[self.name]


def choose_precision(
    name: str,
    device: torch.device,
    step_ms: Callable[[torch.dtype | None], float] | None = None,
    flags: set[str] | None = None,
) -> Precision:
    """Resolve `name` (auto, fp32, bf16, fp16) on `device`. On a CPU with native bf16, `auto` times a training
    step with `step_ms(dtype)` (None: fp32) and takes bf16 only when it is `MIN_GAIN` times faster; `flags` are
    the CPU's (read from /proc/cpuinfo when None).

    Example:
        >>> cpu = torch.device("cpu")
        >>> choose_precision("auto", cpu, flags={"avx2"}).name
        'fp32'
        >>> fake = {None: 30.0, torch.bfloat16: 20.0}.__getitem__  # measured: bf16 1.5x faster
        >>> choose_precision("auto", cpu, fake, flags={"amx_bf16"}).reason
        'precision auto: bf16 (native on this CPU: amx_bf16; a training step 1.50x faster than fp32 here)'
    """
    if name not in DTYPES and name != "auto":
        raise HybridPruneError(f"unknown precision {name!r}; valid: auto, {', '.join(DTYPES)}")
    if name == "fp16" and device.type != "cuda":
        raise HybridPruneError("fp16 training needs a CUDA GPU; use fp32 (or bf16) on the CPU")
    if name != "auto":
        return Precision(name)
    if device.type == "cuda":
        gpu = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return Precision(gpu, f"precision auto: {gpu} (this GPU's fastest training precision)")
    native = native_bf16(flags)
    if native is None:
        return Precision("fp32", "precision auto: fp32 (this CPU has no native bf16: neither AMX nor AVX512-BF16)")
    if step_ms is None:
        return Precision("fp32", f"precision auto: fp32 (bf16 is native here, {native}, but nothing was measured)")
    fp32_ms, bf16_ms = step_ms(None), step_ms(torch.bfloat16)
    gain = fp32_ms / bf16_ms
    chosen = "bf16" if gain >= MIN_GAIN else "fp32"
    return Precision(
        chosen, f"precision auto: {chosen} (native on this CPU: {native}; a training step {gain:.2f}x faster "
        "than fp32 here)" if chosen == "bf16" else f"precision auto: fp32 (bf16 is native here, {native}, but a "
        f"training step measured only {gain:.2f}x faster)",
    )  # fmt: skip


def training_step_timer(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, rounds: int = 3
) -> Callable[[torch.dtype | None], float]:
    """`step_ms(dtype)` for `choose_precision`: the median milliseconds of a forward and backward pass of a copy
    of `model` on `(x, y)` under autocast to `dtype` (None: fp32), after one untimed pass. The model itself and
    its BatchNorm statistics are untouched.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
        >>> timer = training_step_timer(net, torch.rand(2, 1, 8, 8), torch.tensor([0, 1]), rounds=1)
        >>> timer(None) > 0
        True
    """
    probe = copy.deepcopy(model).train()
    device = x.device

    def step_ms(dtype: torch.dtype | None) -> float:
        times = []
        for i in range(rounds + 1):
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                loss = F.cross_entropy(output_tensors(probe(x))[0].float(), y)
            loss.backward()
            probe.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i:  # the first pass warms caches and kernel choices
                times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    return step_ms
