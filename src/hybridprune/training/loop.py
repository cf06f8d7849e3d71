"""Training, fine-tuning with N:M masks held, evaluation, and BatchNorm recalibration."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from hybridprune.config import AUX_LOSS_WEIGHT, TrainConfig
from hybridprune.data.batching import batches
from hybridprune.data.images import Dataset, ImageSet, StreamedSplit
from hybridprune.errors import HybridPruneError
from hybridprune.hardware import native_bf16
from hybridprune.pruning.checkpoint import first_nonfinite, nonfinite_line
from hybridprune.pruning.graph import output_tensors
from hybridprune.pruning.nm import apply_masks_
from hybridprune.training.distributed import any_rank, ddp, sync_model_, synced_batchnorm
from hybridprune.training.precision import Precision, choose_precision, training_step_timer
from hybridprune.world import World, check_batch


def _lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up over the first `warmup` fraction, then linear decay to zero."""
    warm = int(total * cfg.warmup)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return cfg.lr * max(0.0, (total - step) / max(1, total - warm))


def distillation_loss(
    logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig
) -> torch.Tensor:
    """(1 - w) * cross-entropy + w * T^2 * KL(teacher || student), both softened by temperature T (the T^2
    keeps the soft term's gradients on the scale of the hard one's; Hinton, Vinyals and Dean, 2015).

    Example:
        >>> z = torch.tensor([[2.0, 0.0]])
        >>> cfg = TrainConfig(label_smoothing=0.0, distill_weight=1.0)
        >>> float(distillation_loss(z, z, torch.tensor([0]), cfg))  # a student equal to its teacher
        0.0
    """
    hard = F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
    if cfg.distill_weight == 0:
        return hard
    t = cfg.distill_temperature
    soft = F.kl_div(F.log_softmax(logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1), log_target=True,
                    reduction="batchmean") * t * t  # fmt: skip
    return (1 - cfg.distill_weight) * hard + cfg.distill_weight * soft


LOG_EVERY = 25  # steps between progress updates that read the loss (a device sync), and divergence checks


def check_finite(model: nn.Module, where: str, lr: float | None = None) -> None:
    """One line naming `where` and the first weight or BatchNorm statistic of `model` that holds NaN or infinity,
    with what to try; nothing when every number is finite.

    Example:
        >>> m = nn.BatchNorm2d(2)
        >>> check_finite(m, "fine-tune l1 hybrid, epoch 1/3")
        >>> m.running_var[0] = float("inf")
        >>> check_finite(m, "fine-tune l1 hybrid, epoch 1/3", lr=0.5)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        hybridprune.errors.HybridPruneError: fine-tune ...: tensor 'running_var' holds infinity ... than 0.5
    """
    state = model.state_dict()
    bad = first_nonfinite(state)
    if bad is not None:
        raise HybridPruneError(f"{where}: {nonfinite_line(bad, state[bad])}; {_lower_lr(lr)}")


def _lower_lr(lr: float | None) -> str:
    return "training diverged: try a lower learning rate" + ("" if lr is None else f" than {lr:g}")


def _stop_if_diverged(model: nn.Module, losses_finite: torch.Tensor, where: str, lr: float, world: World) -> None:
    """Every rank stops together when any rank's loss, weights or BatchNorm statistics stopped being finite."""
    local_bad = ~losses_finite | (first_nonfinite(model.state_dict()) is not None)
    if not any_rank(local_bad, world):
        return
    if not bool(losses_finite):
        raise HybridPruneError(f"{where}: the loss became NaN or infinite; {_lower_lr(lr)}")
    check_finite(model, where, lr)
    raise HybridPruneError(f"{where}: another process's loss or statistics became NaN or infinite; {_lower_lr(lr)}")


def resolve_precision(
    cfg: TrainConfig, model: nn.Module, data: Dataset, device: torch.device, world: World = World()
) -> Precision:
    """The precision `cfg.precision` means for training `model` on `data` (see `training.precision`), said in
    one line when `auto` chose it: `auto` on a CPU with native bf16 times a step of this model on its first
    batch both ways; every rank then takes fp32 unless all measured bf16 faster, so the ranks agree.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
        >>> data = Dataset("toy", ImageSet(torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.zeros(4).long(), 2),
        ...                ImageSet(torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.zeros(2).long(), 2), hflip=False)
        >>> resolve_precision(TrainConfig(precision="fp32"), net, data, torch.device("cpu")).name
        'fp32'
    """
    if cfg.precision != "auto" or device.type != "cpu":
        chosen = choose_precision(cfg.precision, device)
    else:
        timer = None
        if native_bf16() is not None:
            x, y = next(iter(batches(data.train, min(cfg.batch_size, len(data.train)), device=device)))
            timer = training_step_timer(model, x, y)
        chosen = choose_precision("auto", device, timer)
        # every rank joins the vote, whatever it measured: ranks on unlike CPUs still agree, none hangs
        if any_rank(torch.tensor(chosen.name == "fp32"), world) and chosen.name != "fp32":
            chosen = Precision("fp32", "precision auto: fp32 (another rank measured bf16 no faster)")
    if chosen.reason and world.main:
        print(chosen.reason)  # a note of what was done, as the job's other lines: stderr is for what went wrong
    return chosen


