"""What a CNN's structure says, read by tracing: coupled channel groups, forward order, what follows each conv.

Filter pruning acts on *channel groups*: Torch-Pruning's `DependencyGraph` finds, for each conv, every
layer whose channels are tied to its output channels (its BatchNorm, the next convs' inputs, residual
adds that tie several convs together, concatenations, depthwise convs, the flatten into a linear).
Removing channel c of a group removes it from every member at once.

The other questions (which conv reads the image, which BatchNorm and activation directly follow a
conv) are answered by one forward pass with hooks, so they hold for any model, not only known classes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from hybridprune.errors import HybridPruneError, first_line
from hybridprune.stages import long_stage

ACTIVATIONS = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SiLU,
    nn.GELU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
)


@dataclass(frozen=True)
class Producer:
    """A conv whose output channels belong to a group: `idxs[i]` of its channels is group channel `root_idxs[i]`."""

    name: str
    idxs: tuple[int, ...]
    root_idxs: tuple[int, ...]


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that must be removed together: named by the conv that roots them, with every conv producing them."""

    name: str
    size: int
    producers: tuple[Producer, ...]
    members: tuple[str, ...]  # every module the group touches (conv, BN, linear, ... in or out channels)
    # (conv or linear, how many of its input channels or features are this group's): what reads the group
    consumers: tuple[tuple[str, int], ...] = ()
    # grouped convs (1 < groups < channels) and GroupNorms among the members split the channels into this many
    # equal conv groups: every conv group must keep the same positions (`plan.plan_filter_pruning`); a group
    # that cannot be split so (a grouped member sees only part of it) has `channel_groups == size`: kept whole
    channel_groups: int = 1
    aligned: bool = True  # some reader can take N:M (a dense conv or a linear): the kept count needs --round-to


def known_input_shape(model: nn.Module) -> tuple[int, ...] | None:
    """The shape of one input (no batch dimension) the model is known to take: a `Classifier`'s `input_shape`, or
    the `pruning_input_shape` that filter pruning records on a plain module; None when neither is there.

    Example:
        >>> net = nn.Conv2d(3, 8, 3)
        >>> known_input_shape(net) is None
        True
        >>> net.pruning_input_shape = (3, 32, 32)
        >>> known_input_shape(net)
        (3, 32, 32)
    """
    shape = getattr(model, "input_shape", None)
    shape = getattr(model, "pruning_input_shape", None) if shape is None else shape
    return None if shape is None else tuple(int(s) for s in shape)


def as_example(example: object) -> torch.Tensor:
    """The one tensor batch an `example_inputs=` argument names: a tensor, or the first of a list of batches.

    Example:
        >>> as_example([torch.zeros(2, 3, 8, 8), torch.ones(2, 3, 8, 8)]).shape
        torch.Size([2, 3, 8, 8])
    """
    if isinstance(example, (list, tuple)) and example and isinstance(example[0], torch.Tensor):
        example = example[0]
    if not isinstance(example, torch.Tensor) or example.dim() < 1 or example.numel() == 0:
        got = tuple(example.shape) if isinstance(example, torch.Tensor) else type(example).__name__
        raise HybridPruneError(
            f"example_inputs must be a non-empty batch of inputs the model takes, e.g. torch.zeros(1, 3, 32, 32); "
            f"got {got}"
        )
    return example


def example_input(model: nn.Module, batch: int = 1, example: torch.Tensor | None = None) -> torch.Tensor:
    """The batch that tracing runs on, on the model's device: the first `batch` inputs of `example` when given,
    else a zero batch of the model's known input shape (`known_input_shape`). A plain module without either is
    bad input: the message asks for `example_inputs=`.

    Example:
        >>> example_input(nn.Conv2d(3, 4, 3), example=torch.rand(8, 3, 16, 16)).shape
        torch.Size([1, 3, 16, 16])
    """
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if example is not None:
        return as_example(example)[:batch].to(device)
    shape = known_input_shape(model)
    if shape is None:
        raise HybridPruneError(
            f"{type(model).__name__} is a plain nn.Module: pass example_inputs= (a batch it takes, e.g. "
            "torch.zeros(1, 3, 32, 32)) or calibration images, so its structure can be traced"
        )
    return torch.zeros(batch, *shape, device=device)


