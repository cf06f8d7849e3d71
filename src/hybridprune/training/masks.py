"""N:M masks held through the user's own training loop: `handle = hold_masks(model, masks, optimizer)`.

The mechanism is a pair of optimizer step hooks (`Optimizer.register_step_pre_hook` and
`register_step_post_hook`), not a parametrization:

- before each step, the gradients of pruned weights are set to zero, so momentum and Adam's moments never
  gather anything there; after it, the pruned weights and every optimizer state tensor of their shape
  (SGD's momentum buffer, Adam's moments) are set to zero, so decoupled weight decay, Nesterov and
  numerical residue cannot leave a nonzero behind. The zeros are written by a bitwise AND of the tensor's
  bits with all-ones (kept) or all-zeros (pruned): exact even where a pruned value is inf or NaN (a multiply
  by 0 would leave NaN there), and as fast as a multiply (`masked_fill_` and `torch.where` take about 20
  times as long on a CPU);
- hooks see every step however it is called: a plain `optimizer.step()`, `GradScaler.step` (a step that the
  scaler skips for inf gradients calls no hook and changes no weight), after several backward passes
  (gradient accumulation), with DistributedDataParallel (after its all-reduce) or on a `torch.compile`d model
  (whose parameters are the original ones). Names resolve under the `module.` (DDP) and `_orig_mod.`
  (torch.compile) prefixes, in either direction;
- nothing in the model changes: its class, `state_dict` keys, forward cost and export stay as they are.
  A parametrization (`torch.nn.utils.parametrize`, as `torch.nn.utils.prune` does) would recompute
  `weight * mask` on every forward pass, rename the weights in `state_dict` (`parametrizations.weight.original`),
  swap the module's class (which tracing, folding and export then have to undo), and keep nonzero values
  under the mask in the stored original.

The cost is a few element-wise writes per masked layer per optimizer step, none per forward pass
(`benchmarks/hold_masks.py` measures it against a plain step). What the hooks do not see, such as a weight
written directly or loaded from a file, `handle.apply()` re-zeroes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from hybridprune.errors import HybridPruneError
from hybridprune.pruning.graph import unwrapped_name

BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # element size -> integer of that size


@dataclass
class _Held:
    """One masked weight: its parameter, where it is kept, and that mask as bit patterns per device and size."""

    name: str
    param: nn.Parameter
    kept: torch.Tensor
    bits: dict[tuple[torch.device, int], torch.Tensor] = field(default_factory=dict)

    def zero_pruned(self, tensor: torch.Tensor) -> None:
        """Set `tensor` to exactly 0 where pruned, in place (see the module docstring for the bitwise AND)."""
        key = (tensor.device, tensor.element_size())
        if key not in self.bits:  # first use on this device and dtype size (the model may move after hold_masks)
            dtype = BITS[tensor.element_size()]
            self.bits[key] = torch.where(self.kept, -1, 0).to(device=tensor.device, dtype=dtype)
        tensor.view(self.bits[key].dtype).bitwise_and_(self.bits[key])


class MaskHandle:
    """What `hold_masks` returns: `remove()` takes the hooks off, `apply()` re-zeroes now; also a context manager.

    Example:
        >>> from hybridprune.pruning.nm import nm_prune_
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1))
        >>> masks = nm_prune_(net, example_inputs=torch.zeros(1, 3, 4, 4))
        >>> with hold_masks(net, masks, torch.optim.SGD(net.parameters(), lr=0.1)) as handle:
        ...     handle.layers, handle.active
        (['1'], True)
        >>> handle
        MaskHandle(1 layers, removed)
    """

    def __init__(self, held: list[_Held], optimizer: torch.optim.Optimizer) -> None:
        self._held = held
        self._optimizer = optimizer
        self._hooks = [
            optimizer.register_step_pre_hook(lambda *_: self._zero_grads()),
            optimizer.register_step_post_hook(lambda *_: self._zero_weights_and_state()),
        ]
        self.apply()

    @property
    def layers(self) -> list[str]:
        """The names of the masked layers, as the model given to `hold_masks` names them."""
        return [h.name for h in self._held]

    @property
    def active(self) -> bool:
        return bool(self._hooks)

    @torch.no_grad()
    def _zero_grads(self) -> None:
        for h in self._held:
            if h.param.grad is not None and h.param.grad.layout == torch.strided:
                h.zero_pruned(h.param.grad)

    @torch.no_grad()
    def _zero_weights_and_state(self) -> None:
        for h in self._held:
            h.zero_pruned(h.param.data)
            for value in self._optimizer.state.get(h.param, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == h.param.shape and value.is_floating_point():
                    h.zero_pruned(value)

    def apply(self) -> None:
        """Zero the pruned weights, their gradients and their optimizer state now."""
        self._zero_grads()
        self._zero_weights_and_state()

    def remove(self) -> None:
        """Stop holding the masks (the weights keep their zeros until training moves them)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def __enter__(self) -> MaskHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"MaskHandle({len(self._held)} layers, {'active' if self.active else 'removed'})"


