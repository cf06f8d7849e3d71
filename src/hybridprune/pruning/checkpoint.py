"""Checkpoints as safetensors: plain named tensors, the N:M masks, and the architecture as JSON.

Loading never unpickles anything, so a checkpoint cannot run code, and a checkpoint never decides which
code is imported: the header names where the architecture came from (a built-in name, a torchvision
or timm name, or a user's `module:factory`) and how it was pruned (Torch-Pruning's history as plain integers).
Loading builds the original, replays the history and loads the weights strictly. A user-code model is
rebuilt only when the caller names the same `module:factory` again. Every header field is checked for
type and range before anything is built: a header is untrusted input.

Any other nn.Module (a torchvision model built directly, the user's own class) saves the same way, its
header holding kind `instance`: its class name (shown in messages, never imported), the shape of one
input it was traced with, and its pruning history (`model.pruning_history`, kept on the module by filter
pruning). Loading it takes an unpruned instance, `load_checkpoint(path, model=fresh)`, and replays the
history onto that instance.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from hybridprune.config import TIMM_ARGS, ModelSource
from hybridprune.errors import HybridPruneError
from hybridprune.models.sources import AUX_HEADS, Classifier, build_model, model_spec
from hybridprune.outputs import atomic_target
from hybridprune.parse import loads_json
from hybridprune.pruning.graph import known_input_shape, unwrapped, unwrapped_name
from hybridprune.pruning.plan import replay_history_

FORMAT = "hybridprune-checkpoint"
VERSION = 2
READS = (1, 2)  # version 1: AlexNet only, described by per-layer widths
MASK_PREFIX = "__nm_mask__."
MAX_CLASSES = 100_000
MAX_IMAGE_SIZE = 4096
MAX_WIDTH = 16.0
INSTANCE = "instance"  # the header's model kind for a plain nn.Module: loading needs an unpruned instance
MAX_INPUT_DIMS = 8


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    masks: dict[str, torch.Tensor] | None = None,
    meta: dict[str, Any] | None = None,
    overwrite: bool = False,
    record: bool = False,
    *,
    example_inputs: torch.Tensor | None = None,
) -> Path:
    """Write weights, masks and architecture to `path` atomically (a temporary file, then a rename); with
    `record`, list it in its folder's manifest (a run folder's files, which --overwrite may remove).

    Any nn.Module (unwrapped from DDP and torch.compile): a plain one is saved with its pruning history and
    the input shape it was traced with (`example_inputs` gives it where filter pruning did not record it), to be
    loaded with `load_checkpoint(path, model=an unpruned instance)`.

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
    model = unwrapped(model)
    spec = model_spec(model) if isinstance(model, Classifier) else module_spec(model, example_inputs)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    bad = first_nonfinite(tensors)
    if bad is not None:  # a file that every load would refuse is never written
        line = nonfinite_line(bad, tensors[bad])
        raise HybridPruneError(f"{path} not written: {line}; if training diverged, a lower learning rate may help")
    for name, mask in (masks or {}).items():
        tensors[MASK_PREFIX + unwrapped_name(name)] = mask.detach().cpu().to(torch.bool).contiguous()
    header = {"format": FORMAT, "version": VERSION, "spec": spec, "meta": meta or {}}
    with atomic_target(path, record=record) as tmp:
        save_file(tensors, str(tmp), metadata={"hybridprune": json.dumps(header)})
    return path