def dependency_graph(model: nn.Module, example: torch.Tensor | None = None) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph of the model; a model it cannot trace is bad input (one line)."""
    example = example_input(model, example=example)
    called = forward_order(model, example)  # first: an input the model cannot take is said as such
    # a model with branches that run only in training (auxiliary heads) is traced in training mode, so those
    # branches shrink with the layers they read; its BatchNorm statistics are restored after
    train_only = train_only_layers(model, example, called)
    was_training = model.training  # Torch-Pruning leaves the model in eval mode
    try:
        with (
            long_stage("tracing the channel groups of", model_label(model)),
            torch.enable_grad(),
            training_pass(model) if train_only else nullcontext(),
        ):
            graph = tp.DependencyGraph().build_dependency(
                model,
                example_inputs=_batch_of_two(example) if train_only else example,
                forward_fn=_training_forward if train_only else None,
                output_transform=output_tensors if train_only else None,  # (logits, aux, None, ...): the tensors
                verbose=False,
            )
    except HybridPruneError:
        raise  # the stage's own line (past --analysis-timeout)
    except Exception as e:  # noqa: BLE001 - tracing fails in many ways; the user needs one line either way
        construct = untraceable_construct(model, e)
        if construct is not None:
            label = model_label(model)
            raise HybridPruneError(
                f"{label} cannot be filter-pruned: Torch-Pruning cannot map channels through "
                f"{construct}; --ignore cannot skip it (every operation of the forward pass is traced), so use "
                "2:4 pruning alone (nm_prune_) or a model without that operation"
            ) from None
        raise HybridPruneError(
            f"Torch-Pruning cannot trace {type(model).__name__} ({first_line(e)}); "
            "filter pruning needs a model built from nn.Module layers that runs on one image tensor"
        ) from None
    finally:
        model.train(was_training)
    unseen = [n for n in [*called, *train_only] if model.get_submodule(n) not in graph.module2node]
    if unseen:
        raise HybridPruneError(
            f"Torch-Pruning cannot trace how the output of {', '.join(unseen[:3])} is used (an operation outside "
            "autograd, such as detach or numpy, cuts the graph); this model cannot be filter-pruned"
        )
    return graph


def model_label(model: nn.Module) -> str:
    """How messages name a model: its source as the user gave it (`timm:rexnet_100`), else its class."""
    return getattr(getattr(model, "source", None), "label", type(model).__name__)


# Torch-Pruning's index-mapping steps, by the operation they map channel indices through
INDEX_MAPPINGS = {
    "update_reshape_index_mapping": "a reshape or view (a channel shuffle, as in ShuffleNet)",
    "update_split_index_mapping": "a split or chunk",
    "update_concat_index_mapping": "a concatenation",
    "update_unbind_index_mapping": "an unbind",
    "update_expand_index_mapping": "an expand",
    "update_slice_index_mapping": "a slice of channels",
}


def untraceable_construct(model: nn.Module, error: BaseException) -> str | None:
    """The operation (and the module whose output it reads) where Torch-Pruning's index mapping failed, read from
    the error's traceback; None when it failed elsewhere."""
    node, op, tb = None, None, error.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name in INDEX_MAPPINGS and code.co_argcount >= 2:
            node, op = tb.tb_frame.f_locals.get(code.co_varnames[1]), INDEX_MAPPINGS[code.co_name]
        tb = tb.tb_next
    if node is None:
        return None
    names = {m: n for n, m in model.named_modules()}
    order = {n: i for i, n in enumerate(names.values())}
    level, seen = list(getattr(node, "inputs", [])), set()
    while level:  # breadth first up the graph: the nearest modules whose output the operation reads
        found = [names[n.module] for n in level if n.module in names]
        if found:
            return f"{op} after {max(found, key=order.__getitem__)}"
        seen.update(map(id, level))
        level = [i for n in level for i in n.inputs if id(i) not in seen]
    return op


