"""Grid experiments: datasets x models x metrics x filter ratios x recipes x seeds, read from YAML and run
into a resumable store.

`load_grid` parses and checks an experiment file before any work; `run_grid` trains one dense baseline per
(dataset, model, seed, training config), reused by every run that needs it, then the 2:4-only models and the
pruning runs, each phase in parallel (`runner`). A run's row is written in one transaction when the run
finishes (`store`), so an interrupted grid loses at most the runs in progress; rerunning the command skips
finished runs, and the checkpoints beside the store mean a resumed grid retrains nothing that finished.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from itertools import product
from pathlib import Path
from typing import Any

from hybridprune.config import (
    DEFAULT_FINETUNE,
    DEFAULT_METRICS,
    LATENCY_ALLOCATION,
    RECIPES,
    DataConfig,
    DeployConfig,
    ModelConfig,
    PruneConfig,
    RunConfig,
    TrainConfig,
    check_recipe,
    validate_ratio,
)
from hybridprune.deploy.deployment import check_targets
from hybridprune.errors import HybridPruneError
from hybridprune.experiments.runner import (
    Placement,
    WorkerPool,
    execute_baseline,
    execute_nm_only,
    execute_run,
    run_phase,
)
from hybridprune.experiments.store import Store, baseline_key, nm_only_key, run_key
from hybridprune.parse import read_yaml
from hybridprune.pruning.metrics import METRICS

GRID_KEYS = {
    "name",
    "datasets",
    "models",
    "metrics",
    "ratios",
    "target_latencies",
    "seeds",
    "train",
    "finetune",
    "prune",
    "filter_finetune",
    "recipes",
    "nm_only",
    "description",
    "deploy",
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
    # instead of the ratios: fractions of the dense model's measured latency (prune.latency_* say how it is measured)
    target_latencies: tuple[float, ...] = ()
    # every run's models also deployed (targets, batch sizes...: DeployConfig), top-1 and latency measured
    deploy: DeployConfig = field(default_factory=DeployConfig)

    def runs(self) -> list[RunConfig]:
        """Every grid point as a one-metric RunConfig."""
        points = self.target_latencies or self.ratios
        return [
            self._run(d, m, metric, point, seed).with_recipe(name, recipe)
            for d, m, seed, (name, recipe), point, metric in product(
                self.datasets, self.models, self.seeds, self.recipes, points, self.metrics
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

    def _run(self, data: DataConfig, model: ModelConfig, metric: str, point: float, seed: int) -> RunConfig:
        """One grid point: `point` is a filter ratio, or a latency target when the grid has target_latencies."""
        axis = {"target_latency": point, "allocation": self.prune.get("allocation", LATENCY_ALLOCATION)} if (
            self.target_latencies) else {"filter_ratio": point}  # fmt: skip
        prune = PruneConfig(**{**self.prune, "metric": metric, **axis})
        return RunConfig(
            data=data,
            model=model,
            train=self.train,
            finetune=self.finetune,
            prune=prune,
            metrics=(metric,),
            seed=seed,
            filter_finetune=self.filter_finetune,
            deploy=self.deploy,
        )


def load_grid(path: str | Path) -> Grid:
    """Parse and validate an experiment YAML; unknown keys and invalid values fail naming them."""
    path = Path(path)
    if not path.is_file():
        raise HybridPruneError(f"experiment config {path} not found")
    raw = read_yaml(path, "experiment config") or {}
    if not isinstance(raw, dict):
        raise HybridPruneError(f"{path} must hold a mapping of keys such as datasets, metrics, ratios")
    unknown = sorted(set(raw) - GRID_KEYS)
    if unknown:
        raise HybridPruneError(f"{path}: unknown key {', '.join(unknown)}; valid keys: {', '.join(sorted(GRID_KEYS))}")
    return grid_from_dict(raw, default_name=path.stem)


def grid_from_dict(raw: dict[str, Any], default_name: str = "experiment") -> Grid:
    """A grid from the mapping an experiment YAML holds; every value is checked here, before any work.

    Example:
        >>> g = grid_from_dict({"metrics": ["l1", "hybrid"], "ratios": [0.3, 0.5], "seeds": [0, 1]})
        >>> len(g.runs()), len(g.nm_only_runs())
        (8, 2)
    """
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
    bad = sorted(set(prune) & {"metric", "filter_ratio", "target_latency"})
    if bad:
        raise HybridPruneError(f"prune.{bad[0]} is set by the grid axes (metrics, ratios, target_latencies)")
    PruneConfig(**prune)  # validates the keys and values now, not in a worker later
    targets = tuple(float(t) for t in _items(raw, "target_latencies", [], float)) if "target_latencies" in raw else ()
    if targets and "ratios" in raw:
        raise HybridPruneError("give ratios or target_latencies, not both: a latency target replaces the ratio")
    for target in targets:  # each point checked now (bounds, allocation), not in a worker later
        PruneConfig(**{**prune, "target_latency": target, "allocation": prune.get("allocation", LATENCY_ALLOCATION)})
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
        targets,
        DeployConfig.from_dict(_mapping(raw, "deploy")),
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


# --- running it -----------------------------------------------------------------------------------


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

    Baselines are trained first (one per dataset/model/seed), then the 2:4-only models, then the pruning
    runs, each phase in parallel over `workers`. Ctrl-C stops after writing every run that had finished.
    """
    if workers > 1 and (grid.target_latencies or grid.prune.get("nm_where") == "auto" or grid.deploy.targets):
        raise HybridPruneError(
            "this grid measures latency: run it with --workers 1, so no second worker shares the machine it times"
        )
    check_targets(grid.deploy)  # a deploy target this machine cannot run is said before any work
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
    pool = WorkerPool(backend, workers)  # checks backend and workers before any work
    where = Placement.on(grid.name, store.artifacts, device, workers)
    with pool as submit:
        phase = partial(run_phase, submit, where=where, progress=progress, limit=workers)
        phase(execute_baseline, [c.to_dict() for c in baselines], None, desc="baselines")
        nm_done = phase(execute_nm_only, [c.to_dict() for c in nm_pending], store.add_nm_only, desc="2:4-only")
        done = phase(execute_run, [c.to_dict() for c in pending], store.add, desc="runs")
    failed = len(pending) - done + len(nm_pending) - nm_done
    return {"done": done, "skipped": total - len(pending), "failed": failed}


def pending_summary(grid: Grid, finished: set[str]) -> Iterable[str]:
    """One line per grid point: done (its key is in `finished`, as `Store.finished_keys` gives them) or todo, and
    what it is."""
    for cfg in grid.runs():
        yield (
            f"{'done' if run_key(cfg) in finished else 'todo'} {cfg.data.dataset} {cfg.prune.metric} {cfg.recipe} "
            f"{cfg.prune.filter_ratio} seed {cfg.seed}"
        )
