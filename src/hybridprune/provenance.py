"""Where a result came from: the versions of the stack, the accelerator and the git commit, written beside
every result (the CLI's results.json, benchmarks, the experiment store)."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path
from typing import Any


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
    import torch  # here, not at the top: writing files should not cost torch's import (lock test processes)
    import torch_pruning
    import torchvision

    from hybridprune.version import __version__

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
    import torch

    try:
        return int(torch.backends.cusparselt.version()) if torch.backends.cusparselt.is_available() else None
    except (AttributeError, RuntimeError):
        return None
