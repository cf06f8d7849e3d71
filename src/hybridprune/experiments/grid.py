"""Grid experiments: datasets x models x metrics x filter ratios x seeds, with a resumable SQLite store.

One dense baseline is trained per (dataset, model, seed, training config) and reused by every run that
needs it. A run's row is written in one transaction when the run finishes, so an interrupted grid
loses at most the runs in progress; rerunning the command skips finished runs. Checkpoints of
baselines and of pruned models sit beside the store (STORE.artifacts/), so a resumed grid retrains
nothing that finished. Workers (processes, or Ray tasks) compute rows; only the driver writes them.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import product
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from hybridprune.config import (
    DEFAULT_FINETUNE,
    DEFAULT_METRICS,
    RECIPES,
    DataConfig,
    ModelConfig,
    PruneConfig,
    RunConfig,
    TrainConfig,
    check_recipe,
)
from hybridprune.errors import HybridPruneError
from hybridprune.pruning.metrics import METRICS
from hybridprune.pruning.plan import validate_ratio

STORE_VERSION = 2  # 2 added the recipe column; a version-1 store is upgraded in place (its runs: plain)
GRID_KEYS = {
    "name",
    "datasets",
    "models",
    "metrics",
    "ratios",
    "seeds",
    "train",
    "finetune",
    "prune",
    "filter_finetune",
    "recipes",
    "nm_only",
    "description",
}
DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


# --- the grid ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Grid:
    """A parsed experiment config: the axes of the grid and the shared training settings."""

    name: str
    datasets: tuple[DataConfig, ...]
    models: tuple[ModelConfig, ...]
    metrics: tuple[str, ...]
    ratios: tuple[float, ...]
    seeds: tuple[int, ...]
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=2, lr=0.01, warmup=0.0))
    prune: dict[str, Any] = field(default_factory=dict)
    filter_finetune: bool = True
    # recovery recipes (name -> overrides, see config.RECIPES), one more axis of the grid
    recipes: tuple[tuple[str, dict[str, Any]], ...] = (("plain", {}),)
    nm_only: bool = True  # also the 2:4-only model of every baseline (plain fine-tuning), for the frontier plot

    def runs(self) -> list[RunConfig]:
        """Every grid point as a one-metric RunConfig."""
        return [
            self._run(d, m, metric, ratio, seed).with_recipe(name, recipe)
            for d, m, seed, (name, recipe), ratio, metric in product(
                self.datasets, self.models, self.seeds, self.recipes, self.ratios, self.metrics
            )
        ]

    def nm_only_runs(self) -> list[RunConfig]:
        """One 2:4-only run per dense baseline, with the grid's own (plain) fine-tuning."""
        if not self.nm_only:
            return []
        return [
            self._run(d, m, self.metrics[0], self.ratios[0], seed)
            for d, m, seed in product(self.datasets, self.models, self.seeds)
        ]

    def _run(self, data: DataConfig, model: ModelConfig, metric: str, ratio: float, seed: int) -> RunConfig:
        prune = PruneConfig(**{**self.prune, "metric": metric, "filter_ratio": ratio})
        return RunConfig(
            data=data,
            model=model,
            train=self.train,
            finetune=self.finetune,
            prune=prune,
            metrics=(metric,),
            seed=seed,
            filter_finetune=self.filter_finetune,
        )


