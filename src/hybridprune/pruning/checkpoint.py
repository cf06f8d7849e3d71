"""Checkpoints as safetensors: plain named tensors, the N:M masks, and the architecture as JSON.

Loading never unpickles anything, so a checkpoint cannot run code, and a checkpoint never decides which
code is imported: the header names where the architecture came from (a built-in name, a torchvision
name, or a user's `module:factory`) and how it was pruned (Torch-Pruning's history as plain integers).
Loading builds the original, replays the history and loads the weights strictly. A user-code model is
rebuilt only when the caller names the same `module:factory` again. Every header field is checked for
type and range before anything is built: a header is untrusted input.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from hybridprune.errors import HybridPruneError
from hybridprune.models.sources import Classifier, ModelSource, build_model, model_spec
from hybridprune.outputs import atomic_target
from hybridprune.pruning.plan import replay_history_

FORMAT = "hybridprune-checkpoint"
VERSION = 2
READS = (1, 2)  # version 1: AlexNet only, described by per-layer widths
MASK_PREFIX = "__nm_mask__."
MAX_CLASSES = 100_000
MAX_IMAGE_SIZE = 4096
MAX_WIDTH = 16.0


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    masks: dict[str, torch.Tensor] | None = None,
    meta: dict[str, Any] | None = None,
    overwrite: bool = False,
    record: bool = False,
) -> Path:
    """Write weights, masks and architecture to `path` atomically (a temporary file, then a rename); with
    `record`, list it in its folder's manifest (a run folder's files, which --overwrite may remove).

    Example:
        >>> import tempfile
        >>> from hybridprune.models.sources import build_model
        >>> p = save_checkpoint(Path(tempfile.mkdtemp()) / "m.safetensors", build_model("resnet20", width=0.5))
        >>> load_checkpoint(p)[0].source.label
        'resnet20'
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise HybridPruneError(f"{path} exists; pass --overwrite to replace it")
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    bad = first_nonfinite(tensors)
    if bad is not None:  # a file that every load would refuse is never written
        line = nonfinite_line(bad, tensors[bad])
        raise HybridPruneError(f"{path} not written: {line}; if training diverged, a lower learning rate may help")
    for name, mask in (masks or {}).items():
        tensors[MASK_PREFIX + name] = mask.detach().cpu().to(torch.bool).contiguous()
    header = {"format": FORMAT, "version": VERSION, "spec": model_spec(model), "meta": meta or {}}
    with atomic_target(path, record=record) as tmp:
        save_file(tensors, str(tmp), metadata={"hybridprune": json.dumps(header)})
    return path


