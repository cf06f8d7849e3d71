"""How anything is timed: warm-up calls first, then wall clock on a CPU or CUDA events on a GPU."""

from __future__ import annotations

import os
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


def busy_note(threads: int | None = None) -> str | None:
    """A line saying that other work shares the CPU being timed (a load average above its idle cores), or None.

    Example:
        >>> busy_note() is None or "load average" in busy_note()
        True
    """
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    cores = os.cpu_count() or 1
    if load <= cores + 0.5:  # the timing process itself keeps its threads' cores busy
        return None
    timed = f"{threads} of {cores}" if threads else f"{cores}"
    return (f"load average {load:.1f} with {timed} cores timed: other work shares this machine, so the latencies "
            "may be off")  # fmt: skip
