"""How anything is timed: warm-up calls first, then wall clock on a CPU or CUDA events on a GPU."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def time_calls(fn: Callable[[], object], repeats: int, device: torch.device, warmup: int = 3) -> list[float]:
    """Milliseconds of each of `repeats` calls after `warmup` untimed ones (CUDA events on a GPU).

    Example:
        >>> len(time_calls(lambda: None, 4, torch.device("cpu"), warmup=1))
        4
    """
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in events]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def median_ms(fn: Callable[[], object], repeats: int, device: torch.device, warmup: int = 3) -> float:
    """Median wall time of fn in milliseconds."""
    return float(torch.tensor(time_calls(fn, repeats, device, warmup)).median())
