"""What every run writes beside its results: versions, the git commit, atomic JSON files."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


def git_commit() -> str | None:
    """The commit of the hybridprune source tree ('+dirty' when it has uncommitted changes), or None outside
    a git checkout."""
    here = Path(__file__).parent
    try:
        head = _git(["rev-parse", "HEAD"], here)
        dirty = _git(["status", "--porcelain", "--untracked-files=no", "."], here)
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}+dirty" if head and dirty else head or None


def _git(args: list[str], cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=5, check=True).stdout.strip()


def environment() -> dict[str, Any]:
    """Versions of the stack and the accelerator, for every result file.

    Example:
        >>> "torch" in environment()
        True
    """
    import torch_pruning
    import torchvision

    from . import __version__

    env: dict[str, Any] = {
        "hybridprune": __version__,
        "commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "torch_pruning": torch_pruning.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cusparselt": _cusparselt_version(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "gpu": None,
        "compute_capability": None,
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    return env


def _cusparselt_version() -> int | None:
    try:
        return int(torch.backends.cusparselt.version()) if torch.backends.cusparselt.is_available() else None
    except (AttributeError, RuntimeError):
        return None


def write_json(path: str | Path, obj: Any) -> Path:
    """Write JSON atomically: readers see the old file or the new one, never half of one."""
    return write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def write_text(path: str | Path, text: str) -> Path:
    """Write a text file atomically."""
    with atomic_target(path) as tmp:
        tmp.write_text(text)
    return Path(path)


@contextmanager
def atomic_target(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path`, renamed onto it when the block succeeds and removed when it fails:
    readers see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