def load_grid(path: str | Path) -> Grid:
    """Parse and validate an experiment YAML; unknown keys and invalid values fail naming them."""
    path = Path(path)
    if not path.is_file():
        raise HybridPruneError(f"experiment config {path} not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise HybridPruneError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise HybridPruneError(f"{path} must hold a mapping of keys such as datasets, metrics, ratios")
    unknown = sorted(set(raw) - GRID_KEYS)
    if unknown:
        raise HybridPruneError(f"{path}: unknown key {', '.join(unknown)}; valid keys: {', '.join(sorted(GRID_KEYS))}")
    return grid_from_dict(raw, default_name=path.stem)


def grid_from_dict(raw: dict[str, Any], default_name: str = "experiment") -> Grid:
    datasets = tuple(DataConfig.from_dict(_entry(d, "dataset")) for d in _items(raw, "datasets", ["digits"], object))
    models = tuple(ModelConfig.from_dict(_entry(m, "name")) for m in _items(raw, "models", ["alexnet"], object))
    metrics = tuple(_items(raw, "metrics", list(DEFAULT_METRICS), str))
    for m in metrics:
        METRICS.get(m)
    ratios = tuple(float(validate_ratio(r, "ratio")) for r in _items(raw, "ratios", list(DEFAULT_RATIOS), float))
    seeds = tuple(_items(raw, "seeds", [0], int))
    if any(not (0 <= s < 2**32) for s in seeds):
        raise HybridPruneError(f"seeds must be integers in [0, 2^32), got {list(seeds)}")
    prune = _mapping(raw, "prune")
    bad = sorted(set(prune) & {"metric", "filter_ratio"})
    if bad:
        raise HybridPruneError(f"prune.{bad[0]} is set by the grid axes (metrics, ratios), not under prune")
    PruneConfig(**prune)  # validates the keys and values now, not in a worker later
    finetune = {**DEFAULT_FINETUNE.to_dict(), **_mapping(raw, "finetune")}
    if not (datasets and models and metrics and ratios and seeds):
        raise HybridPruneError("datasets, models, metrics, ratios and seeds must each be non-empty")
    return Grid(
        _name(raw, default_name),
        datasets,
        models,
        metrics,
        ratios,
        seeds,
        TrainConfig.from_dict(_mapping(raw, "train")),
        TrainConfig.from_dict(finetune),
        prune,
        _flag(raw, "filter_finetune", True),
        _recipes(raw),
        _flag(raw, "nm_only", True),
    )


def _recipes(raw: dict[str, Any]) -> tuple[tuple[str, dict[str, Any]], ...]:
    """The recipes axis: a list of named recipes (config.RECIPES), or a mapping of names to overrides."""
    value = raw.get("recipes", ["plain"])
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        value = {name: RECIPES.get(name) for name in value}
    if not isinstance(value, dict) or not value:
        raise HybridPruneError(
            f"recipes must be a non-empty list of names ({', '.join(RECIPES)}) or a mapping of names to "
            f"prune/finetune settings, got {value!r}"
        )
    # a named recipe given without settings (`distill:` or `distill: {}`) means its settings in RECIPES
    return tuple((name, check_recipe(name, recipe or RECIPES.get(name, recipe))) for name, recipe in value.items())


def _items(raw: dict[str, Any], key: str, default: list, kind: type) -> list:
    """A grid axis: a non-empty list of values of one kind (ints count as floats; bools as neither)."""
    values = raw.get(key, default)
    kinds = (int, float) if kind is float else (kind,)
    if not isinstance(values, list) or not values:
        raise HybridPruneError(f"{key} must be a non-empty list, got {values!r}")
    bad = [v for v in values if not isinstance(v, kinds) or isinstance(v, bool)]
    if bad or (kind is float and not all(math.isfinite(v) for v in values)):
        raise HybridPruneError(f"{key} must hold {kind.__name__} values only, got {(bad or values)[0]!r}")
    return values


def _name(raw: dict[str, Any], default: str) -> str:
    """The grid's name, which names its store file: a plain word."""
    name = raw.get("name", default)
    if not isinstance(name, str) or not name.strip() or "/" in name or "\0" in name:
        raise HybridPruneError(f"name must be a non-empty word (it names runs/NAME.sqlite), got {name!r}")
    return name


def _flag(raw: dict[str, Any], key: str, default: bool) -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise HybridPruneError(f"{key} must be true or false, got {value!r}")
    return value


def _entry(value: Any, key: str) -> dict[str, Any]:
    """A dataset or model entry: a name, or a mapping of its settings."""
    if isinstance(value, str):
        return {key: value}
    if not isinstance(value, dict):
        raise HybridPruneError(f"a {key} entry must be a name or a mapping, got {value!r}")
    return value


def _mapping(raw: dict[str, Any], key: str) -> dict[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise HybridPruneError(f"{key} must be a mapping of settings, got {value!r}")
    return dict(value)


def config_key(obj: Any) -> str:
    """A stable 16-hex-digit key of any JSON-able configuration."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_key(cfg: RunConfig) -> str:
    return config_key(cfg.to_dict())


def baseline_key(cfg: RunConfig) -> str:
    d = cfg.to_dict()
    return config_key({"data": d["data"], "model": d["model"], "train": d["train"], "seed": d["seed"]})


def nm_only_key(cfg: RunConfig) -> str:
    """The 2:4-only model depends on the baseline, the fine-tuning and the N:M settings, not on the metric."""
    p = cfg.prune
    nm = {"nm": p.nm, "permute": p.permute, "bn": p.bn_recalib_batches, "batch": p.calib_batch_size}
    return config_key({"baseline": baseline_key(cfg), "finetune": cfg.finetune.to_dict(), "prune": nm})


# --- the store ----------------------------------------------------------------------------------------

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    key TEXT PRIMARY KEY, experiment TEXT NOT NULL, dataset TEXT NOT NULL, model TEXT NOT NULL,
    width REAL NOT NULL, metric TEXT NOT NULL, recipe TEXT NOT NULL DEFAULT 'plain', ratio REAL NOT NULL,
    seed INTEGER NOT NULL,
    dense_accuracy REAL, filter_oneshot_raw REAL, filter_oneshot REAL, filter_accuracy REAL,
    hybrid_oneshot_raw REAL, hybrid_oneshot REAL, hybrid_accuracy REAL,
    params INTEGER, nonzero_params INTEGER, macs INTEGER, effective_macs INTEGER,
    wall_time_s REAL, finished_at TEXT NOT NULL, config TEXT NOT NULL, result TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS nm_only (
    key TEXT PRIMARY KEY, experiment TEXT NOT NULL, dataset TEXT NOT NULL, model TEXT NOT NULL,
    width REAL NOT NULL, seed INTEGER NOT NULL, dense_accuracy REAL, accuracy REAL,
    params INTEGER, nonzero_params INTEGER, macs INTEGER, effective_macs INTEGER,
    wall_time_s REAL, finished_at TEXT NOT NULL, config TEXT NOT NULL, result TEXT NOT NULL
);
"""
NM_ONLY_COLUMNS = (
    "key",
    "experiment",
    "dataset",
    "model",
    "width",
    "seed",
    "dense_accuracy",
    "accuracy",
    "params",
    "nonzero_params",
    "macs",
    "effective_macs",
    "wall_time_s",
    "finished_at",
    "config",
    "result",
)
ROW_COLUMNS = (
    "key",
    "experiment",
    "dataset",
    "model",
    "width",
    "metric",
    "recipe",
    "ratio",
    "seed",
    "dense_accuracy",
    "filter_oneshot_raw",
    "filter_oneshot",
    "filter_accuracy",
    "hybrid_oneshot_raw",
    "hybrid_oneshot",
    "hybrid_accuracy",
    "params",
    "nonzero_params",
    "macs",
    "effective_macs",
    "wall_time_s",
    "finished_at",
    "config",
    "result",
)


class Store:
    """The SQLite result store: one row per finished run, keyed by its configuration."""

    def __init__(self, path: str | Path, create: bool = True) -> None:
        self.path = Path(path)
        if not self.path.exists() and not create:
            raise HybridPruneError(f"store {self.path} not found")
        self._check_version()
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._connect() as db:
                db.executescript(SCHEMA)
                db.execute("INSERT OR IGNORE INTO meta VALUES ('version', ?)", (str(STORE_VERSION),))

    @property
    def artifacts(self) -> Path:
        return self.path.with_name(self.path.name + ".artifacts")

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=60)

    def _check_version(self) -> None:
        if not self.path.exists():
            return
        try:
            with self._connect() as db:
                row = db.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()
        except sqlite3.DatabaseError as e:
            raise HybridPruneError(f"{self.path} is not a hybridprune store ({e}); it was left untouched") from None
        if row is not None and row[0] == "1":
            self._upgrade_from_v1()
            return
        if row is None or row[0] != str(STORE_VERSION):
            found = row[0] if row else "none"
            raise HybridPruneError(
                f"{self.path} was written by store version {found}; this hybridprune reads "
                f"version {STORE_VERSION}; it was left untouched"
            )

    def _upgrade_from_v1(self) -> None:
        """Version 1 had no recipes: every run in it was plain fine-tuning. One transaction."""
        with self._connect() as db:
            db.execute("ALTER TABLE runs ADD COLUMN recipe TEXT NOT NULL DEFAULT 'plain'")
            db.execute("UPDATE meta SET value = ? WHERE key = 'version'", (str(STORE_VERSION),))
            db.executescript(SCHEMA)  # the tables version 1 lacked (every statement is IF NOT EXISTS)

    def finished_keys(self) -> set[str]:
        with self._connect() as db:
            return {k for (k,) in db.execute("SELECT key FROM runs")}

    def add(self, row: dict[str, Any], table: str = "runs") -> None:
        """Write one finished run in one transaction (a rerun of the same key replaces nothing)."""
        columns = ROW_COLUMNS if table == "runs" else NM_ONLY_COLUMNS
        with self._connect() as db:
            db.execute(
                f"INSERT OR IGNORE INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                [row[c] for c in columns],
            )

    def add_nm_only(self, row: dict[str, Any]) -> None:
        self.add(row, "nm_only")

    def finished_nm_only(self) -> set[str]:
        with self._connect() as db:
            return {k for (k,) in db.execute("SELECT key FROM nm_only")}

    def nm_only_rows(self) -> list[dict[str, Any]]:
        """The 2:4-only models of the baselines (tables of stores written before them: none)."""
        with self._connect() as db:
            db.row_factory = sqlite3.Row
            return [dict(r) for r in db.execute("SELECT * FROM nm_only ORDER BY dataset, model, seed")]

    def rows(self) -> list[dict[str, Any]]:
        with self._connect() as db:
            db.row_factory = sqlite3.Row
            return [
                dict(r) for r in db.execute("SELECT * FROM runs ORDER BY dataset, model, metric, recipe, ratio, seed")
            ]


# --- executing runs -----------------------------------------------------------------------------------


@lru_cache(maxsize=4)
def _cached_data(data: DataConfig, seed: int):
    from hybridprune.experiments.job import prepare_data_config

    return prepare_data_config(data, seed)


def execute_baseline(
    cfg_dict: dict[str, Any], experiment: str, artifacts: str, device: str = "cpu", threads: int | None = None
) -> None:
    """Train (or find) the dense baseline of one grid point, and nothing else: the pruning runs come after,
    each timed on its own."""
    from hybridprune.experiments.job import Job

    if threads:
        torch.set_num_threads(threads)
    cfg = RunConfig.from_dict(cfg_dict)
    data = _cached_data(cfg.data, cfg.seed)
    base = Job(cfg, data, torch.device(device), _baseline_dir(artifacts, cfg), log=lambda _: None, progress=False)
    base.out.mkdir(parents=True, exist_ok=True)
    base.dense()


def execute_nm_only(
    cfg_dict: dict[str, Any], experiment: str, artifacts: str, device: str = "cpu", threads: int | None = None
) -> dict[str, Any]:
    """The 2:4-only model of one baseline (dense width, N:M masks, fine-tuned) and its store row."""
    from hybridprune.experiments.job import Job

    if threads:
        torch.set_num_threads(threads)
    cfg = RunConfig.from_dict(cfg_dict)
    start, data, dev = time.time(), _cached_data(cfg.data, cfg.seed), torch.device(device)
    dense, dense_result = Job(cfg, data, dev, _baseline_dir(artifacts, cfg), log=lambda _: None, progress=False).dense()
    job = Job(cfg, data, dev, Path(artifacts) / f"nm-only-{nm_only_key(cfg)}", log=lambda _: None, progress=False)
    job.out.mkdir(parents=True, exist_ok=True)
    nm = job.nm_only(dense)
    return {
        "key": nm_only_key(cfg),
        "experiment": experiment,
        "dataset": cfg.data.dataset,
        "model": cfg.model.name,
        "width": 1.0 if cfg.model.width is None else cfg.model.width,
        "seed": cfg.seed,
        "dense_accuracy": dense_result["accuracy"],
        **{k: nm[k] for k in ("accuracy", "params", "nonzero_params", "macs", "effective_macs")},
        "wall_time_s": time.time() - start,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "config": json.dumps(cfg.to_dict()),
        "result": json.dumps({"dense": dense_result, "nm": nm, "dataset_name": data.name}),
    }


def _baseline_dir(artifacts: str, cfg: RunConfig) -> Path:
    return Path(artifacts) / f"baseline-{baseline_key(cfg)}"


def execute_run(
    cfg_dict: dict[str, Any], experiment: str, artifacts: str, device: str = "cpu", threads: int | None = None
) -> dict[str, Any]:
    """Run one grid point end to end and return its store row. Plain-data in and out, so it runs in a
    worker process or as a Ray task alike."""
    from hybridprune.experiments.job import Job
    from hybridprune.training.loop import calibration_data

    if threads:
        torch.set_num_threads(threads)
    from hybridprune.outputs import environment

    cfg = RunConfig.from_dict(cfg_dict)
    start, env = time.time(), environment()
    data = _cached_data(cfg.data, cfg.seed)
    dev = torch.device(device)
    base = Job(cfg, data, dev, _baseline_dir(artifacts, cfg), log=lambda _: None, progress=False)
    base.out.mkdir(parents=True, exist_ok=True)
    dense, dense_result = base.dense()
    job = Job(cfg, data, dev, Path(artifacts) / f"run-{run_key(cfg)}", log=lambda _: None, progress=False)
    job.out.mkdir(parents=True, exist_ok=True)
    job.teacher = dense if cfg.finetune.distill_weight > 0 else None
    images, labels = calibration_data(data.train, cfg.prune.calib_batches, cfg.prune.calib_batch_size, cfg.seed)
    result = job.metric(dense, cfg.prune.metric, images, labels)
    return _row(cfg, experiment, data.name, dense_result, {**result, "environment": env}, time.time() - start)


def _row(cfg: RunConfig, experiment: str, dataset: str, dense: dict, result: dict, wall: float) -> dict[str, Any]:
    f, h = result["filter"], result["hybrid"]
    return {
        "key": run_key(cfg),
        "experiment": experiment,
        "dataset": cfg.data.dataset,
        "model": cfg.model.name,
        "width": 1.0 if cfg.model.width is None else cfg.model.width,  # 1.0: the model's own widths
        "metric": cfg.prune.metric,
        "recipe": cfg.recipe,
        "ratio": cfg.prune.filter_ratio,
        "seed": cfg.seed,
        "dense_accuracy": dense["accuracy"],
        "filter_oneshot_raw": f["accuracy_oneshot_raw"],
        "filter_oneshot": f["accuracy_oneshot"],
        "filter_accuracy": f["accuracy"],
        "hybrid_oneshot_raw": h["accuracy_oneshot_raw"],
        "hybrid_oneshot": h["accuracy_oneshot"],
        "hybrid_accuracy": h["accuracy"],
        "params": h["params"],
        "nonzero_params": h["nonzero_params"],
        "macs": h["macs"],
        "effective_macs": h["effective_macs"],
        "wall_time_s": wall,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "config": json.dumps(cfg.to_dict()),
        "result": json.dumps({"dense": dense, **result, "dataset_name": dataset}),
    }


Submit = Callable[[dict[str, Any]], Future]


def run_grid(
    grid: Grid,
    store: Store,
    *,
    workers: int = 1,
    device: str = "cpu",
    backend: str = "process",
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, int]:
    """Run every unfinished grid point; returns counts of finished, skipped and failed runs.

    Baselines are trained first (one per dataset/model/seed), then the pruning runs, each phase in
    parallel over `workers`. Ctrl-C stops after writing every run that had finished.
    """
    runs, finished = grid.runs(), store.finished_keys()
    pending = [c for c in runs if run_key(c) not in finished]
    nm_done = store.finished_nm_only()
    nm_pending = list({nm_only_key(c): c for c in grid.nm_only_runs() if nm_only_key(c) not in nm_done}.values())
    total = len(runs)
    log(
        f"{grid.name}: {total} runs, {total - len(pending)} finished earlier, {len(pending)} to do, "
        f"{len(nm_pending)} 2:4-only model(s) to do ({workers} worker{'s' * (workers > 1)}, {backend})"
    )
    if not pending and not nm_pending:
        return {"done": 0, "skipped": total, "failed": 0}
    baselines = list({baseline_key(c): c for c in pending + nm_pending}.values())
    threads = max(1, (os.cpu_count() or 1) // workers) if device == "cpu" else None
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    devices = [f"cuda:{i}" for i in range(gpus)] if gpus > 1 else [device]
    args = (grid.name, str(store.artifacts), devices, threads)
    with _executor(backend, workers) as submit:
        _drain(submit, execute_baseline, [c.to_dict() for c in baselines], args, None, "baselines", progress, workers)
        nm = [c.to_dict() for c in nm_pending]
        nm_done = _drain(submit, execute_nm_only, nm, args, store.add_nm_only, "2:4-only", progress, workers)
        done = _drain(submit, execute_run, [c.to_dict() for c in pending], args, store.add, "runs", progress, workers)
    failed = len(pending) - done + len(nm_pending) - nm_done
    return {"done": done, "skipped": total - len(pending), "failed": failed}


def _drain(
    submit: Submit,
    fn: Callable[..., Any],
    cfgs: list[dict],
    args: tuple,
    write: Callable[[dict[str, Any]], None] | None,
    desc: str,
    progress: bool,
    limit: int,
) -> int:
    """Keep up to `limit` runs in flight and write each row as soon as its run finishes; a failed run is
    reported and left for the next invocation."""
    todo, in_flight = iter(cfgs), {}
    bar = tqdm(total=len(cfgs), desc=desc, unit="run", disable=not progress, dynamic_ncols=True)
    done = 0

    experiment_name, artifacts, devices, threads = args
    submitted = 0

    def top_up() -> None:
        nonlocal submitted
        while len(in_flight) < limit and (cfg := next(todo, None)) is not None:
            device = devices[submitted % len(devices)]  # one GPU per run, round-robin over the GPUs
            in_flight[submit(fn, cfg, experiment_name, artifacts, device, threads)] = cfg
            submitted += 1

    try:
        top_up()
        while in_flight:
            finished, _ = wait(list(in_flight), return_when=FIRST_COMPLETED)
            for fut in finished:
                in_flight.pop(fut)
                try:
                    row = fut.result()
                except HybridPruneError:
                    raise
                except Exception as e:  # one broken run must not lose the others
                    tqdm.write(f"run failed: {type(e).__name__}: {e}")
                    continue
                if write is not None:
                    write(row)
                done += 1
                bar.update(1)
            top_up()
            bar.set_postfix(running=len(in_flight), waiting=len(cfgs) - bar.n - len(in_flight))
    finally:
        for fut in in_flight:
            fut.cancel()
        bar.close()
    return done


class _executor:
    """A context manager yielding `submit(fn, *args) -> Future` for inline, process or Ray execution."""

    def __init__(self, backend: str, workers: int) -> None:
        if backend not in ("process", "ray"):
            raise HybridPruneError(f"unknown backend {backend!r}; valid: process, ray")
        if workers < 1:
            raise HybridPruneError(f"--workers must be at least 1, got {workers}")
        self.backend, self.workers = backend, workers

    def __enter__(self) -> Submit:
        if self.backend == "ray":
            return _ray_submit(self.workers)
        if self.workers == 1:
            return _inline_submit
        # spawn, not fork: a forked child of a process that already ran torch's thread pools can deadlock
        self.pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        return self.pool.submit

    def __exit__(self, *exc: object) -> None:
        if getattr(self, "pool", None) is not None:
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
        import ray
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


def pending_summary(grid: Grid, store: Store) -> Iterable[str]:
    finished = store.finished_keys()
    for cfg in grid.runs():
        yield (
            f"{'done' if run_key(cfg) in finished else 'todo'} {cfg.data.dataset} {cfg.prune.metric} {cfg.recipe} "
            f"{cfg.prune.filter_ratio} seed {cfg.seed}"
        )
