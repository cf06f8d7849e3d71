"""Where models come from, and how a pruned one is described as data and rebuilt.

`--model` names one of three sources:

- a built-in network: `alexnet`, `resnet20`, `resnet56`, `vgg16` (see `architectures.py`), scaled by `width`;
- any torchvision classification model: `torchvision:resnet18`, `torchvision:mobilenet_v2`, ...;
- any timm model: `timm:resnet18`, `timm:efficientnet_b0`, ... (random init, the `timm` extra installed);
- the user's own code: `my_package.models:make_net`, a factory imported only because the user named it, found
  in the current folder first and then on `sys.path` (as uvicorn and gunicorn find `module:app`).

Every network is wrapped in a `Classifier` that normalises its input with the dataset's statistics (kept
as buffers, so every saved model carries them) and, when a 1-channel dataset meets a network built for 3
channels, repeats the gray channel (exactly what RGB weights expect of a gray image). A pruned model is
then data: its source, its input shape, and Torch-Pruning's pruning history (module names and integer
channel indices). Rebuilding builds the original and replays that history; no file ever names code.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from hybridprune.config import BUILTIN_MODELS, TIMM_ARGS, ModelSource
from hybridprune.errors import HybridPruneError, first_line
from hybridprune.models.builtin import BUILTIN
from hybridprune.registry import Registry
from hybridprune.stages import long_stage

MODELS: Registry[Callable[..., nn.Module]] = Registry("model", BUILTIN_MODELS)
for _name, _factory in BUILTIN.items():
    MODELS.register(_name)(_factory)

# torchvision models with auxiliary classifiers that run only in training mode, and the smallest input side their
# heads take: built with them (torchvision's default) from that side up, traced in training mode so the heads are
# pruned with the layers they read, and trained on the weighted sum of the losses (config.AUX_LOSS_WEIGHT);
# below it (inception_v3's head needs 299x299; without it the network takes 75x75 up) built without them. The
# choice is written into the model's arguments, so a checkpoint rebuilds the same network.
AUX_HEADS = {"googlenet": 1, "inception_v3": 299}
MAX_PARAMS = 1_000_000_000  # 4 GB of float32 weights: a bound checked before anything is allocated


class Normalize(nn.Module):
    """Per-channel input normalisation held as buffers, so a checkpoint carries its dataset's statistics."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """A network with its input handling, its origin and its pruning history.

    Takes `[N, in_channels, image_size, image_size]` images in [0, 1]; `net` is the user-visible network.
    """

    def __init__(
        self,
        net: nn.Module,
        source: ModelSource,
        input_shape: tuple[int, int, int],
        num_classes: int,
        net_channels: int,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        channels = input_shape[0]
        self.normalize = Normalize(mean or [0.5] * channels, std or [0.25] * channels)
        self.net = net
        self.source = source
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self.net_channels = net_channels
        self.pruning_history: list[list] = []  # Torch-Pruning's [module name, out-channels?, indices] entries

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        if self.net_channels != x.shape[1]:
            x = x.repeat(1, self.net_channels // x.shape[1], 1, 1)  # gray image for an RGB network
        return self.net(x)

    def spec(self) -> dict[str, Any]:
        """The architecture as plain JSON data: source, input, pruning history."""
        return {
            "model": self.source.to_dict(),
            "input": {
                "channels": self.input_shape[0],
                "image_size": self.input_shape[1],
                "num_classes": self.num_classes,
                "net_channels": self.net_channels,
            },
            "history": [list(entry) for entry in self.pruning_history],
        }


def build_model(
    name: str | ModelSource,
    *,
    in_channels: int = 3,
    num_classes: int = 10,
    image_size: int = 32,
    width: float | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Classifier:
    """Build a model from any source, shaped for the data; None-valued arguments keep the model's defaults.

    Example:
        >>> m = build_model("resnet20", in_channels=1, image_size=16, width=0.5)
        >>> m(torch.zeros(2, 1, 16, 16)).shape, m.source.label
        (torch.Size([2, 10]), 'resnet20')
    """
    source = ModelSource.parse(name) if isinstance(name, str) else name
    if width is not None:
        source = ModelSource(source.kind, source.name, {**source.args, "width": width})
    source = with_aux_heads(source, image_size)
    _check_size(source, in_channels, num_classes, image_size)
    with long_stage("building", source.label, bounded=False):  # a large user model can take a while
        net = _build_net(source, in_channels, num_classes, image_size)
    net_channels = _net_channels(net, in_channels, image_size)
    if net_channels % in_channels:
        raise HybridPruneError(
            f"{source.label} takes {net_channels}-channel images; the data has {in_channels} channels"
        )
    model = Classifier(net, source, (in_channels, image_size, image_size), num_classes, net_channels, mean, std)
    _check_forward(model)
    return model


def with_aux_heads(source: ModelSource, image_size: int) -> ModelSource:
    """A torchvision model with auxiliary heads (AUX_HEADS), its `aux_logits` made explicit: on when the input
    is large enough for its heads, unless the arguments say otherwise; any other source as it is.

    Example:
        >>> with_aux_heads(ModelSource.parse("torchvision:inception_v3"), 75).args
        {'aux_logits': False}
    """
    if source.kind != "torchvision" or source.name not in AUX_HEADS or "aux_logits" in source.args:
        return source
    return ModelSource(source.kind, source.name, {"aux_logits": image_size >= AUX_HEADS[source.name], **source.args})


def _check_size(source: ModelSource, in_channels: int, num_classes: int, image_size: int) -> None:
    """Refuse a model larger than MAX_PARAMS, counted on the meta device (shapes only, no memory)."""
    try:
        with torch.device("meta"):
            net = _build_net(source, in_channels, num_classes, image_size)
    except HybridPruneError:
        raise
    except Exception:  # noqa: BLE001 - some inits read tensor values (RegNet): count on the real build instead
        return
    count = sum(p.numel() for p in net.parameters())
    if count > MAX_PARAMS:
        raise HybridPruneError(
            f"{source.label} with {source.args or 'its defaults'} has {count:,} parameters, over the limit of "
            f"{MAX_PARAMS:,}; use a smaller width"
        )


def _build_net(source: ModelSource, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    shape = {"in_channels": in_channels, "num_classes": num_classes, "image_size": image_size}
    if source.kind == "builtin":
        factory = MODELS.get(source.name)
        unknown = sorted(set(source.args) - set(inspect.signature(factory).parameters) | set(source.args) & set(shape))
        if unknown:
            raise HybridPruneError(f"{source.name} takes no argument {', '.join(unknown)}")
        return factory(**shape, **source.args)
    if source.kind in ("torchvision", "timm") and "width" in source.args:
        raise HybridPruneError(f"--width scales the built-in models only; {source.kind} models have fixed widths")
    if source.kind == "torchvision":
        return _torchvision_net(source.name, num_classes, source.args)
    if source.kind == "timm":
        return _timm_net(source.name, in_channels, num_classes, source.args)
    return _user_net(source.name, shape, source.args)


def _torchvision_net(name: str, num_classes: int, args: dict[str, Any]) -> nn.Module:
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)  # classification models only
    if name not in known:
        raise HybridPruneError(f"unknown torchvision classification model {name!r}; valid: {', '.join(known)}")
    if name in AUX_HEADS:
        args = {"init_weights": True, **args}  # not torchvision's default: its scipy-based init takes seconds
    try:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **args)
    except (TypeError, ValueError) as e:
        raise HybridPruneError(f"torchvision:{name} cannot be built with {args} ({e})") from None


def _timm_net(name: str, in_channels: int, num_classes: int, args: dict[str, Any]) -> nn.Module:
    """A timm model by architecture name, randomly initialised (pretrained=False: nothing is read or downloaded),
    shaped for the data (num_classes, in_chans); `args` only from `config.TIMM_ARGS`."""
    try:
        import timm
    except ImportError:
        raise HybridPruneError(
            f"timm:{name} needs timm: pip install 'hybridprune[timm]' (or pip install timm)"
        ) from None
    bad = sorted(set(args) - set(TIMM_ARGS))
    if bad:
        raise HybridPruneError(f"timm:{name} takes no argument {', '.join(bad)}; valid: {', '.join(TIMM_ARGS)}")
    if not timm.is_model(name):
        close = timm.list_models(f"*{name[:6]}*")[:5]
        hint = f"; similar: {', '.join(close)}" if close else "; timm.list_models() lists them"
        raise HybridPruneError(f"unknown timm model {name!r}{hint}")
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **args)
    except Exception as e:  # noqa: BLE001 - a model that cannot be built with these arguments, whatever the reason
        raise HybridPruneError(f"timm:{name} cannot be built with {args or 'its defaults'} ({first_line(e)})") from None


@contextlib.contextmanager
def current_folder_first() -> Iterator[None]:
    """The current folder first on `sys.path` while a user's factory is imported and called (uvicorn's rule for
    `module:app`), so `--model mynet:make_net` finds `./mynet.py` without PYTHONPATH; `sys.path` is restored.

    Example:
        >>> with current_folder_first():
        ...     sys.path[0] == os.getcwd()
        True
    """
    folder = os.getcwd()
    sys.path.insert(0, folder)
    importlib.invalidate_caches()  # a module written since the last import is found
    try:
        yield
    finally:
        sys.path.remove(folder)  # the first occurrence: the one inserted above


def _user_net(spec: str, shape: dict[str, int], args: dict[str, Any]) -> nn.Module:
    """Import `module:factory` (named by the user; the current folder searched first) and call it with the shape
    arguments it accepts."""
    with current_folder_first():
        return _call_user_factory(spec, shape, args)


def _call_user_factory(spec: str, shape: dict[str, int], args: dict[str, Any]) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        missing = isinstance(e, ModuleNotFoundError) and e.name == module_name.split(".")[0]
        hint = f"; looked in the current folder {os.getcwd()} and on sys.path" if missing else ""
        raise HybridPruneError(f"cannot load model factory {spec!r} ({type(e).__name__}: {e}{hint})") from None
    if not callable(factory):
        raise HybridPruneError(f"{spec!r} is not callable; give module:function returning an nn.Module")
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in {**shape, **args}.items() if takes_all or k in params}
    try:
        net = factory(**kwargs)
    except Exception as e:  # noqa: BLE001 - the user's code may fail in any way; say so in one line
        raise HybridPruneError(f"model factory {spec!r} failed ({first_line(e)})") from None
    if not isinstance(net, nn.Module):
        raise HybridPruneError(f"{spec!r} returned {type(net).__name__}, not an nn.Module")
    return net


@torch.no_grad()
def _net_channels(net: nn.Module, in_channels: int, image_size: int) -> int:
    """Input channels the network expects: the data's, when it runs on them; else its first conv's (an RGB
    network given gray images)."""
    conv = next((m for m in net.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise HybridPruneError(f"{type(net).__name__} has no Conv2d layer; hybridprune prunes CNNs")
    was_training = net.training
    try:
        net.eval()(torch.zeros(1, in_channels, image_size, image_size))
        return in_channels
    except Exception:  # noqa: BLE001 - any failure: try the first conv's channel count, checked by the caller
        return conv.in_channels
    finally:
        net.train(was_training)


@torch.no_grad()
def _check_forward(model: Classifier) -> None:
    was_training = model.training
    model.eval()
    try:
        out = model(torch.zeros(1, *model.input_shape))
    except Exception as e:  # noqa: BLE001 - a model that cannot take the data's images, whatever the reason
        c, h, w = model.input_shape
        raise HybridPruneError(f"{model.source.label} cannot take {c}x{h}x{w} images ({first_line(e)})") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.shape != (1, model.num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise HybridPruneError(f"{model.source.label} returns {got}, not logits of shape (N, {model.num_classes})")


def input_shape(model: nn.Module, example: torch.Tensor | None = None) -> tuple[int, ...]:
    """The shape of one input, without the batch: `example`'s when given, else what the model knows (a
    `Classifier`'s `input_shape`, or the `pruning_input_shape` filter pruning records on a plain module).

    Example:
        >>> input_shape(nn.Conv2d(3, 8, 3), torch.zeros(2, 3, 16, 16))
        (3, 16, 16)
    """
    if example is not None:
        return tuple(example.shape[1:])
    shape = getattr(model, "input_shape", None)
    shape = getattr(model, "pruning_input_shape", None) if shape is None else shape
    if shape is None:
        raise HybridPruneError(
            f"{type(model).__name__} is a plain nn.Module: pass example_inputs= (a batch it takes, e.g. "
            "torch.zeros(1, 3, 32, 32))"
        )
    return tuple(shape)


def model_label(model: nn.Module) -> str:
    """How messages name a model: its source (`resnet20`, `torchvision:resnet18`, ...) or its class.

    Example:
        >>> model_label(nn.Conv2d(3, 8, 3)), model_label(build_model("alexnet", width=0.125))
        ('Conv2d', 'alexnet')
    """
    source = getattr(model, "source", None)
    return source.label if isinstance(source, ModelSource) else type(model).__name__


def model_spec(model: nn.Module) -> dict[str, Any]:
    """The architecture of a hybridprune model as plain data (see `Classifier.spec`)."""
    if not isinstance(model, Classifier):
        raise HybridPruneError(f"{type(model).__name__} is not a hybridprune model; build it with build_model")
    return model.spec()