def channel_groups(
    model: nn.Module,
    graph: tp.DependencyGraph,
    ignore: tuple[str, ...] = (),
    example: torch.Tensor | None = None,
    head: str | None = None,
    unfollowed: list[ChannelGroup] | None = None,
) -> list[ChannelGroup]:
    """Every prunable group of conv output channels, in forward order of the convs that root them.

    A group whose channels Torch-Pruning maps to indices outside a member (through a split it cannot follow, as
    in timm's CSP and Res2Net blocks) is not prunable: it goes to `unfollowed` (when given), to be reported.

    The classifier head (`head`, by default the last conv or linear in forward order), every layer whose output
    the model returns in training mode (auxiliary heads) and modules named in `ignore` (or inside them) are never
    pruned: a group that would touch their output channels is left out.
    """
    names = {m: n for n, m in model.named_modules()}
    called = forward_order(model, example)
    heads = {head_name(model, called, head), *training_outputs(model, example)}  # auxiliary heads' too
    ignored = [m for n, m in model.named_modules() if n in heads or any(_within(n, i) for i in ignore)]
    order = {n: i for i, n in enumerate(called)}
    groups = []
    for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=[nn.Conv2d]):
        producers, members, consumers = [], [], {}
        for item in group:
            module, handler = item.dep.target.module, item.dep.handler
            if not isinstance(module, nn.Module) or module not in names:
                continue
            members.append(names[module])
            if isinstance(module, nn.Conv2d) and graph.is_out_channel_pruning_fn(handler):
                producers.append(Producer(names[module], tuple(item.idxs), tuple(item.root_idxs)))
            elif isinstance(module, (nn.Conv2d, nn.Linear)) and graph.is_in_channel_pruning_fn(handler):
                consumers[names[module]] = len(set(item.idxs))
        root = names[group[0].dep.target.module]
        size = len(group[0].idxs)
        split = conv_groups(graph, group, size)
        aligned = split == 1 or any(
            isinstance(m := model.get_submodule(n), nn.Linear) or m.groups == 1 for n in consumers
        )
        members = tuple(dict.fromkeys(members))
        found = ChannelGroup(root, size, tuple(producers), members, tuple(consumers.items()), split, aligned)
        if _indices_fit(graph, group):
            groups.append(found)
        elif unfollowed is not None:
            unfollowed.append(found)
    return sorted(groups, key=lambda g: order.get(g.name, len(order)))


def _indices_fit(graph: tp.DependencyGraph, group: tp.Group) -> bool:
    """Every channel index Torch-Pruning maps into a member lies within that member's channels."""
    for item in group:
        module = item.dep.target.module
        pruner = graph.get_pruner_of_module(module) if isinstance(module, nn.Module) else None
        if pruner is None or not item.idxs:
            continue
        out = graph.is_out_channel_pruning_fn(item.dep.handler)
        channels = (pruner.get_out_channels if out else pruner.get_in_channels)(module)
        if channels is not None and max(item.idxs) >= channels:
            return False
    return True


def conv_groups(graph: tp.DependencyGraph, group: tp.Group, size: int) -> int:
    """Into how many equal conv groups the members of a Torch-Pruning group split its `size` channels: the least
    common multiple of the grouped convs' `groups` (1 < groups < out channels; depthwise convs shrink their
    groups with the channels instead) and GroupNorms' `num_groups`; `size` (kept whole) when a grouped member
    sees only part of the channels (a slice of a concatenation) or the groups do not divide them."""
    split = 1
    for item in group:
        module = item.dep.target.module
        if isinstance(module, nn.Conv2d) and 1 < module.groups != module.out_channels:
            n = module.groups
            out = graph.is_out_channel_pruning_fn(item.dep.handler)
            channels = module.out_channels if out else module.in_channels
        elif isinstance(module, nn.GroupNorm) and 1 < module.num_groups < module.num_channels:
            n, channels = module.num_groups, module.num_channels
        else:
            continue
        if len(set(item.idxs)) != size or channels != size:
            return size
        split = math.lcm(split, n)
    return split if size % split == 0 else size