def check_device_settings(cfg: TrainConfig, device: torch.device, world: World = World()) -> str:
    """Refuse, before any work or file, training settings that `device` cannot run (fp16 without CUDA,
    --sync-bn without GPUs); returns a one-line note for a setting that does nothing here ('' when none).

    Example:
        >>> check_device_settings(TrainConfig(sync_bn=True), torch.device("cpu"))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        hybridprune.errors.HybridPruneError: --sync-bn needs GPUs ...
    """
    choose_precision(cfg.precision, device)
    if cfg.sync_bn and device.type != "cuda":
        raise HybridPruneError("--sync-bn needs GPUs (PyTorch's SyncBatchNorm has no CPU kernel); drop it on a CPU")
    if cfg.sync_bn and not world.active:
        return "note: --sync-bn does nothing in one process (it syncs BatchNorm statistics across torchrun's ranks)"
    return ""


def _compile_failed(e: Exception) -> None:
    from hybridprune.errors import first_line

    print(f"note: torch.compile failed ({first_line(e, 100)}); training without it", file=sys.stderr)


def _compiled(model: nn.Module) -> nn.Module:
    try:
        return torch.compile(model)
    except Exception as e:  # noqa: BLE001 - any failure: train eagerly, and say so
        _compile_failed(e)
        return model


def _step_loss(forward: nn.Module, model: nn.Module, teacher: nn.Module | None, x, y, cfg: TrainConfig):
    """The loss through `forward` (the compiled model, or the model); a compiled model that fails on its
    first step is dropped for the eager one, said in one line."""
    if forward is model:
        return _loss(model, teacher, x, y, cfg), model
    try:
        return _loss(forward, teacher, x, y, cfg), forward
    except Exception as e:  # noqa: BLE001 - compilers fail in many ways; the run must not
        _compile_failed(e)
        return _loss(model, teacher, x, y, cfg), model


def _loss(model: nn.Module, teacher: nn.Module | None, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig):
    logits, *aux = output_tensors(model(x))
    if cfg.distill_weight > 0:
        with torch.no_grad():
            teacher_logits = output_tensors(teacher(x))[0]
        loss = distillation_loss(logits, teacher_logits, y, cfg)
    else:
        loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
    for a in aux:  # auxiliary heads learn the labels, weighted as their papers did
        loss = loss + AUX_LOSS_WEIGHT * F.cross_entropy(a, y, label_smoothing=cfg.label_smoothing)
    return loss


def _train(
    model: nn.Module,
    data: Dataset,
    cfg: TrainConfig,
    device: torch.device,
    seed: int,
    masks: dict[str, torch.Tensor] | None,
    desc: str,
    progress: bool,
    teacher: nn.Module | None,
    world: World,
    precision: Precision | None,
) -> None:
    """The epochs of `fit`: one optimizer step per batch, masks re-applied after each."""
    precision = precision or resolve_precision(cfg, model, data, device, world)
    autocast_dtype = precision.autocast_dtype
    scaler = torch.amp.GradScaler(device.type, enabled=precision.name == "fp16")  # bf16 needs no loss scaling
    trained = ddp(model, world, device)  # gradients averaged over the ranks; the model itself when alone
    forward = _compiled(trained) if cfg.compile else trained
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]  # BatchNorm and biases: no weight decay
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay}],
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=True,
    )
    batch = cfg.batch_size // world.size
    steps_per_epoch = -(-(len(data.train) // world.size) // batch)
    total, step = cfg.epochs * steps_per_epoch, 0
    # disable=None: no bar when stderr is not a terminal (logs stay readable)
    bar = tqdm(total=total, desc=desc, unit="step", disable=None if progress else True, leave=False, dynamic_ncols=True)
    finite = torch.ones((), dtype=torch.bool, device=device)  # every loss so far; read only where the loss is
    for epoch in range(cfg.epochs):
        where = f"{desc}, epoch {epoch + 1}/{cfg.epochs}"
        for x, y in batches(
            data.train,
            batch,
            shuffle=True,
            seed=seed * 1000 + epoch,
            augment=cfg.augment,
            hflip=data.hflip,
            device=device,
            world=world,
        ):
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, total, cfg)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                loss, forward = _step_loss(forward, trained, teacher, x, y, cfg)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)  # the weights stay float32: masks re-zero them exactly under every precision
            scaler.update()
            if masks:
                apply_masks_(model, masks)
            step += 1
            bar.update(1)
            finite &= torch.isfinite(loss.detach())
            if step % LOG_EVERY == 0 or step == total:  # reading the loss waits for the GPU: not every step
                _stop_if_diverged(model, finite, where, cfg.lr, world)
                bar.set_postfix(epoch=f"{epoch + 1}/{cfg.epochs}", loss=f"{loss.item():.3f}")
        _stop_if_diverged(model, finite, where, cfg.lr, world)  # at every epoch's end: the epoch named is right
    bar.close()


