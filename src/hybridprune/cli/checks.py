"""Checks that several commands make on their inputs before any work: a --json target, a checkpoint's pattern."""

from __future__ import annotations

from typing import Any

from hybridprune.config import NMPattern
from hybridprune.errors import HybridPruneError


def checkpoint_pattern(path: str, meta: dict[str, Any]) -> NMPattern:
    """The N:M pattern a checkpoint records (2:4 when it records none); a malformed one is bad input.

    Example:
        >>> checkpoint_pattern("model.safetensors", {"nm": "1:4"})
        NMPattern(n=1, m=4)
    """
    text = meta.get("nm", "2:4")
    if not isinstance(text, str):
        raise HybridPruneError(f"{path}: header meta.nm must be a pattern such as '2:4', got {text!r}")
    return NMPattern.parse(text)


def check_json_target(path: str | None, overwrite: bool) -> None:
    """Before any work: a --json target must be a writable file path (existing only with --overwrite)."""
    from hybridprune.outputs import check_output_file

    if path:
        check_output_file(path, overwrite)
