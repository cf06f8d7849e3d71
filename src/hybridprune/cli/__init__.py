"""The `hybridprune` command: one module per command family, each thin (parse flags, build configs, call the library).

- `flags`: the parser, numeric flags bounded by the config field they set, the flag groups commands share
- `checks`: input checks several commands make before any work
- `run`: run, train, prune, evaluate
- `profile`: profile (latency tables)
- `deploy`: bench, convert, export
- `quantize`: quantize (INT8 QDQ files); evaluate's ONNX-file and --runtime paths
- `grid`: experiment, report

Each family module adds its parsers (`add_parsers`) and binds each command to its function (`handler`); the
library is imported inside the command functions, so `hybridprune --help` and `COMMAND --help` import no torch.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from hybridprune.cli import deploy, grid, profile, quantize, run
from hybridprune.cli.flags import Parser, config_from_args, numeric_flags
from hybridprune.config import AnalysisConfig
from hybridprune.errors import HybridPruneError
from hybridprune.stages import DEFAULT_LIMIT_S, stage_limit


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command.

    Example:
        >>> build_parser().parse_args(["evaluate", "model.safetensors"]).handler.__name__
        'cmd_evaluate'
    """
    parser = Parser(prog="hybridprune", description="Hybrid pruning of CNNs: filter pruning ranked for 2:4, then N:M.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for family in (run, profile, deploy, quantize, grid):
        family.add_parsers(sub)
    return parser


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """SIGTERM (a scheduler's or `kill`'s stop) ends the command as Ctrl-C does: finished steps kept, one line.
    Only the main thread can take signals; elsewhere (a library caller's thread) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def analysis_limit(args: argparse.Namespace) -> float:
    """The seconds tracing may take (`--analysis-timeout`; the default for commands without the flag)."""
    if not hasattr(args, "analysis_timeout"):
        return DEFAULT_LIMIT_S
    return config_from_args(AnalysisConfig, args).analysis_timeout


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `hybridprune` command; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = list(argv)
    try:
        with stop_on_sigterm(), stage_limit(analysis_limit(args)):
            args.handler(args)
    except HybridPruneError as e:
        print(f"hybridprune {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        how = "stopped by SIGTERM" if str(e) == "SIGTERM" else "interrupted"
        print(
            f"\nhybridprune {args.command}: {how}; finished steps are saved, rerun with --resume", file=sys.stderr
        )
        return 130
    return 0


def __getattr__(name: str) -> Any:
    # NUMERIC_FLAGS: flag -> (kind, low, high), the loosest bound any command gives the flag, for tests written
    # before bounds moved into the config classes; numeric_flags(build_parser()) has each command's own.
    if name == "NUMERIC_FLAGS":
        table: dict[str, tuple[type, float, float]] = {}
        for (_, flag), bound in numeric_flags(build_parser()).items():
            low, high = bound.limits
            kind, old_low, old_high = table.get(flag, (bound.kind, low, high))
            table[flag] = (kind, min(low, old_low), max(high, old_high))
        return table
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