def head_name(model: nn.Module, called: list[str], head: str | None = None) -> str:
    """The classifier head: `head` when the user names it (a conv or linear of the model), else the last conv or
    linear that the forward pass calls.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1))
        >>> head_name(net, forward_order(net, torch.zeros(1, 3, 8, 8))), head_name(net, [], head="0")
        ('1', '0')
    """
    if head is None:
        if not called:
            raise HybridPruneError(f"{type(model).__name__} calls no conv or linear layer in its forward pass")
        return called[-1]
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if head not in layers:
        raise HybridPruneError(
            f"head {head!r} is not a conv or linear layer of {type(model).__name__}; its last ones: "
            f"{', '.join(layers[-3:])}"
        )
    return head


WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # what DistributedDataParallel and torch.compile put before names


def unwrapped_name(name: str) -> str:
    """A module name without the leading prefixes that DDP and torch.compile add.

    Example:
        >>> unwrapped_name("_orig_mod.module.layer1.0.conv1")
        'layer1.0.conv1'
    """
    while name.startswith(WRAPPER_PREFIXES):
        name = name.split(".", 1)[1]
    return name


def unwrapped(model: nn.Module) -> nn.Module:
    """The user's module inside DistributedDataParallel and torch.compile wrappers (itself when unwrapped).

    Example:
        >>> net = nn.Linear(2, 2)
        >>> unwrapped(torch.compile(net)) is net
        True
    """
    while True:
        inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
        if inner is None and isinstance(model, nn.parallel.DistributedDataParallel):
            inner = model.module
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at a dotted name."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


# --- one forward pass with hooks ------------------------------------------------------------------


@contextmanager
def _hooks(handles: list) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def forward_order(model: nn.Module, example: torch.Tensor | None = None) -> list[str]:
    """Names of the conv and linear layers in the order the forward pass first calls them; an example input the
    model cannot take is bad input (one line)."""
    example = example_input(model, example=example)
    order: list[str] = []
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    handles = [m.register_forward_hook(lambda *_, n=n: order.append(n)) for n, m in layers]
    was_training = model.training
    try:
        with _hooks(handles):
            model.eval()
            model(example)
    except Exception as e:  # noqa: BLE001 - the user's model fails on the example in any way: one line
        raise HybridPruneError(
            f"{type(model).__name__} cannot take an input of shape {tuple(example.shape)} ({first_line(e)}); "
            "pass example_inputs= that it takes"
        ) from None
    finally:
        model.train(was_training)
    return list(dict.fromkeys(order))


@contextmanager
def training_pass(model: nn.Module) -> Iterator[None]:
    """The model in training mode for the block; its mode, buffers (BatchNorm statistics) and the random number
    generators (dropout draws from them) restored after, so looking at a model changes nothing about it."""
    saved = {n: b.clone() for n, b in model.named_buffers()}
    was_training = model.training
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        model.train()
        try:
            yield
        finally:
            model.train(was_training)
            with torch.no_grad():
                for n, b in model.named_buffers():
                    b.copy_(saved[n])


def output_tensors(out: object) -> list[torch.Tensor]:
    """The tensors of a model's output, in order: a tensor, or tuples, lists and dicts of them (None skipped).

    Example:
        >>> z = torch.zeros(1)
        >>> len(output_tensors((z, None, {"aux": z, "n": 3})))
        2
    """
    if isinstance(out, torch.Tensor):
        return [out]
    items = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else []
    return [t for item in items for t in output_tensors(item)]


def _batch_of_two(example: torch.Tensor) -> torch.Tensor:
    return torch.cat([example[:1]] * 2)  # BatchNorm in training mode needs more than one value per channel


def _training_forward(model: nn.Module, example: torch.Tensor) -> object:
    model.train()  # Torch-Pruning puts the model in eval mode before calling this
    return model(example)


def training_forward(model: nn.Module, example: torch.Tensor) -> object:
    """One forward pass in training mode on the first input of `example` (twice: BatchNorm needs two values),
    without changing the model (see `training_pass`); exceptions pass through."""
    with torch.no_grad(), training_pass(model):
        return model(_batch_of_two(example))


