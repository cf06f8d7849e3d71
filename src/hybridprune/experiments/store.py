"""The result store of experiment grids: an SQLite file with one row per finished run, keyed by its configuration.

Every column is declared once, below, as (name, SQL type) per table; the CREATE TABLE statements and the
column lists of every insert come from those declarations, and `Store.add` refuses a row whose keys differ
from its table's columns. A run's key is a hash of its configuration (`run_key`), so a rerun of a grid finds
what is finished; baselines and 2:4-only models have keys of their own, since many runs share them.

Old stores keep loading: version 1 (no recipes) is upgraded in place, its runs counted as plain fine-tuning.
An existing file is read (without writing) before anything else: only a file whose tables and columns are a
store's of a version this code reads is opened for writing, upgraded or added to; any other SQLite file, of
whatever tables, is refused in one line and left byte-identical (`read_store_version`).
Checkpoints of baselines and pruned models sit beside the store, in STORE.artifacts/.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

from hybridprune.config import RunConfig
from hybridprune.errors import HybridPruneError

STORE_VERSION = 2  # 2 added the recipe column; a version-1 store is upgraded in place (its runs: plain)

Columns = tuple[tuple[str, str], ...]  # (name, SQL type), in table order

_MODEL: Columns = (
    ("key", "TEXT PRIMARY KEY"),
    ("experiment", "TEXT NOT NULL"),
    ("dataset", "TEXT NOT NULL"),
    ("model", "TEXT NOT NULL"),
    ("width", "REAL NOT NULL"),
)
_COUNTS: Columns = (
    ("params", "INTEGER"),
    ("nonzero_params", "INTEGER"),
    ("macs", "INTEGER"),
    ("effective_macs", "INTEGER"),
)
_FINISHED: Columns = (
    ("wall_time_s", "REAL"),
    ("finished_at", "TEXT NOT NULL"),
    ("config", "TEXT NOT NULL"),
    ("result", "TEXT NOT NULL"),
)
# the accuracies of a pruned stage: column suffix -> the stage record's field
STAGE_ACCURACIES = {"oneshot_raw": "accuracy_oneshot_raw", "oneshot": "accuracy_oneshot", "accuracy": "accuracy"}
STAGES = ("filter", "hybrid")
COUNT_COLUMNS = tuple(name for name, _ in _COUNTS)

RUNS: Columns = (
    *_MODEL,
    ("metric", "TEXT NOT NULL"),
    ("recipe", "TEXT NOT NULL DEFAULT 'plain'"),
    ("ratio", "REAL NOT NULL"),
    ("seed", "INTEGER NOT NULL"),
    ("dense_accuracy", "REAL"),
    *((f"{stage}_{suffix}", "REAL") for stage in STAGES for suffix in STAGE_ACCURACIES),
    *_COUNTS,
    *_FINISHED,
)
NM_ONLY: Columns = (
    *_MODEL,
    ("seed", "INTEGER NOT NULL"),
    ("dense_accuracy", "REAL"),
    ("accuracy", "REAL"),
    *_COUNTS,
    *_FINISHED,
)
TABLES: dict[str, Columns] = {
    "meta": (("key", "TEXT PRIMARY KEY"), ("value", "TEXT NOT NULL")),
    "runs": RUNS,
    "nm_only": NM_ONLY,
}


def create_table(name: str, columns: Columns) -> str:
    """The CREATE TABLE statement of a declared table (IF NOT EXISTS: running it again changes nothing).

    Example:
        >>> create_table("meta", TABLES["meta"])
        'CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);'
    """
    return f"CREATE TABLE IF NOT EXISTS {name} ({', '.join(f'{c} {kind}' for c, kind in columns)});"


def column_names(table: str) -> tuple[str, ...]:
    """The columns of a table, in order.

    Example:
        >>> column_names("nm_only")[:6]
        ('key', 'experiment', 'dataset', 'model', 'width', 'seed')
    """
    return tuple(name for name, _ in TABLES[table])


SCHEMA = "\n".join(create_table(name, columns) for name, columns in TABLES.items())

# the tables of each store version this code reads: name -> column names (a version-1 store had no recipe
# column and, before 2:4-only models were stored, no nm_only table)
_V2 = {name: frozenset(column_names(name)) for name in TABLES}
_V1 = {"meta": _V2["meta"], "runs": _V2["runs"] - {"recipe"}}
KNOWN_SCHEMAS: dict[str, tuple[dict[str, frozenset[str]], ...]] = {
    "1": (_V1, {**_V1, "nm_only": _V2["nm_only"]}),
    str(STORE_VERSION): (_V2,),
}
SQLITE_MAGIC = b"SQLite format 3\x00"


def read_store_version(path: Path) -> str | None:
    """The version of the hybridprune store in `path`, read through a read-only connection (nothing is written,
    no journal is made); None for an empty file (a store another process is creating, or an empty database:
    nothing in it to lose); any other file that is not a store of a known schema is one line.

    Example:
        >>> path = getfixture("tmp_path") / "other.sqlite"
        >>> with closing(sqlite3.connect(path)) as db:
        ...     _ = db.execute("CREATE TABLE meta (key TEXT, value TEXT)")
        ...     _ = db.execute("INSERT INTO meta VALUES ('version', '1')")
        ...     db.commit()
        >>> read_store_version(path)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        hybridprune.errors.HybridPruneError: ...other.sqlite is not a hybridprune store (its tables: meta); ...
    """
    untouched = "it was left untouched"
    try:
        with path.open("rb") as f:
            head = f.read(100)
    except OSError as e:  # a folder, a dangling link, no permission
        raise HybridPruneError(f"cannot read the store {path}: {e.strerror or e}") from None
    if not head:
        return None
    if not head.startswith(SQLITE_MAGIC) or head[18:20] != b"\x01\x01":  # 2: write-ahead log, never a store's
        raise HybridPruneError(f"{path} is not a hybridprune store (not an SQLite file of its kind); {untouched}")
    try:
        tables, version = _schema(path)
    except sqlite3.DatabaseError as e:
        raise HybridPruneError(f"{path} is not a hybridprune store ({e}); {untouched}") from None
    if version is not None and version not in KNOWN_SCHEMAS:
        raise HybridPruneError(
            f"{path} was written by store version {version}; this hybridprune reads versions "
            f"{', '.join(KNOWN_SCHEMAS)}; {untouched}"
        )
    if version is None or tables not in KNOWN_SCHEMAS[version]:
        shown = ", ".join(sorted(tables)[:5]) or "none"
        raise HybridPruneError(f"{path} is not a hybridprune store (its tables: {shown}); {untouched}")
    return version


def _schema(path: Path) -> tuple[dict[str, frozenset[str]], str | None]:
    """Every schema object's table and columns (any object but a table counts as a foreign one), and the
    version that a `meta` table of a store's shape records."""
    with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=60)) as db:
        objects = db.execute("SELECT type, name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'").fetchall()
        tables = {
            name if kind == "table" else f"{kind} {name}": frozenset(
                c for (c,) in db.execute("SELECT name FROM pragma_table_info(?)", (name,))
            )
            for kind, name in objects
        }
        if tables.get("meta") != _V2["meta"]:
            return tables, None
        row = db.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()
    return tables, str(row[0]) if row else None


