"""Model size: parameters, nonzero parameters, MACs, and effective MACs with N:M layers counted at N/M."""

from __future__ import annotations

import torch
from torch import nn

from hybridprune.config import NMPattern
from hybridprune.models.sources import input_shape


@torch.no_grad()
def layer_macs(model: nn.Module, example_inputs: torch.Tensor | None = None) -> dict[str, int]:
    """Multiply-accumulates of each conv and linear layer for one input image (shaped as one of `example_inputs`
    when given, else as the model knows: see `sources.input_shape`)."""
    macs: dict[str, int] = {}

    def hook(name: str):
        def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            per_output = module.weight[0].numel()  # (in / groups) * kh * kw, or in_features
            macs[name] = int(output[0].numel() * per_output)

        return record

    hooks = [
        m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    was_training = model.training
    try:
        model.eval()
        device = next(model.parameters()).device
        model(torch.zeros(1, *input_shape(model, example_inputs), device=device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return macs


def model_stats(
    model: nn.Module,
    nm_layers: set[str] | None = None,
    pattern: NMPattern = NMPattern(),
    *,
    example_inputs: torch.Tensor | None = None,
) -> dict:
    """params, nonzero_params, macs and effective_macs (N:M layers at N/M of their MACs) of one model; any
    nn.Module with `example_inputs` (a batch it takes).

    Example:
        >>> from hybridprune.models.sources import build_model
        >>> s = model_stats(build_model("alexnet", width=0.125))
        >>> s["macs"] == s["effective_macs"] and s["params"] >= s["nonzero_params"]
        True
        >>> model_stats(nn.Conv2d(3, 8, 3), example_inputs=torch.zeros(1, 3, 10, 10))["macs"]
        13824
    """
    nm_layers = nm_layers or set()
    macs = layer_macs(model, example_inputs)
    effective = sum(v * (pattern.density if name in nm_layers else 1.0) for name, v in macs.items())
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "nonzero_params": int(sum((p != 0).sum() for p in model.parameters())),
        "macs": sum(macs.values()),
        "effective_macs": int(round(effective)),
    }
