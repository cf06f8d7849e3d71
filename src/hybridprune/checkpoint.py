"""Checkpoints as safetensors: plain named tensors, the N:M masks, and the architecture as JSON.

Loading never unpickles anything, so a checkpoint cannot run code. The model is rebuilt through
its registered factory from the stored per-layer widths, then the weights are loaded strictly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .errors import HybridPruneError
from .models import model_spec, rebuild
from .outputs import atomic_target

FORMAT = "hybridprune-checkpoint"
VERSION = 1
MASK_PREFIX = "__nm_mask__."


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    masks: dict[str, torch.Tensor] | None = None,
    meta: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write weights, masks and architecture to `path` atomically (a temporary file, then a rename).

    Example:
        >>> import tempfile
        >>> from hybridprune.models import alexnet
        >>> p = save_checkpoint(Path(tempfile.mkdtemp()) / "m.safetensors", alexnet(width=0.125))
        >>> type(load_checkpoint(p)[0]).__name__
        'AlexNet'
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise HybridPruneError(f"{path} exists; pass --overwrite to replace it")
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    for name, mask in (masks or {}).items():
        tensors[MASK_PREFIX + name] = mask.detach().cpu().to(torch.bool).contiguous()
    header = {"format": FORMAT, "version": VERSION, "spec": model_spec(model), "meta": meta or {}}
    with atomic_target(path) as tmp:
        save_file(tensors, str(tmp), metadata={"hybridprune": json.dumps(header)})
    return path


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict[str, torch.Tensor], dict[str, Any]]:
    """Rebuild `(model, masks, meta)` from a checkpoint; bad files fail with one clear line."""
    path = Path(path)
    if not path.is_file():
        raise HybridPruneError(f"checkpoint {path} not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = json.loads((f.metadata() or {}).get("hybridprune", "null"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as e:
        raise HybridPruneError(
            f"{path} is not a readable hybridprune checkpoint (corrupted or another format: {e})"
        ) from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise HybridPruneError(f"{path} is a safetensors file but not a hybridprune checkpoint")
    if header.get("version") != VERSION:
        raise HybridPruneError(
            f"{path} has checkpoint version {header.get('version')}; this hybridprune reads {VERSION}"
        )
    masks = {k[len(MASK_PREFIX) :]: v for k, v in tensors.items() if k.startswith(MASK_PREFIX)}
    state = {k: v for k, v in tensors.items() if not k.startswith(MASK_PREFIX)}
    model = rebuild(header["spec"])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise HybridPruneError(f"{path}: weights do not match the stored architecture ({first[-1].strip()})") from None
    return model.eval(), masks, header.get("meta", {})
