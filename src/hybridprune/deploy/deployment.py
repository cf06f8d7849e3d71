"""The deployed forms of a set of trained models: each model (a job's dense, 2:4-only, filter and filter+2:4
variants) quantized or converted for each deploy target, its top-1 measured on the test split **in the runtime
that runs it**, and every form timed in one round-robin together with the dense model in ONNX Runtime fp32
(the baseline every speedup is a ratio to, measured in the same rounds, so a machine that slows down for a while
slows every form alike).

A target is `RUNTIME:PRECISION`, a bare precision or `auto`. A bare precision is a measured choice: the dense model
is deployed in every installed runtime that runs the precision here, those forms are timed round-robin, and the
fastest runtime deploys every variant (the choice and the times that made it are recorded). `auto` chooses the
precision too: the dense model in every runtime and precision installed here, those that lose more than
`max_drop` (default 1) top-1 points against PyTorch left out, the fastest of the rest. INT8 forms are made
by `quantize` (calibrated on training images, activation format measured in the runtime, 2:4 zeros checked).

Each finished form is written to the deploy folder with its record before the next starts, so an interrupted
job redoes only the form in progress.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from hybridprune.config import DeployConfig, NMPattern, QuantizeConfig
from hybridprune.data.batching import batches
from hybridprune.data.images import Dataset
from hybridprune.deploy.accuracy import Split, evaluate_session
from hybridprune.deploy.export import export_onnx
from hybridprune.deploy.quantize import quantize
from hybridprune.deploy.runtimes import (
    RUNTIMES,
    available_pairs,
    device_name,
    get_runtime,
    interleaved_times,
    load_onnx,
    quantiles,
    runtime_versions,
)
from hybridprune.deploy.runtimes.base import Session
from hybridprune.deploy.timing import busy_note
from hybridprune.errors import HybridPruneError
from hybridprune.hardware import cpu_isa
from hybridprune.outputs import write_json
from hybridprune.parse import read_json

Pair = tuple[str, str]  # (runtime, precision)
BASELINE: Pair = ("onnxruntime", "fp32")  # what every speedup is a ratio to (dense, when installed)


@dataclass
class Variant:
    """A trained model to deploy: its name in the job's table, the model, its 2:4 masks, its PyTorch top-1."""

    name: str
    model: nn.Module
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    trained_top1: float | None = None

    @property
    def slug(self) -> str:
        return "".join(c if c.isalnum() or c in "-_." else "-" for c in self.name)


def target_pairs(target: str, device: torch.device | str = "cpu") -> list[Pair]:
    """The (runtime, precision) pairs a deploy target may mean here: RUNTIME:PRECISION itself (checked to run
    here), or every installed runtime that runs the bare precision (one line naming what is missing if none).

    Example:
        >>> target_pairs("onnxruntime:fp32")
        [('onnxruntime', 'fp32')]
        >>> ("onnxruntime", "fp32") in target_pairs("fp32")
        True
    """
    if target == "auto":
        return available_pairs(device)
    runtime, _, precision = target.rpartition(":")
    if runtime:
        get_runtime(runtime).check(precision, device)
        return [(runtime, precision)]
    pairs = [(name, p) for name, p in available_pairs(device) if p == precision]
    if not pairs:
        reasons = "; ".join(
            reason for name in RUNTIMES if (reason := get_runtime(name).unsupported(precision, device)) is not None
        )
        raise HybridPruneError(f"--deploy {precision}: no runtime here runs it ({reasons})")
    return pairs


def check_targets(cfg: DeployConfig) -> dict[str, list[Pair]]:
    """Every target's candidate pairs on this machine's CPU, checked before any work (one line for a target that
    cannot run here). Deployed forms run on the CPU whatever device trained the models: the GPU runtime
    (TensorRT) has not run yet, so it is not offered here.

    Example:
        >>> check_targets(DeployConfig(targets=("torch:fp16",)))
        Traceback (most recent call last):
        ...
        hybridprune.errors.HybridPruneError: torch runs fp32, bf16 on cpu, not fp16
    """
    return {target: target_pairs(target, "cpu") for target in cfg.targets}


