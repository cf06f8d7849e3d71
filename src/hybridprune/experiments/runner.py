"""Executing grid points: one dense baseline, one 2:4-only model or one pruning run per call, and the worker
pool that runs them (inline, worker processes, or Ray tasks), a phase at a time.

A worker takes plain data and returns plain data (a config dict in, a store row out), so a process and a Ray
task run it alike; only the driver writes the rows (`run_phase` hands each to `write` as it arrives). Each
worker trains in the artifacts folder beside the store: a baseline once per `baseline_key`, reused by every
run that prunes it.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from hybridprune.config import DataConfig, RunConfig
from hybridprune.data.images import Dataset
from hybridprune.errors import HybridPruneError
from hybridprune.experiments.inputs import prepare_data_config
from hybridprune.experiments.job import Job
from hybridprune.experiments.store import COUNT_COLUMNS, STAGE_ACCURACIES, STAGES, baseline_key, nm_only_key, run_key
from hybridprune.provenance import environment
from hybridprune.training.loop import calibration_data

Submit = Callable[..., Future]  # submit(fn, *args) -> the future of fn(*args)
Row = dict[str, Any]


# --- one grid point -------------------------------------------------------------------------------------


def execute_baseline(
    cfg_dict: dict[str, Any], experiment: str, artifacts: str, device: str = "cpu", threads: int | None = None
) -> None:
    """Train (or find) the dense baseline of one grid point, and nothing else: the pruning runs come after,
    each timed on its own."""
    cfg = _start(cfg_dict, threads)
    base = _job(cfg, _cached_data(cfg.data, cfg.seed), device, _baseline_dir(artifacts, cfg))
    base.out.mkdir(parents=True, exist_ok=True)
    base.dense()


def execute_nm_only(
    cfg_dict: dict[str, Any], experiment: str, artifacts: str, device: str = "cpu", threads: int | None = None
) -> Row:
    """The 2:4-only model of one baseline (dense width, N:M masks, fine-tuned) and its store row."""
    cfg = _start(cfg_dict, threads)
    start, data = time.time(), _cached_data(cfg.data, cfg.seed)
    dense, dense_result = _job(cfg, data, device, _baseline_dir(artifacts, cfg)).dense()
    job = _job(cfg, data, device, Path(artifacts) / f"nm-only-{nm_only_key(cfg)}")
    job.out.mkdir(parents=True, exist_ok=True)
    nm = job.nm_only(dense, asked=True)  # a grid's nm_only asks for it
    return {
        **_model_columns(nm_only_key(cfg), experiment, cfg),
        "seed": cfg.seed,
        "dense_accuracy": dense_result["accuracy"],
        "accuracy": nm["accuracy"],
        **{c: nm[c] for c in COUNT_COLUMNS},
        **_finished_columns(cfg, time.time() - start, {"dense": dense_result, "nm": nm, "dataset_name": data.name}),
    }


def execute_run(
    cfg_dict: dict[str, Any], experiment: str, artifacts: str, device: str = "cpu", threads: int | None = None
) -> Row:
    """Run one grid point end to end and return its store row. Plain-data in and out, so it runs in a
    worker process or as a Ray task alike."""
    cfg = _start(cfg_dict, threads)
    start, env = time.time(), environment()
    data = _cached_data(cfg.data, cfg.seed)
    base = _job(cfg, data, device, _baseline_dir(artifacts, cfg))
    base.out.mkdir(parents=True, exist_ok=True)
    dense, dense_result = base.dense()
    job = _job(cfg, data, device, Path(artifacts) / f"run-{run_key(cfg)}")
    job.out.mkdir(parents=True, exist_ok=True)
    job.teacher = dense if cfg.finetune.distill_weight > 0 else None
    images, labels = calibration_data(data.train, cfg.prune.calib_batches, cfg.prune.calib_batch_size, cfg.seed)
    result = job.filter_then_nm(dense, cfg.prune.metric, images, labels)
    if cfg.deploy.targets:  # this run's models and its dense baseline, deployed and measured
        whole = {"config": cfg.to_dict(), "dense": dense_result, "results": [{"metric": cfg.prune.metric, **result}]}
        result = {**result, "deployed": job.deployed(whole)}
    return run_row(cfg, experiment, data.name, dense_result, {**result, "environment": env}, time.time() - start)


def run_row(cfg: RunConfig, experiment: str, dataset: str, dense: dict, result: dict, wall: float) -> Row:
    """The store row of a finished pruning run (`result`: `Job.filter_then_nm`'s record) that took `wall` s."""
    final = result.get("hybrid", result["filter"])  # a run without a 2:4 step ends with its filter-pruned model
    stages = {f"{s}_{suffix}": result.get(s, final)[v] for s in STAGES for suffix, v in STAGE_ACCURACIES.items()}
    return {
        **_model_columns(run_key(cfg), experiment, cfg),
        "metric": cfg.prune.metric,
        "recipe": cfg.recipe,
        "ratio": _removed_fraction(result) if cfg.prune.target_latency is not None else cfg.prune.filter_ratio,
        "seed": cfg.seed,
        "dense_accuracy": dense["accuracy"],
        **stages,
        **{c: final[c] for c in COUNT_COLUMNS},  # the final model's
        **_finished_columns(cfg, wall, {"dense": dense, **result, "dataset_name": dataset}),
    }


def _removed_fraction(result: dict[str, Any]) -> float:
    """The fraction of all channels a latency-target run removed (its ratio column: the ratio it came to)."""
    groups = result["plan"]["groups"]
    return 1 - sum(len(g["keep"]) for g in groups) / max(1, sum(g["original"] for g in groups))


def _model_columns(key: str, experiment: str, cfg: RunConfig) -> Row:
    width = 1.0 if cfg.model.width is None else cfg.model.width  # 1.0: the model's own widths
    return {"key": key, "experiment": experiment, "dataset": cfg.data.dataset, "model": cfg.model.name, "width": width}


def _finished_columns(cfg: RunConfig, wall: float, result: dict[str, Any]) -> Row:
    return {
        "wall_time_s": wall,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "config": json.dumps(cfg.to_dict()),
        "result": json.dumps(result),
    }


def _start(cfg_dict: dict[str, Any], threads: int | None) -> RunConfig:
    if threads:
        torch.set_num_threads(threads)
    return RunConfig.from_dict(cfg_dict)


@lru_cache(maxsize=4)
def _cached_data(data: DataConfig, seed: int) -> Dataset:
    """A worker keeps the last few datasets: the runs of one setup come to it one after another."""
    return prepare_data_config(data, seed)


def _job(cfg: RunConfig, data: Dataset, device: str, out: Path) -> Job:
    return Job(cfg, data, torch.device(device), out, log=lambda _: None, progress=False)


def _baseline_dir(artifacts: str, cfg: RunConfig) -> Path:
    return Path(artifacts) / f"baseline-{baseline_key(cfg)}"


# --- running a phase of many ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Where a grid's runs go: its name and artifacts folder, the devices (one per run, round-robin) and the
    CPU threads each run may use."""

    experiment: str
    artifacts: str
    devices: tuple[str, ...]
    threads: int | None

    @classmethod
    def on(cls, experiment: str, artifacts: Path, device: str, workers: int) -> Placement:
        """Runs on `device` (`cuda`: every GPU, round-robin), with the CPU threads shared by `workers`."""
        threads = max(1, (os.cpu_count() or 1) // workers) if device == "cpu" else None
        gpus = torch.cuda.device_count() if device == "cuda" else 0
        devices = tuple(f"cuda:{i}" for i in range(gpus)) if gpus > 1 else (device,)
        return cls(experiment, str(artifacts), devices, threads)


def run_phase(
    submit: Submit,
    fn: Callable[..., Any],
    cfgs: list[dict[str, Any]],
    write: Callable[[Row], None] | None,
    *,
    where: Placement,
    desc: str,
    progress: bool,
    limit: int,
) -> int:
    """Run `fn` on every config, up to `limit` at a time, and `write` each row as soon as its run finishes;
    returns how many finished. A failed run is reported and left for the next invocation."""
    todo, in_flight = iter(enumerate(cfgs)), {}
    bar = tqdm(total=len(cfgs), desc=desc, unit="run", disable=not progress, dynamic_ncols=True)
    done = 0
    try:
        _top_up(submit, fn, todo, in_flight, where, limit)
        while in_flight:
            finished, _ = wait(list(in_flight), return_when=FIRST_COMPLETED)
            for fut in finished:
                in_flight.pop(fut)
                ok, row = _outcome(fut)
                if not ok:
                    continue
                if write is not None:
                    write(row)
                done += 1
                bar.update(1)
            _top_up(submit, fn, todo, in_flight, where, limit)
            bar.set_postfix(running=len(in_flight), waiting=len(cfgs) - bar.n - len(in_flight))
    finally:
        for fut in in_flight:
            fut.cancel()
        bar.close()
    return done


def _top_up(
    submit: Submit,
    fn: Callable[..., Any],
    todo: Iterator[tuple[int, dict[str, Any]]],
    in_flight: dict[Future, dict[str, Any]],
    where: Placement,
    limit: int,
) -> None:
    while len(in_flight) < limit and (item := next(todo, None)) is not None:
        i, cfg = item
        device = where.devices[i % len(where.devices)]  # one GPU per run, round-robin over the GPUs
        in_flight[submit(fn, cfg, where.experiment, where.artifacts, device, where.threads)] = cfg


def _outcome(fut: Future) -> tuple[bool, Any]:
    """(True, its row) for a finished run; (False, None) for a failed one, reported: one broken run must not
    lose the others. Bad input (HybridPruneError) stops the grid: every other run would fail the same way."""
    try:
        return True, fut.result()
    except HybridPruneError:
        raise
    except Exception as e:
        tqdm.write(f"run failed: {type(e).__name__}: {e}")
        return False, None


class WorkerPool:
    """Where grid runs execute: inline (one worker), in worker processes, or as Ray tasks. A context manager
    whose value is `submit(fn, *args) -> Future`."""

    def __init__(self, backend: str, workers: int) -> None:
        if backend not in ("process", "ray"):
            raise HybridPruneError(f"unknown backend {backend!r}; valid: process, ray")
        if workers < 1:
            raise HybridPruneError(f"--workers must be at least 1, got {workers}")
        self.backend, self.workers = backend, workers
        self.pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> Submit:
        if self.backend == "ray":
            return _ray_submit(self.workers)
        if self.workers == 1:
            return _inline_submit
        # spawn, not fork: a forked child of a process that already ran torch's thread pools can deadlock
        self.pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        return self.pool.submit

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=exc[0] is None, cancel_futures=True)


def _inline_submit(fn: Callable, *args: Any) -> Future:
    """Run now, in this process; a Ctrl-C (BaseException) propagates at once."""
    fut: Future = Future()
    try:
        fut.set_result(fn(*args))
    except Exception as e:  # noqa: BLE001 - handed to the caller through the future
        fut.set_exception(e)
    return fut


def _ray_submit(workers: int) -> Submit:
    """Each run a Ray task returning its row to the driver; connects to a running cluster or starts a local one."""
    try:
        import ray  # optional: only the ray backend needs it
    except ImportError:
        raise HybridPruneError("the ray backend needs Ray: pip install 'hybridprune[ray]'") from None
    if not ray.is_initialized():
        ray.init(
            address=os.environ.get("RAY_ADDRESS"),
            num_cpus=None if os.environ.get("RAY_ADDRESS") else workers,
            include_dashboard=False,
            log_to_driver=False,
        )
    remotes = {fn: ray.remote(num_cpus=1)(fn) for fn in (execute_baseline, execute_nm_only, execute_run)}
    return lambda fn, *args: remotes[fn].remote(*args).future()
