"""The grid commands: `experiment` (datasets x models x metrics x ratios x seeds into a store) and `report`.

Thin: `experiments/` holds the grid, the store, the runners and the report; these parse and call them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hybridprune.cli.flags import config_from_args, numeric
from hybridprune.config import BACKENDS, PoolConfig
from hybridprune.errors import HybridPruneError


def _add_experiment(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("experiment", help="run a grid of datasets x models x metrics x ratios x seeds into a store")
    p.add_argument("config", help="experiment YAML (see experiments/)")
    p.add_argument("--store", default=None, help="SQLite result store (default: runs/NAME.sqlite)")
    numeric(
        p,
        "--workers",
        PoolConfig,
        "workers",
        "grid workers: runs in parallel (processes, or Ray tasks), 1 runs them one at a time in this process",
    )
    p.add_argument(
        "--backend",
        default=PoolConfig.backend,
        choices=BACKENDS,
        help="process: a local process pool; ray: Ray tasks (RAY_ADDRESS for a cluster)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--list", action="store_true", help="list the grid's runs and whether each is done, then stop")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(handler=cmd_experiment)


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="tables and plots from an experiment store (never re-runs anything)")
    p.add_argument("--store", required=True, help="SQLite result store written by `hybridprune experiment`")
    p.add_argument("--out", required=True, help="folder for report.md, CSV tables and PNG plots")
    p.add_argument("--bench", action="append", default=[], help="bench JSON with accuracies, for a Pareto plot")
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        help="report only the runs of this experiment YAML (repeatable); needed when one store holds grids "
        "that measure the same setup with different settings",
    )
    p.set_defaults(handler=cmd_report)


def cmd_experiment(args: argparse.Namespace) -> None:
    from hybridprune.experiments.grid import load_grid, pending_summary, run_grid
    from hybridprune.experiments.store import Store
    from hybridprune.outputs import check_output_dir
    from hybridprune.world import resolve_device

    pool = config_from_args(PoolConfig, args)
    grid = load_grid(args.config)
    device = resolve_device(args.device)
    store_path = Path(args.store or f"runs/{grid.name}.sqlite")
    check_output_dir(store_path.parent)
    if store_path.is_dir():
        raise HybridPruneError(f"--store {store_path} is a folder; give the SQLite file to write")
    if args.list:  # only reads: a store not made yet (or an empty file) is not made one, and every run is to do
        made = store_path.exists() and store_path.stat().st_size > 0
        finished = Store(store_path, create=False).finished_keys() if made else set()
        print("\n".join(pending_summary(grid, finished)))
        return
    store = Store(store_path)
    counts = run_grid(
        grid, store, workers=pool.workers, device=device.type, backend=pool.backend, progress=not args.no_progress
    )
    print(
        f"{counts['done']} runs finished now, {counts['skipped']} earlier, {counts['failed']} failed; "
        f"store: {store.path}"
    )
    if counts["failed"]:
        raise HybridPruneError(f"{counts['failed']} runs failed (see above); rerun the command to retry them")


def cmd_report(args: argparse.Namespace) -> None:
    from hybridprune.experiments.grid import load_grid
    from hybridprune.experiments.report import write_grid_report
    from hybridprune.experiments.store import Store, nm_only_key, run_key
    from hybridprune.outputs import check_output_dir

    check_output_dir(Path(args.out))
    store = Store(args.store, create=False)
    rows, nm_rows = store.rows(), store.nm_only_rows()
    if args.grid:
        grids = [load_grid(g) for g in args.grid]
        keys = {run_key(c) for g in grids for c in g.runs()}
        nm_keys = {nm_only_key(c) for g in grids for c in g.nm_only_runs()}
        rows, nm_rows = [r for r in rows if r["key"] in keys], [r for r in nm_rows if r["key"] in nm_keys]
    if not rows:
        raise HybridPruneError(f"{args.store} holds no finished runs{' of those grids' if args.grid else ''} yet")
    for path in write_grid_report(rows, args.out, args.bench, nm_rows):
        print(f"wrote {path}")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """The `experiment` and `report` commands."""
    _add_experiment(sub)
    _add_report(sub)
