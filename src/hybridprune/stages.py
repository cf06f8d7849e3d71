"""Long steps that say what they are doing: no silent minutes, and a bound on analysis that may never end.

Building a user's model, tracing its channel groups (Torch-Pruning's dependency tracing took more than 8 minutes
on timm's rexnet_100 here), profiling and calibration can take minutes on a large model. `long_stage` wraps such
a step: once it has run for `quiet_s` seconds it names itself on stderr and shows the time spent (updated in
place on a terminal, a line every `every_s` seconds in a log), so a slow model is told from a hung tool; past
its limit it stops with one line naming the stage and the model. The limit comes from `stage_limit` (the CLI's
`--analysis-timeout`, `DEFAULT_LIMIT_S` otherwise); it is enforced with SIGALRM, so only in the main thread
(elsewhere the stage is still shown, unbounded). Short steps, the usual case, print nothing.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TextIO

from hybridprune.config import AnalysisConfig
from hybridprune.errors import HybridPruneError

DEFAULT_LIMIT_S = AnalysisConfig().analysis_timeout
_LIMIT: ContextVar[float | None] = ContextVar("hybridprune_stage_limit", default=DEFAULT_LIMIT_S)
_BOUNDED: ContextVar[bool] = ContextVar("hybridprune_stage_bounded", default=False)  # an outer stage holds the alarm


class StageTimeout(HybridPruneError):
    """A bounded stage ran past its limit."""


@contextmanager
def stage_limit(seconds: float | None) -> Iterator[None]:
    """Bound the stages run inside the block to `seconds` each (None or 0: no bound).

    Example:
        >>> with stage_limit(0.2), long_stage("tracing channel groups of", "a slow net"):  # doctest: +ELLIPSIS
        ...     time.sleep(2)
        Traceback (most recent call last):
        ...
        hybridprune.stages.StageTimeout: tracing channel groups of a slow net stopped after 0.2 s (the limit: ...
    """
    token = _LIMIT.set(seconds or None)
    try:
        yield
    finally:
        _LIMIT.reset(token)


@contextmanager
def long_stage(
    what: str, subject: str, *, bounded: bool = True, quiet_s: float = 2.0, every_s: float = 30.0,
    stream: TextIO | None = None,
) -> Iterator[None]:  # fmt: skip
    """Run the block as the stage `what subject` (e.g. "tracing channel groups of", "timm:rexnet_100"): shown
    with its elapsed time once it has run `quiet_s` seconds, stopped in one line past the `stage_limit` when
    `bounded` (the limit of analysis that may never end; building or training is shown, never stopped).

    Example:
        >>> with long_stage("building", "resnet20"):
        ...     pass  # a short step prints nothing
    """
    label = f"{what} {subject}"
    limit = _LIMIT.get() if bounded else None
    with _ticker(label, quiet_s, every_s, stream or sys.stderr), _alarm(label, limit):
        yield


@contextmanager
def _ticker(label: str, quiet_s: float, every_s: float, stream: TextIO) -> Iterator[None]:
    """A daemon thread printing `label ... N s` while the block runs, from `quiet_s` on."""
    done, start = threading.Event(), time.monotonic()
    live = stream.isatty()

    def show() -> None:
        if done.wait(quiet_s):
            return
        while True:
            elapsed = f"{label} ... {time.monotonic() - start:.0f} s"
            print(f"\r{elapsed}" if live else elapsed, end="" if live else "\n", file=stream, flush=True)
            if done.wait(1.0 if live else every_s):
                break
        if live:
            print(f"\r{label}: {time.monotonic() - start:.0f} s", file=stream, flush=True)

    thread = threading.Thread(target=show, name=f"hybridprune stage: {label}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


@contextmanager
def _alarm(label: str, limit: float | None) -> Iterator[None]:
    """Raise StageTimeout in the block once `limit` seconds have passed (main thread only; an outer bounded
    stage keeps its own alarm). The alarm repeats every second, so code that swallows the exception (a library's
    `except Exception`) is interrupted again, and the block ending after a swallowed one still raises."""
    main = threading.current_thread() is threading.main_thread()
    if limit is None or _BOUNDED.get() or not main or not hasattr(signal, "setitimer"):  # Windows: no SIGALRM
        yield
        return
    fired: list[bool] = []

    def on_alarm(signum: int, frame: object) -> None:
        fired.append(True)
        raise StageTimeout(
            f"{label} stopped after {limit:g} s (the limit: --analysis-timeout {limit:g}); raise it for a model "
            "this large, or 0 for no limit"
        )

    previous = signal.signal(signal.SIGALRM, on_alarm)
    token = _BOUNDED.set(True)
    signal.setitimer(signal.ITIMER_REAL, limit, 1.0)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        _BOUNDED.reset(token)
    if fired:  # the block swallowed the exception and finished late: the stage still overran
        on_alarm(signal.SIGALRM, None)