def fit(
    model: nn.Module,
    data: Dataset,
    cfg: TrainConfig,
    device: torch.device,
    *,
    seed: int = 0,
    masks: dict[str, torch.Tensor] | None = None,
    desc: str = "train",
    progress: bool = True,
    teacher: nn.Module | None = None,
    world: World = World(),
    precision: Precision | None = None,
) -> nn.Module:
    """Train in place; with `masks`, zeroed weights are re-zeroed after every optimizer step, so the
    N:M pattern holds exactly throughout. With a `world` of several ranks (torchrun), each rank trains on
    its shard of every epoch under DistributedDataParallel with `cfg.batch_size / ranks` images a step, and
    the ranks end with identical weights and BatchNorm statistics. `precision` (from `resolve_precision`)
    spares several trainings of one job measuring `auto` each.

    Example:
        >>> from hybridprune.data.datasets import load_dataset
        >>> from hybridprune.models.sources import build_model
        >>> ds = load_dataset("digits")
        >>> m = build_model("resnet20", in_channels=1, width=0.5)
        >>> m = fit(m, ds, TrainConfig(epochs=1, precision="fp32"), torch.device("cpu"), progress=False)
    """
    if cfg.distill_weight > 0 and teacher is None:
        raise ValueError("distillation needs a teacher model")
    if teacher is not None:
        teacher = teacher.to(device).eval()
    check_device_settings(cfg, device, world)  # refuse what the device cannot run before any work
    model.to(device).train()
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)  # tensor-core convs want NHWC
    check_batch(cfg.batch_size, world)
    with synced_batchnorm(model, world, device) if cfg.sync_bn else contextlib.nullcontext(model) as net:
        _train(net, data, cfg, device, seed, masks, desc, progress, teacher, world, precision)
    sync_model_(model, world)  # BatchNorm statistics were gathered on each rank's own shard
    return model.eval()


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageSet, device: torch.device, batch_size: int = 500) -> float:
    """Top-1 accuracy in percent."""
    model.to(device).eval()
    correct = 0
    for x, y in batches(data, batch_size, device=device):
        correct += int((model(x).argmax(dim=1) == y).sum())
    return 100.0 * correct / max(1, len(data))


@torch.no_grad()
def recalibrate_bn_(
    model: nn.Module,
    data: ImageSet | StreamedSplit | Iterable,
    device: torch.device | None = None,
    num_batches: int = 8,
    batch_size: int = 128,
    seed: int = 0,
) -> nn.Module:
    """Re-estimate BatchNorm running statistics on a few unlabeled training batches, in place.

    Pruning changes every downstream activation, so the stored statistics describe a network
    that no longer exists; a cumulative average over fresh batches costs seconds. `data` is an `ImageSet`
    (seeded shuffled batches of `batch_size`) or any iterable of batches, such as a list of image tensors or
    the user's own DataLoader (of `(images, labels)` pairs: the labels are not read); `device`: the model's
    own when not given.

    Example:
        >>> import torchvision
        >>> net = torchvision.models.resnet18(num_classes=10)
        >>> net = recalibrate_bn_(net, [torch.rand(8, 3, 32, 32) for _ in range(2)])
        >>> int(net.bn1.num_batches_tracked), net.training
        (2, False)
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or num_batches == 0:
        return model
    device = device or next(model.parameters()).device
    if isinstance(data, (ImageSet, StreamedSplit)):
        data = batches(data, batch_size, shuffle=True, seed=seed, device=device)
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
    model.to(device).train()
    for i, batch in enumerate(data):
        if i == num_batches:
            break
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(x, torch.Tensor):
            raise HybridPruneError(
                f"recalibrate_bn_ needs batches of image tensors (or (images, labels)), got {type(x).__name__}"
            )
        model(x.to(device))
    for m, momentum in zip(norms, saved, strict=False):
        m.momentum = momentum
    return model.eval()


def calibration_batches(data: ImageSet, num_batches: int, batch_size: int, seed: int = 0) -> list[torch.Tensor]:
    """The first batches of a seeded shuffle of the training images, without augmentation or labels."""
    return calibration_data(data, num_batches, batch_size, seed)[0]


def calibration_data(
    data: ImageSet, num_batches: int, batch_size: int, seed: int = 0
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Images and labels of the calibration batches (labels serve gradient-based metrics only)."""
    images, labels = [], []
    for i, (x, y) in enumerate(batches(data, batch_size, shuffle=True, seed=seed)):
        if i == num_batches:
            break
        images.append(x)
        labels.append(y)
    return images, labels
