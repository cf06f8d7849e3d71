"""Timing one layer the way a deployment runs it, and choosing a cuSPARSELt algorithm per sparse layer.

Kernel time comes from replaying a CUDA graph of the layer (what `deploy/runtimes.py` does for whole models):
PyTorch builds cuSPARSELt's descriptors and plan on every eager call (tens to hundreds of microseconds of host
work), which a graph replay does not repeat. Where capture fails, the eager time is used and the caller is told.

cuSPARSELt has several algorithm configurations per GEMM shape (`alg_id`; PyTorch uses 0 unless told); the
fastest differs by shape and some have given wrong results (pytorch#155333), so each candidate is run, its
output checked against the dense layer, and the fastest correct one kept, once, at conversion.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from hybridprune.deploy.timing import median_ms

ALG_IDS_TRIED = 4  # ids 0..3, plus cuSPARSELt's own search result: a few tries, not every configuration
ALG_TOLERANCE = 2e-2  # max|sparse - dense| / max|dense| an algorithm may differ by (fp16/bf16 accumulation order)


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    """max|out - reference| / max|reference|, in float32.

    Example:
        >>> relative_error(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 4.0]))
        0.5
    """
    ref = reference.float()
    return float((out.float() - ref).abs().max() / ref.abs().max().clamp_min(torch.finfo(torch.float32).tiny))


def layer_input(module: nn.Module, input_shape: tuple[int, ...]) -> torch.Tensor:
    """A random input of `input_shape` on the module's device and dtype; 4-D inputs channels-last, as the
    converted model hands them on (GemmConv2d writes channels-last)."""
    param = next(module.parameters())
    x = torch.randn(input_shape, device=param.device, dtype=param.dtype)
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


@torch.no_grad()
def kernel_ms(module: nn.Module, x: torch.Tensor, repeats: int = 20) -> tuple[float, str]:
    """Median milliseconds of one call of `module(x)` without host overhead (a CUDA graph replayed), and '' or a
    note saying the time is eager (CPU, or capture failed).

    Example:
        >>> ms, note = kernel_ms(nn.Linear(4, 4), torch.rand(2, 4), repeats=2)
        >>> ms > 0, note
        (True, 'eager (cpu)')
    """
    if x.device.type != "cuda":
        return median_ms(lambda: module(x), repeats, x.device), f"eager ({x.device.type})"
    try:
        replay = _captured(module, x)
    except Exception as e:  # noqa: BLE001 - a kernel that cannot be captured is timed eagerly, and said so
        torch.cuda.synchronize(x.device)
        first = (str(e).splitlines() or [type(e).__name__])[0]
        return median_ms(lambda: module(x), repeats, x.device), f"eager (CUDA graph capture failed: {first})"
    return median_ms(replay, repeats, x.device), ""


def _captured(module: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    static_x = x.clone()
    stream = torch.cuda.Stream(x.device)
    stream.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm up on a side stream: lazy initialisation must not happen during capture
            module(static_x)
    torch.cuda.current_stream(x.device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        module(static_x)
    return graph.replay


@torch.no_grad()
def tune_cusparselt_alg(sparse: nn.Module, dense: nn.Module, x: torch.Tensor) -> tuple[float | None, str]:
    """Set `sparse.weight.alg_id_cusparselt` to the fastest algorithm whose output matches `dense(x)` within
    ALG_TOLERANCE; returns its kernel time and a note (time None and the reason when none matches).

    `sparse` is a layer from `sparse_module` (a GemmConv2d or GemmLinear with a cuSPARSELt weight), `dense` the
    2:4-masked layer it came from. Needs a GPU with cuSPARSELt.
    """
    reference = dense(x)
    times: dict[int, tuple[float, str]] = {}
    wrong: list[str] = []
    for alg in _alg_candidates(sparse, x):
        sparse.weight.alg_id_cusparselt = alg
        try:
            err = relative_error(sparse(x), reference)
        except RuntimeError:  # an id this cuSPARSELt does not have (a host-side status, not a device fault)
            continue
        if err > ALG_TOLERANCE:
            wrong.append(f"alg {alg} off by {err:.1e}")
            continue
        times[alg] = kernel_ms(sparse, x)
    if not times:
        sparse.weight.alg_id_cusparselt = 0
        return None, "no cuSPARSELt algorithm matched the dense layer (" + ("; ".join(wrong) or "none ran") + ")"
    best = min(times, key=lambda a: times[a][0])
    sparse.weight.alg_id_cusparselt = best
    ms, note = times[best]
    skipped = f"; rejected {', '.join(wrong)}" if wrong else ""
    return ms, f"cuSPARSELt alg {best} of {sorted(times)}{skipped}" + (f"; {note}" if note else "")


def _alg_candidates(sparse: nn.Module, x: torch.Tensor) -> list[int]:
    """Ids 0..ALG_IDS_TRIED-1 and the one cuSPARSELt's own search picks for this operand."""
    ids = set(range(ALG_IDS_TRIED))
    operand = sparse.operand(x)
    operand = operand[0] if isinstance(operand, tuple) else operand
    try:  # the search runs the GEMM as PyTorch's wrapper does: the operand transposed, the result transposed
        ids.add(int(torch._cslt_sparse_mm_search(sparse.weight.packed, operand.t(), transpose_result=True)))
    except (RuntimeError, AttributeError):  # no search in this PyTorch, or a shape it pads: the fixed ids only
        pass
    return sorted(ids)