def load_checkpoint(
    path: str | Path, model: str | nn.Module | None = None, *, user_model: str | None = None
) -> tuple[nn.Module, dict[str, torch.Tensor], dict[str, Any]]:
    """Rebuild `(model, masks, meta)` from a checkpoint; bad files fail with one clear line.

    `model`: the `module:factory` the user named (a checkpoint of user code loads only with it; `user_model=`
    is its older name), or an unpruned nn.Module instance built by the user: the checkpoint's pruning history
    is replayed onto that instance and the weights loaded into it strictly (a history or weights that do not
    fit it are one line). A checkpoint of a plain module (see the module docstring) loads only that way.

    Example:
        >>> import tempfile, torchvision
        >>> from hybridprune.pruning.filters import prune_filters_
        >>> from hybridprune.config import PruneConfig
        >>> net, x = torchvision.models.resnet18(num_classes=10).eval(), torch.rand(2, 3, 32, 32)
        >>> _ = prune_filters_(net, PruneConfig(metric="l1", filter_ratio=0.5), [x])
        >>> p = save_checkpoint(Path(tempfile.mkdtemp()) / "r18.safetensors", net)
        >>> fresh = torchvision.models.resnet18(num_classes=10)
        >>> loaded, masks, meta = load_checkpoint(p, model=fresh)
        >>> loaded is fresh, torch.equal(loaded(x), net(x))
        (True, True)
    """
    path = Path(path)
    if user_model is not None and model is not None and model != user_model:
        raise HybridPruneError("give the model once: model= (user_model= is its older name)")
    model = user_model if model is None else model
    if model is not None and not isinstance(model, (str, nn.Module)):
        raise HybridPruneError(f"model= takes a module:factory string or an nn.Module, got {type(model).__name__}")
    header, tensors = read_checkpoint(path)
    masks = {k[len(MASK_PREFIX) :]: v for k, v in tensors.items() if k.startswith(MASK_PREFIX)}
    state = {k: v for k, v in tensors.items() if not k.startswith(MASK_PREFIX)}
    if header["version"] == 1:
        built, state = _rebuild_v1(path, header["spec"], state)
        masks = {_v1_key(k): v for k, v in masks.items()}
    elif isinstance(model, nn.Module):
        built = _replayed_instance(header["spec"], model, path)
    else:
        built = rebuild(header["spec"], model, path)
    model = built
    try:
        model.load_state_dict(with_metadata(state, model), strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise HybridPruneError(
            f"{path}: weights do not match the {'stored architecture' if isinstance(model, Classifier) else 'model'} "
            f"({first[-1].strip()})"
        ) from None
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


def with_metadata(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """`state` with the version metadata of `model`'s own state dict where it carries none (a safetensors file, or
    a dict rebuilt key by key): modules whose `_load_from_state_dict` reads it (torchvision's MNASNet) then load
    it as written by this code.

    Example:
        >>> import torchvision
        >>> net = torchvision.models.mnasnet0_5(num_classes=10)
        >>> net.load_state_dict(with_metadata(dict(net.state_dict()), net))
        <All keys matched successfully>
    """
    if getattr(state, "_metadata", None) is not None:
        return state
    state = OrderedDict(state)
    state._metadata = getattr(model.state_dict(), "_metadata", None)  # type: ignore[attr-defined]
    return state


MAX_HEADER_BYTES = 16 * 2**20  # a header holds a model's source and pruning history: kilobytes


def read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The checked header and the tensors of a checkpoint file."""
    if not path.is_file():
        raise HybridPruneError(f"checkpoint {path} not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw_header = (f.metadata() or {}).get("hybridprune", "null")
            header = loads_json(raw_header, f"{path}'s header", MAX_HEADER_BYTES)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except HybridPruneError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
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
    _refuse_instance(header["spec"], path)
    return _checked_spec(header["spec"], path)[0]


def checkpoint_meta(path: str | Path) -> dict[str, Any]:
    """The `meta` object of a checkpoint's checked header (stage, dataset, classes, ...); nothing is built."""
    header, _ = read_checkpoint(Path(path))
    meta = header.get("meta", {})
    return meta if isinstance(meta, dict) else {}


def rebuild(spec: dict[str, Any], user_model: str | None = None, path: Path | str = "checkpoint") -> Classifier:
    """Build the original model a spec describes and replay its pruning history (weights left as built)."""
    _refuse_instance(spec, path)
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


# --- any nn.Module: saved with its class name, input shape and history; loaded into the user's instance ---------


def module_spec(model: nn.Module, example_inputs: torch.Tensor | None = None) -> dict[str, Any]:
    """The architecture of a plain nn.Module as data: its class (for messages; never imported), the shape of one
    input (from `example_inputs`, else as recorded by filter pruning; needed only with a history), its history.

    Example:
        >>> module_spec(nn.Conv2d(3, 8, 3), torch.zeros(1, 3, 16, 16))["input"]
        {'shape': [3, 16, 16]}
    """
    cls = type(model)
    history = [list(entry) for entry in getattr(model, "pruning_history", None) or []]
    shape = known_input_shape(model) if example_inputs is None else tuple(example_inputs.shape[1:])
    if history and shape is None:
        raise HybridPruneError(f"{cls.__name__} has a pruning history but no input shape: pass example_inputs=")
    return {
        "model": {"kind": INSTANCE, "name": f"{cls.__module__}.{cls.__qualname__}", "args": {}},
        "input": {} if shape is None else {"shape": list(shape)},
        "history": history,
    }


def _refuse_instance(spec: dict[str, Any], path: Path | str) -> None:
    """A plain module's checkpoint names no code that could build it: say how to load it."""
    model = spec.get("model")
    if isinstance(model, dict) and model.get("kind") == INSTANCE:
        raise HybridPruneError(
            f"{path} holds a plain {str(model.get('name'))[:200]} saved from Python: load it with "
            "hybridprune.load_checkpoint(path, model=<an unpruned instance of it>)"
        )


def _replayed_instance(spec: dict[str, Any], model: nn.Module, path: Path | str) -> nn.Module:
    """The user's unpruned instance with the checkpoint's pruning history replayed onto it, in place."""
    kind = spec.get("model", {}).get("kind") if isinstance(spec.get("model"), dict) else None
    if kind != INSTANCE:
        if not isinstance(model, Classifier):
            label = _checked_spec(spec, path)[0].label
            raise HybridPruneError(
                f"{path} holds {label} wrapped by hybridprune (a Classifier): load it without model=, or with the "
                "module:factory string for user code, or pass an unpruned Classifier"
            )
        _, _, history = _checked_spec(spec, path)
        example = None
    else:
        shape, history = _checked_instance_spec(spec, path)
        example = None if shape is None else torch.zeros(1, *shape)
    if getattr(model, "pruning_history", None):
        raise HybridPruneError(f"{path}: model= must be an unpruned instance; this {type(model).__name__} is pruned")
    try:
        return replay_history_(model, history, example)
    except HybridPruneError as e:
        saved = spec["model"].get("name", "?") if kind == INSTANCE else kind
        raise HybridPruneError(f"{path}: {e} (the file holds a {saved}; model= is a {type(model).__name__})") from None


def _checked_instance_spec(spec: dict[str, Any], path: Path | str) -> tuple[tuple[int, ...] | None, list]:
    shape, history = spec.get("input"), spec.get("history", [])
    if not isinstance(shape, dict) or not isinstance(history, list):
        raise HybridPruneError(f"{path}: header needs an object 'input' and a list 'history'")
    dims = shape.get("shape")
    if dims is not None and not (
        isinstance(dims, list)
        and 1 <= len(dims) <= MAX_INPUT_DIMS
        and all(_is_int(d) and 1 <= d <= MAX_IMAGE_SIZE for d in dims)
    ):
        raise HybridPruneError(
            f"{path}: header input.shape must be a list of 1 to {MAX_INPUT_DIMS} integers in [1, {MAX_IMAGE_SIZE}]"
        )
    _check_history(history, path)
    if history and dims is None:
        raise HybridPruneError(f"{path}: header has a pruning history but no input.shape to trace it with")
    return None if dims is None else tuple(dims), history


def _check_history(history: list, path: Path | str) -> None:
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


def _checked_spec(spec: dict[str, Any], path: Path | str) -> tuple[ModelSource, dict[str, int], list]:
    model, shape, history = spec.get("model"), spec.get("input"), spec.get("history", [])
    if not isinstance(model, dict) or not isinstance(shape, dict) or not isinstance(history, list):
        raise HybridPruneError(f"{path}: header needs objects 'model' and 'input' and a list 'history'")
    kind, name, args = model.get("kind"), model.get("name"), model.get("args", {})
    if (
        kind not in ("builtin", "torchvision", "timm", "user")
        or not isinstance(name, str)
        or not isinstance(args, dict)
    ):
        raise HybridPruneError(f"{path}: header 'model' needs kind builtin|torchvision|timm|user, a name and args")
    if kind == "timm" and set(args) - set(TIMM_ARGS):  # never pretrained, a path or a config from a file
        raise HybridPruneError(f"{path}: header timm arguments may only be {', '.join(TIMM_ARGS)}, got {sorted(args)}")
    _check_args(args, path)
    if kind == "torchvision" and name in AUX_HEADS and "aux_logits" not in args:
        args = {**args, "aux_logits": False}  # written before auxiliary heads were kept: built without them
    bounds = {"channels": 16, "image_size": MAX_IMAGE_SIZE, "num_classes": MAX_CLASSES, "net_channels": 16}
    for key, top in bounds.items():
        value = shape.get(key)
        if not _is_int(value) or not (1 <= value <= top):
            raise HybridPruneError(f"{path}: header input.{key} must be an integer in [1, {top}], got {value!r}")
    _check_history(history, path)
    try:
        return ModelSource(kind, name, args), shape, history
    except HybridPruneError as e:  # a name no --model could give: say which file holds it
        raise HybridPruneError(f"{path}: header {e}") from None


def _check_args(args: dict[str, Any], path: Path | str) -> None:
    """Factory arguments from a file: booleans, plain numbers and short lists only, within bounds (no huge
    allocations)."""
    shape_args = {"in_channels", "num_classes", "image_size"}
    for key, value in args.items():
        if key in shape_args:
            raise HybridPruneError(f"{path}: header model argument {key} belongs in 'input', not in 'args'")
        values = value if isinstance(value, list) else [value]
        ok = all(
            isinstance(v, bool)
            or (_is_int(v) and 1 <= v <= 8192)
            or (isinstance(v, float) and math.isfinite(v) and 0 < v <= MAX_WIDTH)
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
        model.net.load_state_dict(with_metadata(state, model.net), strict=True)
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
        raise HybridPruneError(f"{path} does not fit {model.source.label}: {lines[-1][:300] if lines else e}") from None
    return model