def check_deploy_data(cfg: DeployConfig, train_images: int) -> None:
    """Before any training: the training split holds the images INT8 forms calibrate (and validate) on.

    Example:
        >>> check_deploy_data(DeployConfig(targets=("int8",), calibration_images=300), 200)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        hybridprune.errors.HybridPruneError: --deploy int8 calibrates on 300 training images ... give at most 200
    """
    if not any(t == "auto" or t.endswith("int8") for t in cfg.targets):
        return
    needs = {"--calibration-images": cfg.calibration_images}
    if cfg.max_drop is not None:
        needs["--validation-images"] = cfg.validation_images
    for flag, count in needs.items():
        if count > train_images:
            what = "calibrates" if flag == "--calibration-images" else "validates precision per layer"
            raise HybridPruneError(f"--deploy int8 {what} on {count} training images ({flag}) but the training split "
                                   f"has {train_images}; give at most {train_images}")  # fmt: skip


def deploy_variants(
    variants: Sequence[Variant],
    data: Dataset,
    cfg: DeployConfig,
    folder: str | Path,
    *,
    pattern: NMPattern = NMPattern(),
    seed: int = 0,
    threads: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Deploy every variant (the first is the dense model) at every target of `cfg` into `folder`; returns the
    record: each form's top-1 in its runtime, its latency at each of `cfg.batch_sizes` and speedup over the dense
    model in ONNX Runtime fp32, the measured runtime choices, versions and the CPU's instruction sets.

    Example:
        >>> import tempfile
        >>> from hybridprune.data.datasets import load_dataset
        >>> from hybridprune.models.sources import build_model
        >>> data = load_dataset("digits")
        >>> data = Dataset(data.name, data.train, data.test.subset(64, 0), data.hflip)
        >>> dense = Variant("dense", build_model("alexnet", in_channels=1, width=0.125))
        >>> cfg = DeployConfig(targets=("onnxruntime:fp32",), batch_sizes=(8,), rounds=2)
        >>> record = deploy_variants([dense], data, cfg, tempfile.mkdtemp(), progress=False, log=lambda _: None)
        >>> [(f["variant"], f["runtime"], f["precision"]) for f in record["forms"]]
        [('dense', 'onnxruntime', 'fp32')]
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    candidates = check_targets(cfg)
    threads = threads or torch.get_num_threads()
    builder = _FormBuilder(data, cfg, folder, pattern, seed, threads, progress)
    busy = busy_note(threads)
    if busy:  # a runtime's thread pool suffers most from it: one seed here measured OpenVINO 10x slower than alone
        log(f"note: {busy}")
    choices = _choices(candidates, variants[0], builder, log)
    pairs = list(dict.fromkeys(tuple(c["pair"]) for c in choices))
    bar = tqdm([(v, pair) for v in variants for pair in pairs], desc="deploy", unit="form",
               disable=None if progress else True, leave=False)  # fmt: skip
    built = [(v, pair, builder.record(v, pair)) for v, pair in bar]
    for _, _, record in built:
        if "error" in record:  # said, kept in the record, left out of the timing: the other forms still count
            log(f"deploy: {record['variant']} in {record['runtime']} {record['precision']} failed: {record['error']}")
    timed = [(v, pair, record) for v, pair, record in built if "error" not in record]
    records = [record for _, _, record in timed]
    baseline = BASELINE if get_runtime(BASELINE[0]).available("cpu") else ("torch", "fp32")
    base_ms = {}
    for batch in cfg.batch_sizes:
        forms = [(v, pair) for v, pair, _ in timed] + [(variants[0], baseline)]
        times = _time_forms(forms, builder, timing_batch(data.test, batch), cfg.rounds)
        base_ms[str(batch)] = quantiles(times[-1])[0]
        for record, t in zip(records, times, strict=False):
            median, p10, p90 = quantiles(t)
            record.setdefault("latency", {})[str(batch)] = {"median_ms": median, "p10_ms": p10, "p90_ms": p90,
                                                            "speedup": base_ms[str(batch)] / median}  # fmt: skip
    return {
        "batch_sizes": list(cfg.batch_sizes),
        "rounds": cfg.rounds,
        "threads": threads,
        "busy": busy,
        "timing_input": "the first test images, as many as the batch",
        "baseline": {"variant": variants[0].name, "runtime": baseline[0], "precision": baseline[1],
                     "latency_ms": base_ms},  # fmt: skip
        "choices": [{k: v for k, v in c.items() if k != "pair"} for c in choices],
        "forms": records,
        "failed": [record for _, _, record in built if "error" in record],
        "calibration": {"images": cfg.calibration_images, "method": cfg.calibration_method, "seed": seed},
        "versions": runtime_versions(*{p[0] for p in [*pairs, baseline]}),
        "cpu": {"name": device_name(torch.device("cpu")), **cpu_isa()},
    }


def timing_batch(split: Split, batch_size: int) -> torch.Tensor:
    """`batch_size` test images (the first ones, repeated when the split is smaller): what every form is timed on."""
    x = next(iter(batches(split, min(batch_size, len(split)))))[0]
    return x.repeat(-(-batch_size // len(x)), 1, 1, 1)[:batch_size].contiguous()


def _choices(candidates: dict[str, list[Pair]], dense: Variant, builder: _FormBuilder, log: Callable) -> list[dict]:
    """Each target's pair, measured once and kept in the deploy folder (a resumed job deploys what it chose)."""
    cfg = builder.cfg
    key = {"targets": list(candidates), "batch": cfg.batch_sizes[0], "auto_tolerance": cfg.auto_tolerance}
    path = builder.folder / "choices.json"
    if path.is_file() and (kept := read_json(path)).get("key") == key:
        return kept["choices"]
    x = timing_batch(builder.data.test, cfg.batch_sizes[0])
    choices = [_choose(t, pairs, dense, builder, x, cfg.rounds, log) for t, pairs in candidates.items()]
    write_json(path, {"key": key, "choices": choices}, record=True)
    return choices


def _choose(
    target: str, pairs: list[Pair], dense: Variant, builder: _FormBuilder, x: torch.Tensor, rounds: int, log: Callable
) -> dict[str, Any]:
    """The pair a target deploys with: the one given, or the runtime whose form of the dense model measured
    fastest (each candidate built, accuracy measured, all timed round-robin), said in one line. A candidate that
    could not be made is left out, and so (`auto`) is one that loses more than the tolerance; when every candidate
    loses more, the most accurate is taken, and said."""
    if len(pairs) == 1:
        return {"target": target, "pair": pairs[0], "runtime": pairs[0][0], "precision": pairs[0][1], "by": "given"}
    name = (lambda p: f"{p[0]}:{p[1]}") if target == "auto" else (lambda p: p[0])
    records = {pair: builder.record(dense, pair) for pair in pairs}
    failed = {name(p): r["error"] for p, r in records.items() if "error" in r}
    pairs = [p for p in pairs if "error" not in records[p]]
    if not pairs:
        raise HybridPruneError(f"--deploy {target}: no candidate could be made: " + "; ".join(
            f"{n}: {e}" for n, e in failed.items()))  # fmt: skip
    excluded, tolerance = [], builder.cfg.auto_tolerance
    if target == "auto" and dense.trained_top1 is not None:  # the fastest of the forms that keep the accuracy
        excluded = [p for p in pairs if records[p]["top1"] < dense.trained_top1 - tolerance]
        if len(excluded) == len(pairs):
            best = max(pairs, key=lambda p: records[p]["top1"])
            log(f"deploy auto: every runtime and precision loses more than {tolerance:g} points; the most accurate, "
                f"{name(best)} ({records[best]['top1']:.2f}%), is taken")  # fmt: skip
            return {"target": target, "pair": best, "runtime": best[0], "precision": best[1],
                    "by": "most accurate (all lose more than the tolerance)", "failed": failed}  # fmt: skip
        pairs = [p for p in pairs if p not in excluded]
    medians = [quantiles(t)[0] for t in _time_forms([(dense, p) for p in pairs], builder, x, rounds)]
    best = min(range(len(pairs)), key=medians.__getitem__)
    measured = {name(p): round(m, 4) for p, m in zip(pairs, medians, strict=True)}
    others = ", ".join(f"{n} {m:.3f} ms" for n, m in measured.items() if n != name(pairs[best]))
    lost = f"; losing over {tolerance:g} points of top-1: {', '.join(map(name, excluded))}" if excluded else ""
    lost += f"; could not be made: {', '.join(failed)}" if failed else ""
    log(f"deploy {target}: {name(pairs[best])} (dense model {medians[best]:.3f} ms at batch {len(x)}; {others}{lost})")
    extra = {"accuracy_excluded": list(map(name, excluded))} if excluded else {}
    return {"target": target, "pair": pairs[best], "runtime": pairs[best][0], "precision": pairs[best][1],
            "by": "measured", "median_ms": measured, **extra, **({"failed": failed} if failed else {})}  # fmt: skip


def _time_forms(forms: list[tuple[Variant, Pair]], builder: _FormBuilder, x: torch.Tensor, rounds: int) -> list:
    """Milliseconds of every form on `x`, round-robin (one session at a time is built; all then run in turn)."""
    calls = [builder.session(v, pair, x).bound(x) for v, pair in forms]
    return interleaved_times(calls, rounds, torch.device("cpu"), warmup=2)


@dataclass
class _FormBuilder:
    """Makes (or finds, after an interruption) each form's file and accuracy record in the deploy folder."""

    data: Dataset
    cfg: DeployConfig
    folder: Path
    pattern: NMPattern
    seed: int
    threads: int
    progress: bool

    def settings(self, precision: str) -> dict[str, Any]:
        """What a form of `precision` depends on beyond its model: a kept record is reused only with the same."""
        d = self.cfg
        if precision != "int8":
            return {}
        return {"calibration_images": d.calibration_images, "calibration_method": d.calibration_method,
                "max_drop": d.max_drop, "validation_images": d.validation_images, "seed": self.seed}  # fmt: skip

    def record(self, variant: Variant, pair: Pair) -> dict[str, Any]:
        """The form's record (file, top-1 in its runtime, what quantization measured, or the one line saying why
        it could not be made), made once and kept."""
        runtime, precision = pair
        path = self.folder / f"{variant.slug}-{runtime}-{precision}.json"
        settings = self.settings(precision)
        if path.is_file():
            record = read_json(path)
            same = record.get("settings", {}) == settings
            if same and (not record.get("file") or (self.folder / Path(record["file"]).name).is_file()):
                return {**record, "file": record.get("file") and str(self.folder / Path(record["file"]).name)}
        try:
            made = self._make(variant, pair)
        except HybridPruneError as e:
            made = {"error": str(e)}
        record = {"variant": variant.name, "runtime": runtime, "precision": precision,
                  "trained_top1": variant.trained_top1, **made, "settings": settings}  # fmt: skip
        write_json(path, record, record=True)
        return record

    def _make(self, variant: Variant, pair: Pair) -> dict[str, Any]:
        runtime, precision = pair
        if precision == "int8":
            return self._quantized(variant, runtime)
        session = self.session(variant, pair, None)
        accuracy = evaluate_session(session, self.data.test, 256, progress=self.progress, desc=f"{runtime} {precision}")
        file = None if not get_runtime(runtime).reads_onnx else str(self._float_file(variant))
        return {"top1": accuracy.top1, "test_images": accuracy.images, "file": file}

    def _quantized(self, variant: Variant, runtime: str) -> dict[str, Any]:
        out = self.folder / f"{variant.slug}-{runtime}-int8.onnx"
        d = self.cfg
        qcfg = QuantizeConfig(calibration_images=d.calibration_images, calibration_method=d.calibration_method,
                              runtime=runtime, rounds=d.rounds, max_drop=d.max_drop,
                              validation_images=d.validation_images)  # fmt: skip
        report = quantize(variant.model, self.data.train, self.data.test, out, qcfg, masks=variant.masks,
                          pattern=self.pattern, seed=self.seed, threads=self.threads, progress=self.progress,
                          data_name=self.data.name, record=True)  # fmt: skip
        return {"top1": report.int8_top1, "test_images": report.test_images, "file": str(out), "format": report.format,
                "fp32_top1_in_runtime": report.fp32_top1, "max_logit_diff": report.max_logit_diff,
                "zeros_lost": report.weights["zeros_lost"],
                "float_layers": (report.mixed_precision or {}).get("float_nodes", [])}  # fmt: skip

    def _float_file(self, variant: Variant) -> Path:
        """The variant's exported graph (BatchNorm folded, dynamic batch), shared by its float forms."""
        path = self.folder / f"{variant.slug}.onnx"
        if not path.is_file():
            split = self.data.test
            example = torch.zeros(1, split.channels, split.image_size, split.image_size)
            export_onnx(variant.model, path, example_inputs=example, record=True)
        return path

    def session(self, variant: Variant, pair: Pair, x: torch.Tensor | None) -> Session:
        """A session of the variant's form (its int8 file from `record`, its float graph, or the module)."""
        runtime, precision = pair
        rt = get_runtime(runtime)
        if precision == "int8":
            return load_onnx(self.record(variant, pair)["file"], runtime, "int8", self.threads)[0]
        if rt.reads_onnx:
            return rt.load(self._float_file(variant), precision, self.threads)
        split = self.data.test
        example = torch.zeros(1, split.channels, split.image_size, split.image_size) if x is None else x
        return rt.session_of(variant.model.cpu().eval(), example, precision, self.threads)