@torch.no_grad()
def _training_calls(model: nn.Module, example: torch.Tensor) -> tuple[list[str], object, dict[int, tuple]]:
    """One training-mode pass: the conv and linear layers called, in order, the output, and which layer returned
    each tensor (id -> (name, the tensor, kept alive so no id is reused)); ([], None, {}) when the model fails in
    training mode on this input."""
    order, returned = [], {}
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]

    def hook(name: str):
        def record(module: nn.Module, inputs: tuple, output: object) -> None:
            order.append(name)
            returned[id(output)] = (name, output)

        return record

    try:
        with _hooks([m.register_forward_hook(hook(n)) for n, m in layers]):
            out = training_forward(model, example)
    except Exception:  # noqa: BLE001 - a model that fails in training mode on this input: nothing more to learn
        return [], None, {}
    return list(dict.fromkeys(order)), out, returned


def train_only_layers(model: nn.Module, example: torch.Tensor, called: list[str]) -> list[str]:
    """Conv and linear layers that the forward pass calls in training mode but not in eval mode (`called`), such
    as auxiliary classifiers; the model's buffers (BatchNorm statistics) are left as they were.

    Example:
        >>> train_only_layers(nn.Sequential(nn.Conv2d(3, 4, 1)), torch.zeros(1, 3, 4, 4), ["0"])
        []
    """
    return [n for n in _training_calls(model, example)[0] if n not in called]


def training_outputs(model: nn.Module, example: torch.Tensor | None = None) -> list[str]:
    """The conv and linear layers whose outputs the model returns as they are in training mode: the classifier
    and any auxiliary classifiers (GoogLeNet's aux1.fc2 and aux2.fc2), whose outputs are the classes.

    Example:
        >>> training_outputs(nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)), torch.zeros(1, 3, 4, 4))
        ['1']
    """
    _, out, returned = _training_calls(model, example_input(model, example=example))
    return [returned[id(t)][0] for t in output_tensors(out) if id(t) in returned and returned[id(t)][1] is t]


@dataclass(frozen=True)
class Followers:
    """What directly consumes each conv's output: `bn[conv]` (a BatchNorm) and `act[conv or bn]` (an activation).

    "Directly" means the very tensor the conv (or BN) returned, unmodified: a BatchNorm whose output is
    first added to a shortcut (a residual block's last BN) has no activation of its own.
    """

    bn: dict[str, str]
    act: dict[str, str]


@torch.no_grad()
def followers(model: nn.Module, example: torch.Tensor | None = None) -> Followers:
    """Find, by one forward pass, the BatchNorm and activation modules that directly follow each conv."""
    example = example_input(model, example=example)
    produced: dict[int, tuple[str, int, torch.Tensor]] = {}  # id(tensor) -> (producer, version, tensor kept alive)
    bn, act = {}, {}

    def record(name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            produced[id(output)] = (name, output._version, output)

        return hook

    def consume(name: str, table: dict[str, str], kinds: tuple[type, ...]):
        def pre_hook(module: nn.Module, inputs: tuple) -> None:
            x = inputs[0] if inputs else None
            src = produced.get(id(x)) if isinstance(x, torch.Tensor) else None
            if src and src[2] is x and src[1] == x._version and isinstance(modules[src[0]], kinds):
                table.setdefault(src[0], name)

        return pre_hook

    modules = dict(model.named_modules())
    handles = []
    for name, m in modules.items():
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)):
            handles.append(m.register_forward_hook(record(name)))
        if isinstance(m, nn.BatchNorm2d):
            handles.append(m.register_forward_pre_hook(consume(name, bn, (nn.Conv2d,))))
        if isinstance(m, ACTIVATIONS):
            handles.append(m.register_forward_pre_hook(consume(name, act, (nn.Conv2d, nn.BatchNorm2d))))
    was_training = model.training
    with _hooks(handles):
        model.eval()
        model(example)
    model.train(was_training)
    return Followers(bn, act)


def sole_consumer(graph: tp.DependencyGraph, model: nn.Module, producer: str, consumer: str) -> bool:
    """True when `consumer` is the only user of `producer`'s output in the traced graph."""
    node = graph.module2node.get(model.get_submodule(producer))
    outputs = [] if node is None else node.outputs
    return len(outputs) == 1 and outputs[0].module is model.get_submodule(consumer)