def hold_masks(model: nn.Module, masks: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> MaskHandle:
    """Keep the N:M pattern of `masks` (layer name -> boolean mask, True = kept, as `nm_prune_` returns them)
    exact through every step of `optimizer`, in the user's own training loop; returns a handle whose
    `remove()` takes it off. The mechanism (optimizer step hooks) and why: see the module docstring.

    `model` may be wrapped in DistributedDataParallel or `torch.compile` (or the masks made on a wrapped model):
    names resolve under the `module.` and `_orig_mod.` prefixes. Masks of another model, or an optimizer that
    does not hold the masked weights (one built before filter pruning replaced them), are bad input.

    Example:
        >>> import torchvision
        >>> from hybridprune.pruning.nm import nm_prune_, satisfies_nm
        >>> net = torchvision.models.resnet18(num_classes=10)
        >>> masks = nm_prune_(net, example_inputs=torch.zeros(1, 3, 32, 32))
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        >>> handle = hold_masks(net, masks, opt)
        >>> net(torch.rand(4, 3, 32, 32)).logsumexp(dim=1).mean().backward()
        >>> opt.step()
        >>> all(satisfies_nm(net.get_submodule(name).weight) for name in masks)
        True
        >>> handle.remove()
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise HybridPruneError(f"hold_masks needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if not isinstance(masks, dict):
        raise HybridPruneError(f"masks must map layer names to boolean tensors (as nm_prune_ returns), got {masks!r}")
    held = [_resolve(model, name, mask) for name, mask in masks.items()]
    owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [h.name for h in held if id(h.param) not in owned]
    if missing:
        raise HybridPruneError(
            f"the optimizer does not hold the weight of {', '.join(missing[:3])}"
            f"{f' and {len(missing) - 3} more' if len(missing) > 3 else ''}: build it from this model's "
            "parameters after pruning (filter pruning replaces the pruned layers' parameters)"
        )
    return MaskHandle(held, optimizer)


def _resolve(model: nn.Module, name: str, mask: torch.Tensor) -> _Held:
    """The masked layer of `model` that `name` names, directly or under the DDP and torch.compile prefixes."""
    if not isinstance(mask, torch.Tensor):
        raise HybridPruneError(f"the mask of {name!r} is {type(mask).__name__}, not a boolean tensor")
    modules = dict(model.named_modules())
    module = modules.get(name)
    if module is None:
        wanted = unwrapped_name(name)
        found = {id(m): (n, m) for n, m in modules.items() if unwrapped_name(n) == wanted}
        if len(found) > 1:
            raise HybridPruneError(f"the mask of {name!r} names several layers of {type(model).__name__}")
        name, module = next(iter(found.values()), (name, None))
    weight = getattr(module, "weight", None)
    if not isinstance(weight, nn.Parameter):
        raise HybridPruneError(
            f"the mask of {name!r} names no layer with a weight in {type(model).__name__} (masks of another model?)"
        )
    if tuple(mask.shape) != tuple(weight.shape):
        raise HybridPruneError(
            f"the mask of {name!r} has shape {tuple(mask.shape)}, the layer's weight {tuple(weight.shape)} (masks of "
            "another model, or made before filter pruning changed the layer?)"
        )
    return _Held(name, weight, mask.detach().to(device=weight.device, dtype=torch.bool))
