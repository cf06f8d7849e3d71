"""N:M masks along the reduction dimension, eligibility checks, and mask application.

Groups of M consecutive weights run along input channels: for a conv weight `[out, in, kh, kw]`
separately for each `(out, kh, kw)`, for a linear `[out, in]` along `in`. This is the layout of
NVIDIA's sparse tensor cores once a conv is lowered to a GEMM with its weight as
`[out, kh, kw, in]`. No kernel code lives here: the hand-off to `sparse.py` is a dense tensor
with zeros in the pruned places.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hybridprune.config import NMPattern
from hybridprune.errors import HybridPruneError
from hybridprune.pruning.graph import example_input, forward_order, known_input_shape


def _as_groups(weight: torch.Tensor, m: int) -> torch.Tensor:
    """View the weight as rows of m consecutive input-channel weights (conv: in (kh, kw, in) order)."""
    w = weight.permute(0, 2, 3, 1) if weight.dim() == 4 else weight
    return w.reshape(-1, m)


def _from_groups(groups: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if like.dim() == 4:
        out, cin, kh, kw = like.shape
        return groups.reshape(out, kh, kw, cin).permute(0, 3, 1, 2)
    return groups.reshape(like.shape)


def nm_mask(weight: torch.Tensor, pattern: NMPattern = NMPattern()) -> torch.Tensor:
    """Boolean mask keeping the n largest-magnitude weights of each group of m input channels.

    Ties keep the lower channel index, so masks are deterministic.

    Example:
        >>> w = torch.tensor([[4.0, -1.0, 3.0, 0.5]])
        >>> nm_mask(w).tolist()
        [[True, False, True, False]]
    """
    if reduction_size(weight) % pattern.m:
        raise HybridPruneError(
            f"weight {tuple(weight.shape)} has {reduction_size(weight)} input channels, not a multiple of M={pattern.m}"
        )
    groups = _as_groups(weight.detach().abs(), pattern.m)
    keep = groups.argsort(dim=1, descending=True, stable=True)[:, : pattern.n]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, keep, True)
    return _from_groups(mask, weight).contiguous()


def nm_prune_weight(weight: torch.Tensor, pattern: NMPattern = NMPattern()) -> torch.Tensor:
    """The weight with its N:M-pruned entries zeroed (a new tensor)."""
    return weight * nm_mask(weight, pattern)


def satisfies_nm(weight: torch.Tensor, pattern: NMPattern = NMPattern()) -> bool:
    """True when every group of m input-channel weights has at most n nonzeros."""
    if reduction_size(weight) % pattern.m:
        return False
    return bool(((_as_groups(weight.detach(), pattern.m) != 0).sum(dim=1) <= pattern.n).all())


def reduction_size(weight: torch.Tensor) -> int:
    """Length of the dimension the N:M groups run along: input channels (conv) or input features (linear)."""
    return weight.shape[1]


@dataclass(frozen=True)
class Eligibility:
    """Whether a layer takes N:M masks, and why not when it does not."""

    name: str
    kind: str
    shape: tuple[int, ...]
    eligible: bool
    reason: str


def nm_eligibility(
    model: nn.Module, pattern: NMPattern = NMPattern(), example_inputs: torch.Tensor | None = None
) -> list[Eligibility]:
    """Every conv and linear layer, with whether it can take N:M masks and why not: the one rule that masks,
    metrics and the inference conversion all ask.

    The conv that reads the image (the first conv in forward order, found by tracing on `example_inputs`, or on
    the input shape a hybridprune model or a filter-pruned module knows; registration order for a bare module
    without either) stays dense: its 1 or 3 input channels cannot form groups of 4, and it holds few weights.
    Grouped and depthwise convs have no sparse tensor core kernel.

    Example:
        >>> [e.reason or "N:M" for e in nm_eligibility(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 6, 1)))]
        ['conv that reads the image stays dense', 'N:M']
    """
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    traced = example_inputs is not None or known_input_shape(model) is not None
    order = forward_order(model, example_input(model, example=example_inputs)) if traced else list(layers)
    first_conv = next((n for n in order if isinstance(layers.get(n), nn.Conv2d)), None)
    report = []
    for name in [n for n in order if n in layers] + [n for n in layers if n not in order]:
        module = layers[name]
        kind = "conv" if isinstance(module, nn.Conv2d) else "linear"
        if name not in order:
            reason = "not called in the forward pass"
        elif name == first_conv:
            reason = "conv that reads the image stays dense"
        elif kind == "conv" and module.groups != 1:
            reason = (
                f"{'depthwise' if module.groups == module.in_channels else 'grouped'} conv (groups={module.groups})"
            )
        elif reduction_size(module.weight) % pattern.m:
            reason = f"{reduction_size(module.weight)} input channels is not a multiple of {pattern.m}"
        else:
            reason = ""
        report.append(Eligibility(name, kind, tuple(module.weight.shape), not reason, reason))
    return report


def eligible_layers(
    model: nn.Module, pattern: NMPattern = NMPattern(), example_inputs: torch.Tensor | None = None
) -> set[str]:
    """Names of the layers that take N:M masks."""
    return {e.name for e in nm_eligibility(model, pattern, example_inputs) if e.eligible}


def compute_masks(
    model: nn.Module,
    pattern: NMPattern = NMPattern(),
    layers: set[str] | frozenset[str] | None = None,
    *,
    example_inputs: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """N:M masks for every eligible layer (of those in `layers`, when given), keyed by module name
    (magnitude-based, from current weights); `example_inputs` as for `nm_eligibility`."""
    modules = dict(model.named_modules())
    report = nm_eligibility(model, pattern, example_inputs)
    chosen = [e.name for e in report if e.eligible and (layers is None or e.name in layers)]
    return {name: nm_mask(modules[name].weight, pattern) for name in chosen}


@torch.no_grad()
def apply_masks_(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """Zero the masked-out weights in place. Call after every optimizer step to hold the pattern.

    Example:
        >>> lin = nn.Sequential(nn.Conv2d(1, 4, 1), nn.Linear(4, 4))
        >>> masks = compute_masks(lin)
        >>> satisfies_nm(apply_masks_(lin, masks)[1].weight)
        True
    """
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        if name not in modules or modules[name].weight.shape != mask.shape:
            raise HybridPruneError(f"mask for {name!r} does not fit the model (layer missing or shape differs)")
        modules[name].weight.mul_(mask.to(modules[name].weight.device))
    return model


def nm_prune_(
    model: nn.Module,
    pattern: NMPattern = NMPattern(),
    layers: set[str] | frozenset[str] | None = None,
    *,
    example_inputs: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Compute N:M masks for every eligible layer (of those in `layers`, when given) and apply them in place;
    returns the masks. Any nn.Module: `example_inputs` (a batch it takes) lets the conv that reads the image be
    found by tracing (see `nm_eligibility`).

    Example:
        >>> import torchvision
        >>> net = torchvision.models.resnet18(num_classes=10)
        >>> masks = nm_prune_(net, example_inputs=torch.zeros(1, 3, 32, 32))
        >>> len(masks), "conv1" in masks, all(satisfies_nm(net.get_submodule(n).weight) for n in masks)
        (20, False, True)
    """
    masks = compute_masks(model, pattern, layers, example_inputs=example_inputs)
    apply_masks_(model, masks)
    return masks
