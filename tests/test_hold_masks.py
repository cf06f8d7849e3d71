"""hold_masks keeps the 2:4 pattern exact through the user's own loop: at every step the pruned weights, their
gradients and their momentum are zero, under bf16 autocast with gradient accumulation, fp16 with a GradScaler
(a skipped step included), DDP, torch.compile, and with masks or models under wrapper prefixes."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
import torchvision
from safetensors.torch import load_file, save_file
from torch import nn

import hybridprune as hp
from hybridprune.errors import HybridPruneError
from hybridprune.pruning.nm import satisfies_nm
from zoo import ZOO

SIZE = {"resnet18": 16, "mobilenet_v2": 32}  # small inputs: these are CPU tests
TORCHVISION = [pytest.param(name, marks=pytest.mark.slow) for name in SIZE]


def build(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A network built directly (a zoo class or torchvision's constructor), a batch of images and labels."""
    torch.manual_seed(seed)
    net = ZOO[name]() if name in ZOO else getattr(torchvision.models, name)(num_classes=10)
    gen = torch.Generator().manual_seed(seed)
    size = SIZE.get(name, 16)
    return net, torch.rand(4, 3, size, size, generator=gen), torch.randint(0, 10, (4,), generator=gen)


def pruned(name: str, seed: int = 0) -> tuple[nn.Module, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Filter-pruned by the hybrid metric, then 2:4-pruned: the network, its masks, images and labels."""
    net, x, y = build(name, seed)
    round_to = 4 if name in ZOO else 8
    hp.prune_filters_(net, hp.PruneConfig(metric="hybrid", filter_ratio=0.5, round_to=round_to), [x])
    return net, hp.nm_prune_(net, example_inputs=x), x, y


def sgd(net: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)


def nonzero_where_pruned(t: torch.Tensor, mask: torch.Tensor) -> bool:
    return bool(((t != 0) & ~mask).any())  # NaN counts as nonzero


def assert_held(net: nn.Module, masks: dict[str, torch.Tensor], opt: torch.optim.Optimizer) -> None:
    """Pruned positions hold zero weights, gradients and momentum; every group of 4 has at most 2 nonzeros."""
    for name, mask in masks.items():
        p = net.get_submodule(name).weight
        assert satisfies_nm(p) and not nonzero_where_pruned(p.detach(), mask), name
        assert p.grad is None or not nonzero_where_pruned(p.grad, mask), name
        buffer = opt.state.get(p, {}).get("momentum_buffer")
        assert buffer is None or not nonzero_where_pruned(buffer, mask), name


@pytest.mark.parametrize("name", [*ZOO, *TORCHVISION])
def test_the_pattern_holds_at_every_step_of_a_bf16_loop_with_accumulation(name, one_torch_thread):
    net, masks, x, y = pruned(name)
    kept_before = {n: net.get_submodule(n).weight.detach()[m].clone() for n, m in masks.items()}
    opt = sgd(net)
    hp.hold_masks(net, masks, opt)
    net.train()
    for _ in range(50):
        for micro in range(2):  # two micro-batches per step: gradients accumulate before each step
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(net(x[2 * micro : 2 * micro + 2]), y[2 * micro : 2 * micro + 2]) / 2
            loss.backward()
        opt.step()
        assert_held(net, masks, opt)
        opt.zero_grad()
    assert any(not torch.equal(net.get_submodule(n).weight[m], kept_before[n]) for n, m in masks.items())  # trained


def test_fp16_with_a_grad_scaler_holds_the_pattern_through_a_step_the_scaler_skips(one_torch_thread):
    net, masks, x, y = pruned("residual")
    opt = sgd(net)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    hp.hold_masks(net, masks, opt)
    name, mask = next(iter(masks.items()))
    layer = net.get_submodule(name)
    skipped = []
    for step in range(8):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(net(x), y)
        scaler.scale(loss).backward()
        if step == 3:  # an overflow in a kept position: the scaler skips this step and lowers its scale
            layer.weight.grad[tuple(mask.nonzero()[0].tolist())] = float("inf")
        before, scale = layer.weight.detach().clone(), scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        if scaler.get_scale() < scale:  # skipped: no hook ran, and nothing changed
            skipped.append(step)
            assert torch.equal(layer.weight, before)
            net.zero_grad()  # the inf gradients are the user's to drop, as after any skipped step
        assert_held(net, masks, opt)  # weights, gradients the step used, momentum: zero where pruned
        opt.zero_grad()
    assert skipped == [3]


def test_an_inf_gradient_in_a_pruned_position_never_reaches_the_weights():
    net, masks, x, y = pruned("plain")
    opt = sgd(net)
    hp.hold_masks(net, masks, opt)
    F.cross_entropy(net(x), y).backward()
    name, mask = next(iter(masks.items()))
    net.get_submodule(name).weight.grad[~mask] = float("inf")
    opt.step()
    assert_held(net, masks, opt)
    assert torch.isfinite(net.get_submodule(name).weight).all()


def test_adam_moments_stay_zero_where_pruned():
    net, masks, x, y = pruned("concat")
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.01)
    hp.hold_masks(net, masks, opt)
    for _ in range(3):
        F.cross_entropy(net(x), y).backward()
        opt.step()
        for name, mask in masks.items():
            w = net.get_submodule(name).weight
            assert not w[~mask].any() and not opt.state[w]["exp_avg"][~mask].any()
            assert not opt.state[w]["exp_avg_sq"][~mask].any()
        opt.zero_grad()


@pytest.mark.slow  # importing the compiler takes seconds
def test_masks_resolve_on_a_compiled_model_and_under_a_module_prefix():
    net, masks, x, y = pruned("depthwise")
    compiled = torch.compile(net, backend="eager")  # the wrapper, not the compiler, is what changes the names
    opt = sgd(compiled)
    handle = hp.hold_masks(compiled, masks, opt)
    assert all(n.startswith("_orig_mod.") for n in handle.layers)
    prefixed = hp.hold_masks(net, {f"module.{n}": m for n, m in masks.items()}, opt)  # masks made on a DDP model
    assert prefixed.layers == list(masks)
    for _ in range(3):
        F.cross_entropy(compiled(x), y).backward()
        opt.step()
        assert_held(net, masks, opt)
        opt.zero_grad()


def test_remove_takes_the_hooks_off():
    net, masks, x, y = pruned("residual")
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with hp.hold_masks(net, masks, opt) as handle:
        assert handle.active and "active" in repr(handle)
    assert not handle.active
    F.cross_entropy(net(x), y).backward()
    opt.step()
    assert any(net.get_submodule(n).weight[~m].any() for n, m in masks.items())  # nothing holds them now
    handle.apply()  # re-zeroes on demand, hooks or not
    assert all(not net.get_submodule(n).weight[~m].any() for n, m in masks.items())


def test_bad_arguments_are_one_line():
    net, masks, x, _ = pruned("residual")
    other, other_masks, _, _ = pruned("plain")
    with pytest.raises(HybridPruneError, match="masks of another model"):
        hp.hold_masks(net, other_masks, sgd(net))
    with pytest.raises(HybridPruneError, match="optimizer does not hold"):
        hp.hold_masks(net, masks, sgd(other))
    fresh, x, _ = build("residual")
    stale = sgd(fresh)  # built before filter pruning replaced the parameters
    hp.prune_filters_(fresh, hp.PruneConfig(metric="l1", filter_ratio=0.5, round_to=4), [x])
    with pytest.raises(HybridPruneError, match="after pruning"):
        hp.hold_masks(fresh, hp.nm_prune_(fresh, example_inputs=x), stale)
    with pytest.raises(HybridPruneError, match="torch.optim.Optimizer"):
        hp.hold_masks(net, masks, "sgd")
    bent = {n: m[..., :1] if m.dim() == 4 else m[:, :4] for n, m in masks.items()}
    with pytest.raises(HybridPruneError, match="has shape"):
        hp.hold_masks(net, bent, sgd(net))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, size: int, port: int, folder: str) -> None:
    """The user's own DDP loop: prune, 2:4, wrap, hold the masks on the wrapped model, train on this rank's data."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=size)
    net, masks, _, _ = pruned("residual")  # same seed on every rank: the same plan and masks
    model = nn.parallel.DistributedDataParallel(net)
    opt = sgd(model)
    hp.hold_masks(model, masks, opt)  # masks named as in net; the model's names carry `module.`
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    for _ in range(10):
        for micro in range(2):
            x, y = torch.rand(4, 3, 16, 16, generator=gen), torch.randint(0, 10, (4,), generator=gen)
            context = model.no_sync() if micro == 0 else torch.enable_grad()
            with context, torch.autocast("cpu", dtype=torch.bfloat16):
                (F.cross_entropy(model(x), y) / 2).backward()
        opt.step()
        assert_held(net, masks, opt)
        opt.zero_grad()
    state = {k: v.detach().contiguous() for k, v in net.named_parameters()}  # BatchNorm statistics stay per rank
    state |= {f"momentum.{n}": opt.state[net.get_submodule(n).weight]["momentum_buffer"] for n in masks}
    save_file(state, f"{folder}/rank{rank}.safetensors")
    dist.destroy_process_group()


@pytest.mark.slow  # two processes
def test_a_ddp_user_loop_keeps_the_ranks_identical_and_the_pattern_exact(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    a, b = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.gpu
def test_on_a_gpu_fp16_with_a_grad_scaler_and_a_skipped_step_keeps_the_pattern():
    net, masks, x, y = pruned("resnet18")
    net, x, y = net.cuda(), x.cuda(), y.cuda()
    opt = sgd(net)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**12)
    hp.hold_masks(net, masks, opt)  # masks on the CPU, weights on the GPU: moved once, on first use
    name, mask = next(iter(masks.items()))
    skipped = []
    for step in range(20):
        with torch.autocast("cuda", dtype=torch.float16):
            loss = F.cross_entropy(net(x), y)
        scaler.scale(loss).backward()
        if step == 5:
            net.get_submodule(name).weight.grad[tuple(mask.nonzero()[0].tolist())] = float("inf")
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        if scaler.get_scale() < scale:
            skipped.append(step)
            net.zero_grad()
        assert_held(net, {n: m.cuda() for n, m in masks.items()}, opt)
        opt.zero_grad()
    assert 5 in skipped
