"""The hybrid pruning job: dense model -> filter pruning -> fine-tune -> N:M pruning -> fine-tune, per metric.

Each finished step is written to the output folder at once (checkpoint plus a JSON record), so
an interrupted run resumed with the same folder redoes only the step that was in progress.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hybridprune.config import DataConfig, PruneConfig, RunConfig
from hybridprune.data.datasets import Dataset, channel_stats, load_dataset
from hybridprune.errors import HybridPruneError
from hybridprune.models.counts import model_stats
from hybridprune.models.sources import Classifier, build_model
from hybridprune.outputs import (
    LOCK_NAME,
    MANIFEST_NAME,
    FolderLock,
    check_output_dir,
    environment,
    remove_written_files,
    write_json,
    written_files,
)
from hybridprune.pruning.allocate import counts_at, counts_for_target, measure_sensitivity
from hybridprune.pruning.checkpoint import load_checkpoint, load_weights_, save_checkpoint
from hybridprune.pruning.metrics import ScoringContext, score_filters
from hybridprune.pruning.nm import apply_masks_, nm_eligibility, nm_prune_, satisfies_nm
from hybridprune.pruning.permute import PermutationReport, permute_for_nm_
from hybridprune.pruning.plan import FilterPlan, GroupPlan, apply_filter_plan_, plan_filter_pruning, step_counts
from hybridprune.training.loop import calibration_data, evaluate, fit, recalibrate_bn_
from hybridprune.world import World, barrier, broadcast, check_batch

Log = Callable[[str], None]


def prepare_data(cfg: RunConfig) -> Dataset:
    """Load the configured dataset and take its seeded subsets."""
    return prepare_data_config(cfg.data, cfg.seed)


def prepare_data_config(d: DataConfig, seed: int) -> Dataset:
    ds = load_dataset(d.dataset, d.data_dir, d.download, image_size=d.image_size, workers=d.workers, strict=d.strict)
    train, test = ds.train.subset(d.train_size, seed), ds.test.subset(d.test_size, seed + 1)
    return Dataset(ds.name, train, test, ds.hflip, ds.note)


def data_meta(data: Dataset) -> dict[str, Any]:
    """What a checkpoint records of its data: the class names, in label order, when the data has them."""
    classes = getattr(data.train, "classes", None)
    return {"classes": list(classes)} if classes else {}


def check_classes(meta: dict[str, Any], data: Dataset, path: str | Path) -> None:
    """A checkpoint that records class names only takes data with those classes, in that order."""
    recorded, given = meta.get("classes"), getattr(data.train, "classes", None)
    if recorded is not None and given is not None and list(recorded) != list(given):
        diff = sorted(set(recorded) ^ set(given))[:3] or ["(same names, another order)"]
        raise HybridPruneError(f"{path} was trained on other classes than {data.name} has (e.g. {', '.join(diff)})")


def check_fits(model: nn.Module, data: Dataset) -> None:
    """A checkpoint's model must take the dataset's images and predict at least its classes."""
    c, h, w = model.input_shape
    want = (data.train.channels, data.train.image_size)
    if (c, h) != want or model.num_classes < data.train.num_classes:
        raise HybridPruneError(
            f"model takes {c}x{h}x{w} images and {model.num_classes} classes; "
            f"{data.name} has {want[0]}x{want[1]}x{want[1]} and {data.train.num_classes}"
        )


def new_model(cfg: RunConfig, data: Dataset, log: Log = print) -> Classifier:
    """The configured model, shaped for the dataset, normalising with its training statistics; with
    `cfg.model.weights`, the user's trained weights loaded into it."""
    mean, std = channel_stats(data.train)
    torch.manual_seed(cfg.seed)
    model = build_model(
        cfg.model.name,
        in_channels=data.train.channels,
        num_classes=data.train.num_classes,
        image_size=data.train.image_size,
        width=cfg.model.width,
        mean=mean,
        std=std,
    )
    if model.net_channels != data.train.channels:
        log(
            f"model: {model.source.label} takes {model.net_channels}-channel images; each {data.name} image's "
            f"{data.train.channels} channel(s) are repeated to fill them"
        )
    if cfg.model.weights:
        load_weights_(model, cfg.model.weights)
        log(f"model: weights from {cfg.model.weights}")
    return model