# --- keys ---------------------------------------------------------------------------------------------


def config_key(obj: Any) -> str:
    """A stable 16-hex-digit key of any JSON-able configuration.

    Example:
        >>> config_key({"b": 1, "a": [2]}) == config_key({"a": [2], "b": 1})
        True
    """
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_key(cfg: RunConfig) -> str:
    """The key of one grid point: its whole configuration."""
    return config_key(cfg.to_dict())


def baseline_key(cfg: RunConfig) -> str:
    """The key of a run's dense baseline: what the dense model depends on, shared by every run that prunes it."""
    d = cfg.to_dict()
    return config_key({"data": d["data"], "model": d["model"], "train": d["train"], "seed": d["seed"]})


def nm_only_key(cfg: RunConfig) -> str:
    """The 2:4-only model depends on the baseline, the fine-tuning and the N:M settings, not on the metric."""
    p = cfg.prune
    nm = {"nm": p.nm, "permute": p.permute, "bn": p.bn_recalib_batches, "batch": p.calib_batch_size}
    return config_key({"baseline": baseline_key(cfg), "finetune": cfg.finetune.to_dict(), "prune": nm})


# --- the store ----------------------------------------------------------------------------------------


def _create_tables(db: sqlite3.Connection) -> None:
    """Every declared table that is missing, and the version of a new store."""
    for name, columns in TABLES.items():
        db.execute(create_table(name, columns))
    db.execute("INSERT OR IGNORE INTO meta VALUES ('version', ?)", (str(STORE_VERSION),))


