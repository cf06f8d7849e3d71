"""The staged job: dense model -> filter pruning -> fine-tune -> N:M pruning -> fine-tune, per metric.

Each finished step is written to the output folder at once (checkpoint plus a JSON record); those records
are the job's resume store, so an interrupted run resumed with the same folder redoes only the step that
was in progress. The steps themselves live below: `pruning.filters` removes filters, `pruning.nm` makes
the masks, `training.loop` fine-tunes with them held.
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

from hybridprune.config import PruneConfig, RunConfig, TrainConfig
from hybridprune.data.images import Dataset
from hybridprune.deploy.deployment import check_deploy_data, check_targets, deploy_variants
from hybridprune.deploy.latency_target import LatencyReport, allocate_for_latency, layers_where_2to4_pays
from hybridprune.deploy.profile import resolve_settings
from hybridprune.deploy.runtimes import device_name
from hybridprune.errors import HybridPruneError
from hybridprune.experiments.deployed import DEPLOY_FOLDER, load_variants
from hybridprune.experiments.inputs import (
    Log,
    data_meta,
    load_dense_checkpoint,
    new_model,
    prepare_data,
)
from hybridprune.lock import LOCK_NAME, FolderLock
from hybridprune.models.counts import model_stats
from hybridprune.outputs import MANIFEST_NAME, check_output_dir, remove_written_files, write_json, written_files
from hybridprune.parse import read_json
from hybridprune.provenance import environment
from hybridprune.pruning.budget import Allocation
from hybridprune.pruning.checkpoint import load_checkpoint, save_checkpoint
from hybridprune.pruning.filters import check_prunable, prune_filters_
from hybridprune.pruning.latency import load_table
from hybridprune.pruning.nm import apply_masks_, nm_eligibility, nm_prune_, satisfies_nm
from hybridprune.pruning.permute import PermutationReport, permute_for_nm_
from hybridprune.training.loop import (
    calibration_data,
    check_device_settings,
    check_finite,
    evaluate,
    fit,
    recalibrate_bn_,
    resolve_precision,
)
from hybridprune.training.precision import Precision
from hybridprune.world import World, barrier, broadcast, check_batch

LATENCY_TABLE = "latency-table.json"  # a run's latency table, kept in its output folder


def split_epochs(epochs: int, steps: int) -> list[int]:
    """Fine-tuning epochs after each of `steps` pruning steps, summing to `epochs` (earlier steps get the rest).

    Example:
        >>> split_epochs(3, 2), split_epochs(1, 3)
        ([2, 1], [1, 0, 0])
    """
    return [epochs // steps + (1 if i < epochs % steps else 0) for i in range(steps)]


def nm_pruned_copy(
    model: nn.Module, cfg: RunConfig, world: World = World(), layers: frozenset[str] | None = None
) -> tuple[nn.Module, dict[str, torch.Tensor], list[PermutationReport]]:
    """An N:M-pruned copy, its masks, and (with `cfg.prune.permute`) the channel permutations made first;
    `layers` limits the masks to those layers (every eligible one when None).

    Example:
        >>> from hybridprune.models.sources import build_model
        >>> pruned, masks, permuted = nm_pruned_copy(build_model("alexnet", width=0.125), RunConfig())
        >>> all(satisfies_nm(pruned.get_submodule(n).weight) for n in masks), permuted
        (True, [])
    """
    nm_model = copy.deepcopy(model)
    permuted = permute_for_nm_(nm_model, cfg.prune.pattern, seed=cfg.seed) if cfg.prune.permute else []
    masks = broadcast(nm_prune_(nm_model, cfg.prune.pattern, layers), world)  # rank 0's masks, on every rank
    return apply_masks_(nm_model, masks), masks, permuted


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
    precision: Precision | None = None  # `--precision auto` as measured once, on the first model trained

    def training_precision(self, cfg: TrainConfig, model: nn.Module) -> Precision | None:
        """What `auto` resolves to for this job, measured once and said once (None: a named precision)."""
        if cfg.precision != "auto":
            return None
        if self.precision is None:
            self.precision = resolve_precision(cfg, model, self.data, self.device, self.world)
        return self.precision

    def write_record(self, path: Path, obj: Any) -> None:
        """Write a JSON record into the output folder (rank 0 writes, every rank waits for it)."""
        if self.world.main:
            write_json(path, obj, record=True)
        barrier(self.world)  # no rank reads the folder again before rank 0 has written to it

    def results(self, env: dict[str, Any], include_nm_only: bool | None = None) -> dict[str, Any]:
        """The whole job: the dense model, every metric's filter and hybrid steps, and the 2:4-only model (None:
        when the run applies 2:4 anywhere; True: asked for, always; False: never); the result object of
        docs/results-format.md (the caller writes it)."""
        cfg, data = self.cfg, self.data
        dense, dense_result = self.dense()
        self.teacher = dense if cfg.finetune.distill_weight > 0 else None
        images, labels = calibration_data(data.train, cfg.prune.calib_batches, cfg.prune.calib_batch_size, cfg.seed)
        if cfg.prune.nm_rule == "none":
            self.log("2:4: none (--nm-where none): filter pruning only, the filter-pruned models are final")
        results = [self.filter_then_nm(dense, m, images, labels) for m in cfg.metrics]
        result = {
            "config": cfg.to_record(),
            "environment": env,
            "device": str(self.device),
            "dataset": {"name": data.name, "train": len(data.train), "test": len(data.test)},
            "layers": [e.__dict__ for e in nm_eligibility(dense, cfg.prune.pattern)],
            "dense": dense_result,
            "results": results,
        }
        applied = any("hybrid" in r for r in results)
        if include_nm_only or (include_nm_only is None and applied):
            nm = self.nm_only(dense, asked=bool(include_nm_only))
            if nm is not None:
                result["nm"] = nm
        if cfg.deploy.targets:
            result["deployed"] = self.deployed(result)
        if self.precision is not None:
            result["training_precision"] = {"name": self.precision.name, "reason": self.precision.reason}
        if hasattr(data.train, "skipped"):
            skipped = sum(s.skipped.count for s in (data.train, data.test) if hasattr(s, "skipped"))
            result["dataset"]["unreadable_files_skipped"] = skipped
            if skipped:  # nothing skipped is no news
                self.log(f"data: {skipped} unreadable image file(s) skipped (pass --strict to stop at the first)")
        return result

    def deployed(self, result: dict[str, Any]) -> dict[str, Any]:
        """Every model of `result` in its deployed forms (`--deploy`), measured by rank 0 for all ranks; a finished
        record is reused only for the same deploy settings (a resumed run may change them: the models stay)."""
        record, settings = self.out / "deploy.json", self.cfg.deploy.to_dict()
        if record.is_file() and (kept := _read_json(record)).get("settings") == json.loads(json.dumps(settings)):
            self.log("deploy: reusing the finished result in the output folder")
            return kept
        answer = None
        if self.world.main:
            variants = load_variants(result, self.cfg.model.name)
            answer = deploy_variants(variants, self.data, self.cfg.deploy, self.out / DEPLOY_FOLDER,
                                     pattern=self.cfg.prune.pattern, seed=self.cfg.seed, progress=self.progress,
                                     log=self.log)  # fmt: skip
            answer["settings"] = settings
        answer = broadcast(answer, self.world)
        self.write_record(record, answer)
        return answer

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
        epochs = 0 if not finetune else self.cfg.finetune.epochs if epochs is None else epochs
        self._finetune(model, replace(self.cfg.finetune, epochs=epochs), self.cfg.seed, desc, masks)
        check_finite(model, desc, self.cfg.finetune.lr)  # NaN breaks any pattern: the user's numbers, not a bug
        if masks and not all(satisfies_nm(m.weight, p.pattern) for n, m in model.named_modules() if n in masks):
            raise RuntimeError("N:M pattern broken during fine-tuning")  # an internal bug, not bad input
        accuracy, stats = evaluate(model, test, self.device), model_stats(model, set(masks), p.pattern)
        # saved last, so the step's record follows the checkpoint at once: an interrupt between them is short
        ckpt = self._save(name, model, masks, {"stage": name, "nm": p.nm, **data_meta(self.data)})
        return {
            "finetune_loss": _loss_description(self.cfg.finetune),
            "accuracy_oneshot_raw": raw,
            "accuracy_oneshot": oneshot,
            "accuracy": accuracy,
            **stats,
            "nm_layers": sorted(masks),
            "checkpoint": str(ckpt),
        }

    def dense(self) -> tuple[nn.Module, dict[str, Any]]:
        """The dense model and its record: reused from the folder, loaded from `dense_checkpoint`, or trained."""
        record = self.out / "dense.json"
        if record.is_file():
            self.log("dense model: reusing the finished one in the output folder")
            model = load_checkpoint(self.out / "dense.safetensors", self.cfg.model.name)[0].to(self.device)
            return model, _read_json(record)
        if self.dense_checkpoint:
            return self._load_dense(record)
        model = new_model(self.cfg, self.data, self.log)
        if not self.cfg.model.weights:  # the user's trained model is pruned as it is
            precision = self.training_precision(self.cfg.train, model)
            fit(model, self.data, self.cfg.train, self.device, seed=self.cfg.seed, desc="train dense",
                progress=self.progress, world=self.world, precision=precision)  # fmt: skip
        return self._record_dense(model, record)

    def nm_only(self, dense: nn.Module, asked: bool = True) -> dict[str, Any] | None:
        """The 2:4-only model: dense width, N:M masks on the layers the nm rule picks, fine-tuned the same way.
        None when the rule picks no layer, unless `asked`: then every eligible layer takes masks."""

        def compute() -> dict[str, Any] | None:
            layers = self._nm_layers(dense)
            if layers is not None and not layers:
                if not asked:
                    return None
                self.log("2:4-only model: the --nm-where rule picks no layer; every eligible layer takes 2:4, as asked")
                layers = None
            return self._nm_stage(dense, "nm", "fine-tune nm-only", layers)

        if self.cfg.prune.nm_rule == "none" and not asked:
            return None
        return self._resumable("nm", compute)

    def filter_then_nm(
        self, dense: nn.Module, metric: str, calibration: list[torch.Tensor], labels: list[torch.Tensor] | None = None
    ) -> dict[str, Any]:
        """Filter-prune a copy of `dense` with one metric and fine-tune, then N:M-prune it and fine-tune: two
        steps, each saved when done, so a resumed run redoes only the step that was in progress. Where no layer
        takes 2:4 (`--nm-where none`, or `auto` where 2:4 pays nowhere) there is no second step: the record has no
        `hybrid` stage and its final checkpoint is the filter-pruned model."""
        first = self._resumable(f"step-{metric}-filter", lambda: self._filter_step(dense, metric, calibration, labels))
        chosen = first.get("latency", {}).get("sparse_layers")  # the latency allocation's 2:4 layers, if it ran
        if self.cfg.prune.nm_rule == "none" or chosen == []:
            return {"metric": metric, **first, "checkpoint": first["filter"]["checkpoint"]}
        hybrid = self._resumable(f"step-{metric}-hybrid", lambda: self._hybrid_step(metric, chosen))
        if hybrid is None:
            return {"metric": metric, **first, "checkpoint": first["filter"]["checkpoint"]}
        return {"metric": metric, **first, "hybrid": hybrid, "checkpoint": hybrid["checkpoint"]}

    def _filter_step(
        self, dense: nn.Module, metric: str, calibration: list[torch.Tensor], labels: list[torch.Tensor] | None
    ) -> dict[str, Any]:
        model = copy.deepcopy(dense)
        prune_cfg = PruneConfig(**{**self.cfg.prune.to_dict(), "metric": metric})
        epochs = split_epochs(self.cfg.finetune.epochs, prune_cfg.steps)  # the same budget, spread over the steps

        def between(m: nn.Module, step: int) -> None:
            p = self.cfg.prune
            recalibrate_bn_(m, self.data.train, self.device, p.bn_recalib_batches, p.calib_batch_size, step)
            if self.cfg.filter_finetune:
                cfg = replace(self.cfg.finetune, epochs=epochs[step - 1])
                self._finetune(m, cfg, self.cfg.seed + step, f"fine-tune {metric} step {step}")

        allocation, latency = None, None
        if prune_cfg.target_latency is not None:
            allocation, latency = self._latency_allocation(model, prune_cfg, calibration, labels or [])
        counts = allocation.counts if allocation else None
        plan = prune_filters_(model, prune_cfg, calibration, self.cfg.seed, labels, between, self.world, counts=counts)
        name, desc = f"{metric}-filter", f"fine-tune {metric} filter"
        filt = self.stage(model, {}, name, desc, self.cfg.filter_finetune, epochs[-1])
        result = {"plan": plan.to_dict(), "prune_steps": prune_cfg.steps, "step_epochs": epochs, "filter": filt}
        return {**result, "latency": latency.to_dict()} if latency else result

    def _latency_allocation(
        self, model: nn.Module, cfg: PruneConfig, calibration: list[torch.Tensor], labels: list[torch.Tensor]
    ) -> tuple[Allocation, LatencyReport]:
        """Rank 0 profiles (reusing the run's table from an earlier metric), solves and measures; all ranks get it."""
        table = self.out / LATENCY_TABLE
        if table.is_file() and cfg.latency_table is None:
            cfg = replace(cfg, latency_table=str(table))
        answer = None
        if self.world.main:
            answer = allocate_for_latency(model, cfg, calibration, labels, self.device, table, self.cfg.seed,
                                          self.progress, record=True)  # fmt: skip
        allocation, report = broadcast(answer, self.world)
        self.log(
            f"latency target {report.target_ms:.3f} ms ({cfg.target_latency:g} of {report.dense_ms['median']:.3f} ms, "
            f"{report.runtime}, batch {report.batch}): pruned model predicted {report.pruned_ms['predicted']:.3f} ms, "
            f"measured {report.pruned_ms['median']:.3f} ms after {len(report.solves)} solve(s); "
            f"2:4 on {len(report.sparse_layers)} layer(s)"
        )
        if report.notice:
            self.log(f"note: {report.notice}")
        return allocation, report

    def _nm_layers(self, model: nn.Module, chosen: list[str] | None = None) -> frozenset[str] | None:
        """The layers that take 2:4 masks under the nm rule: every eligible one (None), none, or where it pays
        (the latency allocation's choice, or measured on this model's widths)."""
        rule = self.cfg.prune.nm_rule
        if rule == "all":
            return None
        if rule == "none":
            return frozenset()
        if chosen is not None:
            return frozenset(chosen)
        answer = None
        if self.world.main:
            answer = layers_where_2to4_pays(model, self.cfg.prune, self.device, progress=self.progress)
        layers, notice = broadcast(answer, self.world)
        if notice:
            self.log(f"note: {notice}")
        return layers

    def _hybrid_step(self, metric: str, chosen: list[str] | None = None) -> dict[str, Any] | None:
        """The N:M step on the saved filter checkpoint (not from memory: a resumed run takes exactly the same
        path); None where the nm rule picks no layer (no stage is run or saved)."""
        model = load_checkpoint(self.out / f"{metric}-filter.safetensors", self.cfg.model.name)[0].to(self.device)
        layers = self._nm_layers(model, chosen)
        if layers is not None and not layers:
            return None
        return self._nm_stage(model, f"{metric}-hybrid", f"fine-tune {metric} hybrid", layers)

    def _nm_stage(self, model: nn.Module, name: str, desc: str, layers: frozenset[str] | None = None) -> dict[str, Any]:
        nm_model, masks, permuted = nm_pruned_copy(model, self.cfg, self.world, layers)
        result = self.stage(nm_model, masks, name, desc)
        if permuted:  # the magnitude that survives N:M in each group's reading layers, before and after
            result["permutation"] = [asdict(r) for r in permuted]
        return result

    def _resumable(self, name: str, compute: Callable[[], Any]) -> Any:
        """The resume store: a step whose record OUT/NAME.json exists is read back, not redone; any other is
        computed and its record written."""
        record = self.out / f"{name}.json"
        if record.is_file():
            self.log(f"{name}: reusing the finished result in the output folder")
            return _read_json(record)
        result = compute()
        self.write_record(record, result)
        return result

    def _finetune(
        self, model: nn.Module, cfg: TrainConfig, seed: int, desc: str, masks: dict[str, torch.Tensor] | None = None
    ) -> None:
        fit(model, self.data, cfg, self.device, seed=seed, masks=masks, desc=desc, progress=self.progress,
            teacher=self.teacher, world=self.world, precision=self.training_precision(cfg, model))  # fmt: skip

    def _save(self, name: str, model: nn.Module, masks: dict[str, torch.Tensor] | None, meta: dict) -> Path:
        path = self.out / f"{name}.safetensors"
        if self.world.main:
            save_checkpoint(path, model, masks, meta, overwrite=True, record=True)
        return path

    def _record_dense(
        self, model: nn.Module, record: Path, source: str | None = None
    ) -> tuple[nn.Module, dict[str, Any]]:
        result = {"accuracy": evaluate(model, self.data.test, self.device), **model_stats(model)}
        meta = {"stage": "dense", **data_meta(self.data)}
        result["checkpoint"] = str(self._save("dense", model, None, meta))
        if source:
            result["loaded_from"] = source
        self.write_record(record, result)
        return model, result

    def _load_dense(self, record: Path) -> tuple[nn.Module, dict[str, Any]]:
        model = (
            self.dense_model
            if self.dense_model is not None
            else load_dense_checkpoint(self.dense_checkpoint, self.data, self.cfg.model.name)
        )
        # a copy in the run folder, so --resume and bench find it there whatever happens to the original
        return self._record_dense(model.to(self.device), record, source=str(self.dense_checkpoint))


def _loss_description(f: TrainConfig) -> str:
    """The fine-tuning loss in words, for the record."""
    if f.distill_weight > 0:
        return (
            f"{1 - f.distill_weight:g} * CE + {f.distill_weight:g} * T^2 * KL(dense teacher), "
            f"T={f.distill_temperature:g}"
        )
    return f"CE (label smoothing {f.label_smoothing:g})"


def _read_json(path: Path) -> Any:
    try:
        return read_json(path, "run record")
    except HybridPruneError as e:
        raise HybridPruneError(f"{e}; use another --out or --overwrite") from None


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
            if (out / DEPLOY_FOLDER).is_dir():  # the deployed forms of the run being redone
                remove_written_files(out / DEPLOY_FOLDER)
        elif not config_file.is_file():
            raise HybridPruneError(f"{out} holds no hybridprune run to resume (no config.json); choose another --out")
        elif _without_deploy(_read_json(config_file)) != _without_deploy(json.loads(json.dumps(cfg.to_dict()))):
            # the deploy settings may change on --resume: they decide no model, and deploy.json names its own
            raise HybridPruneError(f"{out} holds a run with another configuration; use another --out or --overwrite")
    write_json(out / "config.json", cfg.to_dict(), record=True)


def _without_deploy(config: Any) -> Any:
    """A run's configuration less its deploy settings (tuples as lists): what its models depend on."""
    return {k: v for k, v in config.items() if k != "deploy"} if isinstance(config, dict) else config


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
    include_nm_only: bool | None = None,
    world: World = World(),
) -> dict[str, Any]:
    """The whole job: train (or reuse) the dense model, then prune it with every metric; the 2:4-only model too
    where the run applies 2:4 (`include_nm_only` None), always (True) or never (False).

    Returns the result object (see docs/results-format.md) and writes it to OUT/results.json. Under torchrun
    (`world` of several ranks) every rank computes and returns the same result; rank 0 alone locks the
    folder, writes and logs.
    """
    for batch_size in (cfg.train.batch_size, cfg.finetune.batch_size):
        check_batch(batch_size, world)
    log = log if world.main else _silent
    for note in dict.fromkeys(check_device_settings(c, device, world) for c in (cfg.train, cfg.finetune)):
        if note:
            log(note)
    out = check_output_dir(Path(out))
    env = environment()  # now, not at the end: the checkout may change while a long run goes on
    data = prepare_data(cfg)
    # loaded before anything is written, so a bad checkpoint leaves no output folder behind
    dense_model = load_dense_checkpoint(dense_checkpoint, data, cfg.model.name) if dense_checkpoint else None
    check_prunable(dense_model if dense_model is not None else new_model(cfg, data, log=lambda _: None), cfg.prune)
    check_latency_settings(cfg.prune, device)
    check_targets(cfg.deploy)  # a runtime or precision this machine lacks is said before any work
    check_deploy_data(cfg.deploy, len(data.train))
    with FolderLock(out) if world.main else contextlib.nullcontext() as lock:  # one run per folder
        if lock is not None and lock.replaced_stale:
            log(f"output folder: replaced the lock of a process that is gone ({lock.replaced_stale})")
        if world.main:
            prepare_out_dir(out, cfg, resume, overwrite)
        barrier(world)
        _log_setting(data, device, log, cfg.prune.nm_rule)
        job = Job(cfg, data, device, out, log, progress and world.main, dense_checkpoint, dense_model, world=world)
        result = job.results(env, include_nm_only)
        job.write_record(out / "results.json", result)
    return result


def check_latency_settings(cfg: PruneConfig, device: torch.device) -> None:
    """Before any file is written: the latency runtime and dtype can run on `device`, a given table is this
    device's (a run that needs no table checks nothing)."""
    if cfg.target_latency is None and cfg.nm_rule != "auto":
        return
    resolve_settings(cfg.latency_runtime, cfg.latency_batch, cfg.latency_dtype, device, cfg.latency_step)
    if cfg.latency_table:
        load_table(cfg.latency_table, device_name(device))


def _log_setting(data: Dataset, device: torch.device, log: Log, nm_rule: str = "all") -> None:
    """What the run works on, said before the long work starts."""
    t = data.train
    log(
        f"data: {data.name}, {len(t)} train / {len(data.test)} test images, "
        f"{t.channels}x{t.image_size}x{t.image_size}, {t.num_classes} classes"
    )
    if data.note:
        log(f"data: {data.note}")
    if device.type == "cpu":  # N:M layers are spoken of only where the run may make some
        masked = "; N:M layers run as dense masked layers" if nm_rule == "all" else ""
        log(f"device: cpu - filter pruning is the only speedup here{masked}")


def _silent(message: str) -> None:
    """The log of ranks other than 0: they compute what rank 0 reports."""