def prune_filters_(
    model: nn.Module,
    cfg: PruneConfig,
    calibration: list[torch.Tensor],
    seed: int = 0,
    labels: list[torch.Tensor] | None = None,
    between: Callable[[nn.Module, int], None] | None = None,
    world: World = World(),
) -> FilterPlan:
    """Score filters with `cfg.metric`, plan the removal, and remove them physically, in place.

    With `cfg.steps` = K > 1 the channels go in K steps (`prune.step_counts`), each scored on the current
    weights; `between(model, step)` runs after every step but the last (fine-tuning goes there). The plan
    returned maps every group's original channels to those kept at the end.

    Example:
        >>> m = build_model("resnet20", width=0.5)
        >>> plan = prune_filters_(m, PruneConfig(metric="l1", filter_ratio=0.5, round_to=4), [])
        >>> [g.kept for g in plan.groups][:4]
        [4, 4, 4, 4]
    """
    ignore = _ignored(model, cfg.ignore)

    def context() -> ScoringContext:
        return ScoringContext(model, calibration, cfg.pattern, seed, labels or [], ignore=ignore)

    ctx = context()
    groups = {g.name: g for g in ctx.groups}
    scores = score_filters(cfg.metric, ctx)
    final = _final_counts(model, ctx.groups, scores, cfg, calibration, labels or [])
    alive = {n: list(range(g.size)) for n, g in groups.items()}  # original index of every channel left
    schedule = step_counts({n: g.size for n, g in groups.items()}, final, cfg.steps, cfg.round_to)
    for step, counts in enumerate(schedule, 1):
        if step > 1:  # rescored on the weights as they are now
            ctx = context()
            scores = score_filters(cfg.metric, ctx)
        plan = plan_filter_pruning(scores, cfg.filter_ratio, cfg.round_to, ctx.groups, counts)
        plan = broadcast(plan, world)  # rank 0 decides
        apply_filter_plan_(model, plan)
        for g in plan.groups:
            alive[g.name] = [alive[g.name][k] for k in g.keep]
        if between is not None and step < len(schedule):
            between(model, step)
    return FilterPlan(
        cfg.filter_ratio,
        cfg.round_to,
        tuple(GroupPlan(n, g.size, tuple(alive[n]), tuple(p.name for p in g.producers)) for n, g in groups.items()),
    )


def _final_counts(
    model: nn.Module,
    groups: list,
    scores: dict,
    cfg: PruneConfig,
    images: list[torch.Tensor],
    labels: list[torch.Tensor],
) -> dict[str, int]:
    """Channels each group keeps in the end: `cfg.allocation` at `cfg.filter_ratio`, or at `cfg.target_macs`."""
    curves = None
    if cfg.allocation == "sensitivity":
        curves = measure_sensitivity(model, groups, scores, images, labels, cfg.round_to)
    if cfg.target_macs is not None:
        return counts_for_target(model, groups, scores, cfg.allocation, cfg.target_macs, cfg.round_to, curves)
    counts = counts_at(cfg.filter_ratio, cfg.allocation, groups, scores, cfg.round_to, curves)
    if cfg.allocation == "uniform":
        plan_filter_pruning(scores, cfg.filter_ratio, cfg.round_to, groups)  # refuses a plan that prunes nothing
    return counts


def _ignored(model: nn.Module, names: tuple[str, ...]) -> tuple[str, ...]:
    """Module names to keep unpruned, given as in the user's network (or with the `net.` prefix); unknown
    names are bad input."""
    known = {n for n, _ in model.named_modules()}
    full = tuple(n if n.startswith("net.") else f"net.{n}" for n in names)
    missing = [n for n, f in zip(names, full, strict=True) if f not in known]
    if missing:
        examples = [
            n.removeprefix("net.") for n, m in model.named_modules() if n.startswith("net.") and "." not in n[4:]
        ]
        raise HybridPruneError(
            f"--ignore names no module {', '.join(missing)}; top-level modules: {', '.join(examples)}"
        )
    return full