class Store:
    """The SQLite result store: one row per finished run, keyed by its configuration."""

    def __init__(self, path: str | Path, create: bool = True) -> None:
        self.path = Path(path)
        exists = self.path.exists() or self.path.is_symlink()
        if not exists and not create:
            raise HybridPruneError(f"store {self.path} not found")
        version = read_store_version(self.path) if exists else None  # before the folder or the file is touched
        if version is None and not create:
            raise HybridPruneError(f"{self.path} is an empty file, not a store yet; it was left untouched")
        if version == "1":
            self._upgrade_from_v1()
        elif version is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._in_one_transaction(_create_tables)

    @property
    def artifacts(self) -> Path:
        """The folder beside the store holding the checkpoints of its baselines and runs."""
        return self.path.with_name(self.path.name + ".artifacts")

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=60)

    def _in_one_transaction(self, steps: Callable[[sqlite3.Connection], None]) -> None:
        """`steps` as one transaction under the write lock: a process creating or upgrading the same store at the
        same time waits, then finds it done; a reader sees all of it or none."""
        with closing(self._connect()) as db:
            db.isolation_level = None  # the transaction is ours, not the module's
            db.execute("BEGIN IMMEDIATE")
            try:
                steps(db)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def _upgrade_from_v1(self) -> None:
        """Version 1 had no recipes: every run in it was plain fine-tuning. One transaction."""

        def upgrade(db: sqlite3.Connection) -> None:
            if "recipe" not in {c for (c,) in db.execute("SELECT name FROM pragma_table_info('runs')")}:
                db.execute(f"ALTER TABLE runs ADD COLUMN recipe {dict(RUNS)['recipe']}")  # not upgraded meanwhile
            _create_tables(db)  # the tables version 1 lacked (every statement is IF NOT EXISTS)
            db.execute("UPDATE meta SET value = ? WHERE key = 'version'", (str(STORE_VERSION),))

        self._in_one_transaction(upgrade)

    def finished_keys(self) -> set[str]:
        """The keys of the finished runs."""
        with self._connect() as db:
            return {k for (k,) in db.execute("SELECT key FROM runs")}

    def add(self, row: dict[str, Any], table: str = "runs") -> None:
        """Write one finished run in one transaction (a rerun of the same key replaces nothing)."""
        columns = column_names(table)
        if set(row) != set(columns):  # a row builder that disagrees with the declared columns: an internal bug
            raise ValueError(f"a {table} row has keys {sorted(set(row) ^ set(columns))} that its columns lack or need")
        with self._connect() as db:
            db.execute(
                f"INSERT OR IGNORE INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                [row[c] for c in columns],
            )

    def add_nm_only(self, row: dict[str, Any]) -> None:
        """Write one finished 2:4-only model."""
        self.add(row, "nm_only")

    def finished_nm_only(self) -> set[str]:
        """The keys of the finished 2:4-only models."""
        with self._connect() as db:
            return {k for (k,) in db.execute("SELECT key FROM nm_only")}

    def nm_only_rows(self) -> list[dict[str, Any]]:
        """The 2:4-only models of the baselines (tables of stores written before them: none)."""
        with self._connect() as db:
            db.row_factory = sqlite3.Row
            return [dict(r) for r in db.execute("SELECT * FROM nm_only ORDER BY dataset, model, seed")]

    def rows(self) -> list[dict[str, Any]]:
        """Every finished run, ordered by setup, metric, recipe, ratio and seed."""
        with self._connect() as db:
            db.row_factory = sqlite3.Row
            return [
                dict(r) for r in db.execute("SELECT * FROM runs ORDER BY dataset, model, metric, recipe, ratio, seed")
            ]
