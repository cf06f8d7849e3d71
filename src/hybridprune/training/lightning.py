"""Hybrid pruning inside a PyTorch Lightning run: one callback, `HybridPruningCallback`.

At the start of `filter_epoch` it filter-prunes the network (scored on the first training batches),
recalibrates BatchNorm and rebuilds the optimizers from `configure_optimizers` (filter pruning replaces the
pruned layers' parameters, so the old optimizer would train tensors the model no longer uses); at the start
of `nm_epoch` it applies N:M masks and holds them on every optimizer with `hold_masks`; when training ends it
writes the pruned model, its masks and its pruning history as a hybridprune checkpoint, which
`load_checkpoint(path, model=<an unpruned instance>)` rebuilds.

Lightning is an optional extra: `pip install -e ".[lightning]"`. The filter step runs in one process (a
multi-process strategy has already wrapped the model in DDP when epochs start: prune before `fit` there, with
`prune_filters_`, and let the callback do the 2:4 step, which every rank computes identically).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from hybridprune.config import PruneConfig
from hybridprune.errors import HybridPruneError

try:
    from lightning.pytorch import Callback, LightningModule, Trainer
except ImportError:  # the optional extra is missing: the class below says so when it is built
    Callback, LightningModule, Trainer = object, Any, Any  # type: ignore[assignment,misc]
    LIGHTNING = False
else:
    LIGHTNING = True

from hybridprune.pruning.checkpoint import save_checkpoint
from hybridprune.pruning.filters import prune_filters_
from hybridprune.pruning.graph import known_input_shape
from hybridprune.pruning.nm import nm_prune_
from hybridprune.training.loop import recalibrate_bn_
from hybridprune.training.masks import MaskHandle, hold_masks


class HybridPruningCallback(Callback):
    """Filter pruning at the start of `filter_epoch`, N:M (2:4) masks from the start of `nm_epoch` (by default
    the epoch after) held on every optimizer step, and the pruned checkpoint written to `checkpoint` at the end.

    `module`: the attribute of the LightningModule holding the network to prune (dotted; None: the
    LightningModule itself, whose forward must take the images). `calibration`: image batches to score on
    (by default the first `calibration_batches` batches of the training dataloader, whose first element is
    the images); `example_inputs`: a batch the network takes (default: the first calibration batch).

    Name the network with `module` where the LightningModule holds more than it (the MAC-target and
    sensitivity allocations and `hybrid_output` score on copies, and a LightningModule refers to its trainer).

    Example:
        >>> cb = HybridPruningCallback(PruneConfig(metric="l1", filter_ratio=0.5), filter_epoch=1, module="net")
        >>> cb.filter_epoch, cb.nm_epoch
        (1, 2)
    """

    def __init__(
        self,
        cfg: PruneConfig,
        *,
        filter_epoch: int = 0,
        nm_epoch: int | None = None,
        checkpoint: str | Path | None = None,
        module: str | None = None,
        calibration: list[torch.Tensor] | None = None,
        calibration_batches: int = 4,
        example_inputs: torch.Tensor | None = None,
        recalibrate: bool = True,
        overwrite: bool = False,
    ) -> None:
        if not LIGHTNING:
            raise HybridPruneError('the Lightning callback needs lightning: pip install -e ".[lightning]"')
        if not isinstance(cfg, PruneConfig):
            raise HybridPruneError(f"cfg must be a hybridprune PruneConfig, got {type(cfg).__name__}")
        nm_epoch = filter_epoch + 1 if nm_epoch is None else nm_epoch
        if filter_epoch < 0 or nm_epoch < filter_epoch or calibration_batches < 1:
            raise HybridPruneError(
                f"need 0 <= filter_epoch <= nm_epoch and calibration_batches >= 1, got filter_epoch={filter_epoch}, "
                f"nm_epoch={nm_epoch}, calibration_batches={calibration_batches}"
            )
        super().__init__()
        self.cfg, self.filter_epoch, self.nm_epoch = cfg, filter_epoch, nm_epoch
        self.checkpoint = None if checkpoint is None else Path(checkpoint)
        self.module, self.calibration, self.calibration_batches = module, calibration, calibration_batches
        self.example_inputs, self.recalibrate, self.overwrite = example_inputs, recalibrate, overwrite
        self.plan = None
        self.masks: dict[str, torch.Tensor] = {}
        self.handles: list[MaskHandle] = []

    def network(self, pl_module: LightningModule) -> nn.Module:
        """The network this callback prunes inside `pl_module`."""
        if self.module is None:
            return pl_module
        try:
            return pl_module.get_submodule(self.module)
        except AttributeError:
            raise HybridPruneError(f"{type(pl_module).__name__} has no module {self.module!r} to prune") from None

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch
        if epoch == self.filter_epoch and self.plan is None and self.cfg.filter_ratio > 0:
            self._filter_step(trainer, pl_module)
        if epoch == self.nm_epoch and not self.masks:
            self._nm_step(trainer, pl_module)

    def _filter_step(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.world_size > 1:
            raise HybridPruneError(
                "the callback filter-prunes in one process only (the strategy has wrapped the model already); "
                "prune before fit with hybridprune.prune_filters_ and keep the callback for the 2:4 step"
            )
        images, labels = self._calibration(trainer)
        net = self.network(pl_module)
        example = self.example_inputs if self.example_inputs is not None else images[0]
        self.plan = prune_filters_(net, self.cfg, images, labels=labels or None, example_inputs=example)
        if self.recalibrate:
            recalibrate_bn_(net, images, num_batches=len(images))
        net.train()
        trainer.strategy.setup_optimizers(trainer)  # the old optimizers hold the replaced parameters

    def _nm_step(self, trainer: Trainer, pl_module: LightningModule) -> None:
        net = self.network(pl_module)
        example = self.example_inputs
        if example is None and known_input_shape(net) is None:  # not filter-pruned here: trace a training batch
            example = self._calibration(trainer)[0][0]
        self.masks = nm_prune_(net, self.cfg.pattern, example_inputs=example)
        self.handles = [hold_masks(net, self.masks, opt) for opt in trainer.optimizers]

    def _calibration(self, trainer: Trainer) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Images (and labels, where batches carry them) to score on: given, or the first training batches."""
        if self.calibration is not None:
            return list(self.calibration), []
        loader = trainer.train_dataloader
        if loader is None:
            raise HybridPruneError("no training dataloader to take calibration images from: pass calibration=")
        images, labels = [], []
        for batch in loader:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            if not isinstance(x, torch.Tensor):
                raise HybridPruneError("training batches must be images or (images, labels): pass calibration=")
            images.append(x)
            if isinstance(batch, (tuple, list)) and len(batch) > 1 and isinstance(batch[1], torch.Tensor):
                labels.append(batch[1])
            if len(images) == self.calibration_batches:
                break
        return images, labels if len(labels) == len(images) else []

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for handle in self.handles:
            handle.remove()
        if self.checkpoint is not None and trainer.is_global_zero:
            meta = {"plan": None if self.plan is None else self.plan.to_dict(), "epochs": trainer.current_epoch}
            save_checkpoint(self.checkpoint, self.network(pl_module), self.masks, meta, overwrite=self.overwrite)