def split_epochs(epochs: int, steps: int) -> list[int]:
    """Fine-tuning epochs after each of `steps` pruning steps, summing to `epochs` (earlier steps get the rest).

    Example:
        >>> split_epochs(3, 2), split_epochs(1, 3)
        ([2, 1], [1, 0, 0])
    """
    return [epochs // steps + (1 if i < epochs % steps else 0) for i in range(steps)]


def check_prunable(model: nn.Module, cfg: PruneConfig) -> None:
    """Before any work: the model traces, `ignore` names its modules, and the ratio with its rounding
    removes something (a plan that prunes nothing is refused, not run)."""
    ctx = ScoringContext(model, pattern=cfg.pattern, ignore=_ignored(model, cfg.ignore))
    if not ctx.groups:
        raise HybridPruneError(f"{model.source.label} has no prunable conv channel group (all ignored or the head)")
    sizes = {g.name: torch.zeros(g.size) for g in ctx.groups}
    plan_filter_pruning(sizes, cfg.filter_ratio, cfg.round_to, ctx.groups)


@dataclass
class Job:
    """One configured run: data, device, output folder, and how to report progress."""

    cfg: RunConfig
    data: Dataset
    device: torch.device
    out: Path
    log: Log = print
    progress: bool = True
    dense_checkpoint: str | None = None
    dense_model: nn.Module | None = None  # the loaded `dense_checkpoint`
    teacher: nn.Module | None = None  # the dense model, when fine-tuning distils from it
    world: World = World()  # the ranks of a torchrun job: all compute, rank 0 writes

    def _save(self, name: str, model: nn.Module, masks: dict[str, torch.Tensor] | None, meta: dict) -> Path:
        path = self.out / f"{name}.safetensors"
        if self.world.main:
            save_checkpoint(path, model, masks, meta, overwrite=True, record=True)
        return path

    def _write(self, path: Path, obj: Any) -> None:
        if self.world.main:
            write_json(path, obj, record=True)
        barrier(self.world)  # no rank reads the folder again before rank 0 has written to it

    def stage(
        self,
        model: nn.Module,
        masks: dict[str, torch.Tensor],
        name: str,
        desc: str,
        finetune: bool = True,
        epochs: int | None = None,
    ) -> dict[str, Any]:
        """Evaluate one-shot (raw and BN-recalibrated), fine-tune with masks held (`epochs`, default the
        configured ones), evaluate, save."""
        p, test = self.cfg.prune, self.data.test
        raw = evaluate(model, test, self.device)
        recalibrate_bn_(model, self.data.train, self.device, p.bn_recalib_batches, p.calib_batch_size, self.cfg.seed)
        oneshot = evaluate(model, test, self.device)
        fit(
            model,
            self.data,
            replace(
                self.cfg.finetune, epochs=0 if not finetune else self.cfg.finetune.epochs if epochs is None else epochs
            ),
            self.device,
            seed=self.cfg.seed,
            masks=masks,
            desc=desc,
            progress=self.progress,
            teacher=self.teacher,
            world=self.world,
        )
        if masks and not all(satisfies_nm(m.weight, p.pattern) for n, m in model.named_modules() if n in masks):
            raise RuntimeError("N:M pattern broken during fine-tuning")  # an internal bug, not bad input
        accuracy, stats = evaluate(model, test, self.device), model_stats(model, set(masks), p.pattern)
        # saved last, so the step's record follows the checkpoint at once: an interrupt between them is short
        ckpt = self._save(name, model, masks, {"stage": name, "nm": p.nm, **data_meta(self.data)})
        f = self.cfg.finetune
        return {
            "finetune_loss": (
                f"{1 - f.distill_weight:g} * CE + {f.distill_weight:g} * T^2 * KL(dense teacher), "
                f"T={f.distill_temperature:g}"
                if f.distill_weight > 0
                else f"CE (label smoothing {f.label_smoothing:g})"
            ),
            "accuracy_oneshot_raw": raw,
            "accuracy_oneshot": oneshot,
            "accuracy": accuracy,
            **stats,
            "nm_layers": sorted(masks),
            "checkpoint": str(ckpt),
        }

    def dense(self) -> tuple[nn.Module, dict[str, Any]]:
        record = self.out / "dense.json"
        if record.is_file():
            self.log("dense model: reusing the finished one in the output folder")
            model = load_checkpoint(self.out / "dense.safetensors", self.cfg.model.name)[0].to(self.device)
            return model, _read_json(record)
        if self.dense_checkpoint:
            return self._load_dense(record)
        model = new_model(self.cfg, self.data, self.log)
        if self.cfg.model.weights:  # the user's trained model: prune it as it is
            return self._record_dense(model, record)
        fit(
            model,
            self.data,
            self.cfg.train,
            self.device,
            seed=self.cfg.seed,
            desc="train dense",
            progress=self.progress,
            world=self.world,
        )
        return self._record_dense(model, record)

    def _record_dense(
        self, model: nn.Module, record: Path, source: str | None = None
    ) -> tuple[nn.Module, dict[str, Any]]:
        result = {"accuracy": evaluate(model, self.data.test, self.device), **model_stats(model)}
        meta = {"stage": "dense", **data_meta(self.data)}
        result["checkpoint"] = str(self._save("dense", model, None, meta))
        if source:
            result["loaded_from"] = source
        self._write(record, result)
        return model, result

    def _load_dense(self, record: Path) -> tuple[nn.Module, dict[str, Any]]:
        model = (
            self.dense_model
            if self.dense_model is not None
            else load_dense_checkpoint(self.dense_checkpoint, self.data, self.cfg.model.name)
        )
        # a copy in the run folder, so --resume and bench find it there whatever happens to the original
        return self._record_dense(model.to(self.device), record, source=str(self.dense_checkpoint))

    def nm_only(self, dense: nn.Module) -> dict[str, Any]:
        """The 2:4-only model: dense width, N:M masks, fine-tuned the same way."""
        return self._cached("nm", lambda: self._nm_stage(dense, "nm", "fine-tune nm-only"))

    def _nm_stage(self, model: nn.Module, name: str, desc: str) -> dict[str, Any]:
        nm_model, masks, permuted = _nm_copy(model, self.cfg, self.world)
        result = self.stage(nm_model, masks, name, desc)
        if permuted:  # the magnitude that survives N:M in each group's reading layers, before and after
            result["permutation"] = [asdict(r) for r in permuted]
        return result

    def metric(
        self, dense: nn.Module, metric: str, calibration: list[torch.Tensor], labels: list[torch.Tensor] | None = None
    ) -> dict[str, Any]:
        """Filter-prune with one metric, fine-tune, then N:M and fine-tune: two steps, each saved when done,
        so a resumed run redoes only the step that was in progress."""

        def filter_step() -> dict[str, Any]:
            model = copy.deepcopy(dense)
            prune_cfg = PruneConfig(**{**self.cfg.prune.to_dict(), "metric": metric})
            epochs = split_epochs(self.cfg.finetune.epochs, prune_cfg.steps)  # the same budget, spread

            def between(m: nn.Module, step: int) -> None:
                p = self.cfg.prune
                recalibrate_bn_(m, self.data.train, self.device, p.bn_recalib_batches, p.calib_batch_size, step)
                if self.cfg.filter_finetune:
                    fit(m, self.data, replace(self.cfg.finetune, epochs=epochs[step - 1]), self.device,
                        seed=self.cfg.seed + step, desc=f"fine-tune {metric} step {step}", progress=self.progress,
                        teacher=self.teacher, world=self.world)  # fmt: skip

            plan = prune_filters_(model, prune_cfg, calibration, self.cfg.seed, labels, between, self.world)
            name, desc = f"{metric}-filter", f"fine-tune {metric} filter"
            filt = self.stage(model, {}, name, desc, self.cfg.filter_finetune, epochs[-1])
            return {"plan": plan.to_dict(), "prune_steps": prune_cfg.steps, "step_epochs": epochs, "filter": filt}

        first = self._cached(f"step-{metric}-filter", filter_step)

        def hybrid_step() -> dict[str, Any]:
            # from the saved filter checkpoint, not from memory: a resumed run takes exactly the same path
            model = load_checkpoint(self.out / f"{metric}-filter.safetensors", self.cfg.model.name)[0]
            return self._nm_stage(model.to(self.device), f"{metric}-hybrid", f"fine-tune {metric} hybrid")

        hybrid = self._cached(f"step-{metric}-hybrid", hybrid_step)
        return {"metric": metric, **first, "hybrid": hybrid, "checkpoint": hybrid["checkpoint"]}

    def _cached(self, name: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        record = self.out / f"{name}.json"
        if record.is_file():
            self.log(f"{name}: reusing the finished result in the output folder")
            return _read_json(record)
        result = compute()
        self._write(record, result)
        return result


def load_dense_checkpoint(path: str | Path, data: Dataset, user_model: str | None = None) -> nn.Module:
    """A dense checkpoint that fits the dataset; anything else is bad input."""
    model, masks, meta = load_checkpoint(path, user_model)
    if masks:
        raise HybridPruneError(f"{path} is already N:M-pruned; pruning starts from a dense checkpoint")
    check_fits(model, data)
    check_classes(meta, data, path)
    return model


def _nm_copy(
    model: nn.Module, cfg: RunConfig, world: World = World()
) -> tuple[nn.Module, dict[str, torch.Tensor], list[PermutationReport]]:
    """An N:M-pruned copy, its masks, and (with `cfg.prune.permute`) the channel permutations made first."""
    nm_model = copy.deepcopy(model)
    permuted = permute_for_nm_(nm_model, cfg.prune.pattern, seed=cfg.seed) if cfg.prune.permute else []
    masks = broadcast(nm_prune_(nm_model, cfg.prune.pattern), world)  # rank 0's masks, on every rank
    return apply_masks_(nm_model, masks), masks, permuted


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise HybridPruneError(f"{path} is not readable JSON ({e}); use another --out or --overwrite") from None


def prepare_out_dir(out: Path, cfg: RunConfig, resume: bool, overwrite: bool) -> None:
    """A new folder, or one holding this same configuration when resuming; never silently mixed.

    `overwrite` removes only the files hybridprune wrote there (its manifest lists them), never a user's.
    """
    ours = {LOCK_NAME, MANIFEST_NAME}
    contents = [p for p in out.iterdir() if p.name not in ours] if out.is_dir() else []
    if contents:
        if not (resume or overwrite):
            raise HybridPruneError(
                f"output folder {out} exists; pass --resume to continue it or --overwrite to redo it"
            )
        config_file = out / "config.json"
        if overwrite:
            if not written_files(out):
                raise HybridPruneError(
                    f"{out} holds files that hybridprune did not write ({contents[0].name}, ...); "
                    "choose another --out (--overwrite removes only hybridprune's own files)"
                )
            remove_written_files(out)
        elif not config_file.is_file():
            raise HybridPruneError(f"{out} holds no hybridprune run to resume (no config.json); choose another --out")
        elif _read_json(config_file) != json.loads(json.dumps(cfg.to_dict())):  # tuples as lists
            raise HybridPruneError(f"{out} holds a run with another configuration; use another --out or --overwrite")
    write_json(out / "config.json", cfg.to_dict(), record=True)


def run(
    cfg: RunConfig,
    out: str | Path,
    device: torch.device,
    *,
    resume: bool = False,
    overwrite: bool = False,
    log: Log = print,
    progress: bool = True,
    dense_checkpoint: str | None = None,
    include_nm_only: bool = True,
    world: World = World(),
) -> dict[str, Any]:
    """The whole job: train (or reuse) the dense model, then prune it with every metric.

    Returns the result object (see docs/results-format.md) and writes it to OUT/results.json. Under torchrun
    (`world` of several ranks) every rank computes and returns the same result; rank 0 alone locks the
    folder, writes and logs.
    """
    for batch_size in (cfg.train.batch_size, cfg.finetune.batch_size):
        check_batch(batch_size, world)
    log = log if world.main else _silent
    out = check_output_dir(Path(out))
    env = environment()  # now, not at the end: the checkout may change while a long run goes on
    data = prepare_data(cfg)
    # loaded before anything is written, so a bad checkpoint leaves no output folder behind
    dense_model = load_dense_checkpoint(dense_checkpoint, data, cfg.model.name) if dense_checkpoint else None
    check_prunable(dense_model if dense_model is not None else new_model(cfg, data, log=lambda _: None), cfg.prune)
    with FolderLock(out) if world.main else contextlib.nullcontext() as lock:  # one run per folder
        if lock is not None and lock.replaced_stale:
            log(f"output folder: replaced the lock of a process that is gone ({lock.replaced_stale})")
        if world.main:
            prepare_out_dir(out, cfg, resume, overwrite)
        barrier(world)
        log(
            f"data: {data.name}, {len(data.train)} train / {len(data.test)} test images, "
            f"{data.train.channels}x{data.train.image_size}x{data.train.image_size}, {data.train.num_classes} classes"
        )
        if data.note:
            log(f"data: {data.note}")
        if device.type == "cpu":
            log("device: cpu - filter pruning is the only speedup here; N:M layers run as dense masked layers")
        job = Job(cfg, data, device, out, log, progress and world.main, dense_checkpoint, dense_model, world=world)
        dense, dense_result = job.dense()
        job.teacher = dense if cfg.finetune.distill_weight > 0 else None
        images, labels = calibration_data(data.train, cfg.prune.calib_batches, cfg.prune.calib_batch_size, cfg.seed)
        results = [job.metric(dense, m, images, labels) for m in cfg.metrics]
        result = {
            "config": cfg.to_dict(),
            "environment": env,
            "device": str(device),
            "dataset": {"name": data.name, "train": len(data.train), "test": len(data.test)},
            "layers": [e.__dict__ for e in nm_eligibility(dense, cfg.prune.pattern)],
            "dense": dense_result,
            "results": results,
        }
        if include_nm_only:
            result["nm"] = job.nm_only(dense)
        skipped = sum(getattr(s, "skipped", None).count for s in (data.train, data.test) if hasattr(s, "skipped"))
        if hasattr(data.train, "skipped"):
            result["dataset"]["unreadable_files_skipped"] = skipped
            log(f"data: {skipped} unreadable image file(s) skipped (pass --strict to stop at the first)")
        job._write(out / "results.json", result)
    return result


def _silent(message: str) -> None:
    """The log of ranks other than 0: they compute what rank 0 reports."""