def load_checkpoint(
    path: str | Path, user_model: str | None = None
) -> tuple[Classifier, dict[str, torch.Tensor], dict[str, Any]]:
    """Rebuild `(model, masks, meta)` from a checkpoint; bad files fail with one clear line.

    `user_model`: the `module:factory` the user named; a checkpoint of user code loads only with it.
    """
    path = Path(path)
    header, tensors = read_checkpoint(path)
    masks = {k[len(MASK_PREFIX) :]: v for k, v in tensors.items() if k.startswith(MASK_PREFIX)}
    state = {k: v for k, v in tensors.items() if not k.startswith(MASK_PREFIX)}
    if header["version"] == 1:
        model, state = _rebuild_v1(path, header["spec"], state)
        masks = {_v1_key(k): v for k, v in masks.items()}
    else:
        model = rebuild(header["spec"], user_model, path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise HybridPruneError(f"{path}: weights do not match the stored architecture ({first[-1].strip()})") from None
    layers = dict(model.named_modules())
    for name, mask in masks.items():
        if (
            name not in layers
            or getattr(layers[name], "weight", None) is None
            or layers[name].weight.shape != mask.shape
        ):
            raise HybridPruneError(f"{path}: the N:M mask of {name!r} does not fit the model's layer")
    meta = header.get("meta", {})
    return model.eval(), masks, meta if isinstance(meta, dict) else {}


def read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The checked header and the tensors of a checkpoint file."""
    if not path.is_file():
        raise HybridPruneError(f"checkpoint {path} not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = json.loads((f.metadata() or {}).get("hybridprune", "null"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError, json.JSONDecodeError) as e:
        raise HybridPruneError(
            f"{path} is not a readable hybridprune checkpoint (corrupted or another format: {str(e)[:200]})"
        ) from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise HybridPruneError(f"{path} is a safetensors file but not a hybridprune checkpoint")
    if not _is_int(header.get("version")) or header.get("version") not in READS:
        raise HybridPruneError(
            f"{path} has checkpoint version {header.get('version')!r}; this hybridprune reads {READS}"
        )
    if not isinstance(header.get("spec"), dict):
        raise HybridPruneError(f"{path}: header field 'spec' must be an object")
    bad = first_nonfinite(tensors)
    if bad is not None:
        raise HybridPruneError(f"{path}: {nonfinite_line(bad, tensors[bad])}; a checkpoint must hold finite numbers")
    return header, tensors


def first_nonfinite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding NaN or infinity; None when every one is finite. One
    device sync however many tensors (they share a device).

    Example:
        >>> first_nonfinite({"a": torch.ones(2), "n": torch.tensor([3]), "b": torch.tensor([1.0, float("inf")])})
        'b'
    """
    floats = [(n, t) for n, t in tensors.items() if t.layout == torch.strided and t.dtype.is_floating_point]
    if not floats:
        return None
    finite = torch.stack([torch.isfinite(t).all() for _, t in floats])
    if bool(finite.all()):
        return None
    return floats[int((~finite).nonzero()[0, 0])][0]


def nonfinite_line(name: str, tensor: torch.Tensor) -> str:
    """What is wrong with a tensor `first_nonfinite` named, for a one-line error.

    Example:
        >>> nonfinite_line("fc.weight", torch.tensor([1.0, float("nan"), float("nan")]))
        "tensor 'fc.weight' holds NaN (2 of 3 values)"
    """
    what = "NaN" if bool(torch.isnan(tensor).any()) else "infinity"
    return f"tensor {name!r} holds {what} ({int((~torch.isfinite(tensor)).sum())} of {tensor.numel()} values)"


def checkpoint_source(path: str | Path) -> ModelSource:
    """Where a checkpoint's architecture came from, read from its checked header (nothing is built)."""
    header, _ = read_checkpoint(Path(path))
    if header["version"] == 1:
        return ModelSource("builtin", "alexnet")
    return _checked_spec(header["spec"], path)[0]


def rebuild(spec: dict[str, Any], user_model: str | None = None, path: Path | str = "checkpoint") -> Classifier:
    """Build the original model a spec describes and replay its pruning history (weights left as built)."""
    source, shape, history = _checked_spec(spec, path)
    if source.kind == "user" and user_model != source.name:
        raise HybridPruneError(
            f"{path} holds a model built by user code {source.name!r}; pass --model {source.name} to load it "
            "(hybridprune never imports code that a file names)"
        )
    model = build_model(
        source, in_channels=shape["channels"], num_classes=shape["num_classes"], image_size=shape["image_size"]
    )
    if model.net_channels != shape["net_channels"]:
        raise HybridPruneError(f"{path}: the rebuilt {source.label} takes {model.net_channels}-channel images, "
                               f"the header says {shape['net_channels']}")  # fmt: skip
    return replay_history_(model, history)


def _checked_spec(spec: dict[str, Any], path: Path | str) -> tuple[ModelSource, dict[str, int], list]:
    model, shape, history = spec.get("model"), spec.get("input"), spec.get("history", [])
    if not isinstance(model, dict) or not isinstance(shape, dict) or not isinstance(history, list):
        raise HybridPruneError(f"{path}: header needs objects 'model' and 'input' and a list 'history'")
    kind, name, args = model.get("kind"), model.get("name"), model.get("args", {})
    if kind not in ("builtin", "torchvision", "user") or not isinstance(name, str) or not isinstance(args, dict):
        raise HybridPruneError(f"{path}: header 'model' needs kind builtin|torchvision|user, a name and args")
    _check_args(args, path)
    bounds = {"channels": 16, "image_size": MAX_IMAGE_SIZE, "num_classes": MAX_CLASSES, "net_channels": 16}
    for key, top in bounds.items():
        value = shape.get(key)
        if not _is_int(value) or not (1 <= value <= top):
            raise HybridPruneError(f"{path}: header input.{key} must be an integer in [1, {top}], got {value!r}")
    for entry in history:
        if not (
            isinstance(entry, list)
            and len(entry) == 3
            and isinstance(entry[0], str)
            and isinstance(entry[1], bool)
            and isinstance(entry[2], list)
            and all(_is_int(i) and 0 <= i < 1_000_000 for i in entry[2])
        ):
            raise HybridPruneError(f"{path}: header history entries must be [module name, bool, [indices]]")
    try:
        return ModelSource(kind, name, args), shape, history
    except HybridPruneError as e:  # a name no --model could give: say which file holds it
        raise HybridPruneError(f"{path}: header {e}") from None


def _check_args(args: dict[str, Any], path: Path | str) -> None:
    """Factory arguments from a file: plain numbers and short lists only, within bounds (no huge allocations)."""
    shape_args = {"in_channels", "num_classes", "image_size"}
    for key, value in args.items():
        if key in shape_args:
            raise HybridPruneError(f"{path}: header model argument {key} belongs in 'input', not in 'args'")
        values = value if isinstance(value, list) else [value]
        ok = all(
            (_is_int(v) and 1 <= v <= 8192) or (isinstance(v, float) and math.isfinite(v) and 0 < v <= MAX_WIDTH)
            for v in values
        )
        if not ok or len(values) > 64:
            raise HybridPruneError(f"{path}: header model argument {key}={value!r} is out of range")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --- version 1: AlexNet described by widths, its modules at the top level --------------------------


def _v1_key(key: str) -> str:
    return key if key.startswith("normalize.") else "net." + key


def _rebuild_v1(path: Path, spec: dict[str, Any], state: dict[str, torch.Tensor]) -> tuple[Classifier, dict]:
    if spec.get("name") != "alexnet":
        raise HybridPruneError(f"{path}: a version-1 checkpoint must hold an alexnet, got {spec.get('name')!r}")
    args = {"widths": spec.get("widths"), "hidden": spec.get("hidden")}
    if not all(isinstance(v, list) for v in args.values()):
        raise HybridPruneError(f"{path}: version-1 header needs lists 'widths' and 'hidden'")
    _check_args(args, path)
    shape = {
        "channels": spec.get("in_channels"),
        "image_size": spec.get("image_size"),
        "num_classes": spec.get("num_classes"),
        "net_channels": spec.get("in_channels"),
    }
    model_spec_v2 = {"model": {"kind": "builtin", "name": "alexnet", "args": args}, "input": shape, "history": []}
    return rebuild(model_spec_v2, path=path), {_v1_key(k): v for k, v in state.items()}


# --- trained weights of the user's own ------------------------------------------------------------


def load_weights_(model: Classifier, path: str | Path) -> Classifier:
    """Load a plain state dict of the network (`.safetensors`, or `.pt`/`.pth` read with weights_only=True,
    never unpickling code) into `model.net`, strictly. Keys may carry DDP's `module.` prefix."""
    path = Path(path)
    if not path.is_file():
        raise HybridPruneError(f"weights file {path} not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unreadable, corrupted, or a pickle of code: one line either way
        raise HybridPruneError(f"{path} is not a readable state dict ({type(e).__name__}: {str(e)[:200]})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(
        isinstance(v, torch.Tensor) and v.layout == torch.strided for v in state.values()
    ):
        raise HybridPruneError(f"{path} must hold a state dict: parameter names mapped to (dense) tensors")
    bad = first_nonfinite(state)
    if bad is not None:
        raise HybridPruneError(f"{path}: {nonfinite_line(bad, state[bad])}; --weights must hold finite numbers")
    expected = set(model.net.state_dict())
    if set(state) != expected:  # saved from a DDP wrapper or from a hybridprune model: take the prefix off
        stripped = {k.removeprefix("module.").removeprefix("net."): v for k, v in state.items()}
        state = stripped if set(stripped) == expected else state
    try:
        model.net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
        raise HybridPruneError(f"{path} does not fit {model.source.label}: {lines[-1][:300] if lines else e}") from None
    return model
