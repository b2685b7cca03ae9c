"""The meta-knowledge store: one SQLite file of datasets, pipelines and runs (learning curves, ALC, costs).

Why SQLite: the file ships inside the submission (the selector reads it in `Model.__init__`),
needs no server, and several local meta-training workers can append to it safely (each write
is one short transaction; a busy timeout rides out the others). Workers on many machines
coordinate through an Optuna storage instead and their results are merged in here
(`tools meta-train --sync`), keyed by `RunRecord.run_key()` so a merge is idempotent.

Schema (version SCHEMA_VERSION, in `PRAGMA user_version` and the `store_info` table):
  datasets(dataset_id PK, name, parent_id, family_id, derivation JSON, source, metadata_features JSON,
           data_features JSON, updated_at)
  pipelines(pipeline_id PK = PipelineConfig.pipeline_id(), name, config JSON, created_at)
  runs(run_id PK, run_key UNIQUE, dataset_id, pipeline_id, time_budget, hardware, hardware_info JSON, seed,
       tf_mode, code_version, status, error, alc, final_nauc, n_predictions, curve JSON {timestamps, scores},
       time_to_first_prediction, peak_rss_bytes, init_seconds, wall_time, started_at, finished_at, study, worker)
  retired_code(code_version PK: a git commit or prefix, reason, retired_at)
  retired_pipelines(pipeline_id PK, reason, retired_at)
Opening an older file upgrades it (MIGRATIONS); a newer one is refused (StoreVersionError).

Retired code: the runs of a retired code version stay in the file, the record of what was measured,
but nothing learns from them (selection, LODO, "already measured"): they measured a solver that no
longer exists, and comparing them with today's runs credits a pipeline with its code's differences.
"""
from __future__ import annotations

import json
import math
import os
import re
import sqlite3
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

from autodl_core.config import PipelineConfig

SCHEMA_VERSION = 3
DEFAULT_STORE_PATH = Path(__file__).resolve().parent / "store.sqlite"
BUSY_TIMEOUT_SECONDS = 60.0
# A run whose harness (not the solver) failed: no ALC to learn from, excluded from selection.
HARNESS_ERROR = "harness_error"
COMMIT_PREFIX = re.compile(r"[0-9a-f]{4,40}")  # a git commit or its prefix, as runs name their code version
# SQL condition on `runs`: the run was not measured by a retired code version.
_IN_USE = "NOT EXISTS (SELECT 1 FROM retired_code rc WHERE runs.code_version LIKE rc.code_version || '%')"
# SQL expression on `runs`: the machine instance (boot id) that measured the run, NULL where not recorded.
_MACHINE_INSTANCE = "json_extract(runs.hardware_info, '$.machine_instance')"

# MIGRATIONS[v] upgrades a file at schema version v to v + 1.
MIGRATIONS: dict[int, str] = {
    0: """
    CREATE TABLE IF NOT EXISTS store_info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE IF NOT EXISTS datasets (
        dataset_id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        parent_id TEXT,
        family_id TEXT NOT NULL,
        derivation TEXT,
        source TEXT,
        metadata_features TEXT NOT NULL,
        data_features TEXT,
        updated_at TEXT NOT NULL
    );
    CREATE TABLE IF NOT EXISTS pipelines (
        pipeline_id TEXT PRIMARY KEY,
        name TEXT,
        config TEXT NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE TABLE IF NOT EXISTS runs (
        run_id INTEGER PRIMARY KEY AUTOINCREMENT,
        run_key TEXT NOT NULL UNIQUE,
        dataset_id TEXT NOT NULL REFERENCES datasets(dataset_id),
        pipeline_id TEXT NOT NULL REFERENCES pipelines(pipeline_id),
        time_budget REAL NOT NULL,
        hardware TEXT NOT NULL,
        hardware_info TEXT,
        seed INTEGER NOT NULL DEFAULT 0,
        tf_mode TEXT NOT NULL DEFAULT 'graph',
        code_version TEXT,
        status TEXT NOT NULL,
        error TEXT,
        alc REAL,
        final_nauc REAL,
        n_predictions INTEGER,
        curve TEXT,
        time_to_first_prediction REAL,
        peak_rss_bytes INTEGER,
        init_seconds REAL,
        wall_time REAL,
        started_at TEXT,
        finished_at TEXT,
        study TEXT,
        worker TEXT
    );
    CREATE INDEX IF NOT EXISTS runs_by_dataset ON runs(dataset_id, pipeline_id);
    CREATE INDEX IF NOT EXISTS runs_by_budget ON runs(time_budget, hardware);
    """,
    1: """
    CREATE TABLE IF NOT EXISTS retired_code (
        code_version TEXT PRIMARY KEY,
        reason TEXT NOT NULL,
        retired_at TEXT NOT NULL
    );
    """,
    2: """
    CREATE TABLE IF NOT EXISTS retired_pipelines (
        pipeline_id TEXT PRIMARY KEY REFERENCES pipelines(pipeline_id),
        reason TEXT NOT NULL,
        retired_at TEXT NOT NULL
    );
    """,
}


class StoreVersionError(RuntimeError):
    """The file was written by a newer schema than this code knows."""


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _dumps(value) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True, default=_json_default)


def _json_default(value):
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _loads(text):
    return None if text is None else json.loads(text)


@dataclass
class DatasetRecord:
    dataset_id: str
    metadata_features: dict
    name: str = ""
    parent_id: str | None = None
    family_id: str = ""  # the corpus dataset a variant derives from (itself for an original)
    derivation: dict | None = None
    source: str | None = None
    data_features: dict | None = None

    def __post_init__(self):
        self.name = self.name or self.dataset_id
        self.family_id = self.family_id or self.parent_id or self.dataset_id


@dataclass
class RunRecord:
    dataset_id: str
    pipeline_id: str
    time_budget: float
    hardware: str
    status: str
    alc: float | None = None
    final_nauc: float | None = None
    n_predictions: int | None = None
    timestamps: list = field(default_factory=list)
    scores: list = field(default_factory=list)
    time_to_first_prediction: float | None = None
    peak_rss_bytes: int | None = None
    init_seconds: float | None = None
    wall_time: float | None = None
    error: str | None = None
    seed: int = 0
    tf_mode: str = "graph"
    code_version: str | None = None
    hardware_info: dict | None = None
    started_at: str | None = None
    finished_at: str | None = None
    study: str | None = None
    worker: str | None = None
    run_id: int | None = None

    def run_key(self) -> str:
        """Identity of a measurement: recording the same key again replaces the older run."""
        return task_key(self.dataset_id, self.pipeline_id, self.time_budget, self.seed, self.tf_mode, self.hardware)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RunRecord":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class CellMean:
    """The runs of one cell (dataset, pipeline) of one stratum (time budget, hardware) that `Store.cell_means`
    counts: how many, their mean ALC and mean squared ALC (a run without an ALC counts as 0)."""

    dataset_id: str
    pipeline_id: str
    time_budget: float
    hardware: str
    alc: float
    alc2: float
    n: int


@dataclass(frozen=True)
class BatchRun:
    """One run of a stratum as `meta_db.batches` compares them: its cell, its measuring batch
    (`code_version@machine_instance`, the code version alone where the run names no instance), its ALC
    (0 when missing), when it finished ("" when unknown) and whether its code version is retired."""

    dataset_id: str
    pipeline_id: str
    batch: str
    alc: float
    finished: str
    retired: bool


def task_key(dataset_id: str, pipeline_id: str, time_budget: float, seed: int = 0, tf_mode: str = "graph",
             hardware: str | None = None) -> str:
    parts = [dataset_id, pipeline_id, f"T{float(time_budget):g}", f"s{int(seed)}", tf_mode]
    if hardware is not None:
        parts.append(hardware)
    return "|".join(parts)


def _finite_or_none(value):
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


class Store:
    """Connection to one store file; `Store(path)` creates or upgrades it, `Store(path, readonly=True)` only reads."""

    def __init__(self, path: str | os.PathLike = DEFAULT_STORE_PATH, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        if readonly:
            if not self.path.is_file():
                raise FileNotFoundError(f"meta-knowledge store not found: {self.path}")
            uri = f"file:{self.path.resolve()}?mode=ro"
            self.conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_SECONDS)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_SECONDS)
        self.conn.row_factory = sqlite3.Row
        self.conn.isolation_level = None  # autocommit reads; writes take explicit transactions
        try:
            self._check_or_migrate()
        except BaseException:
            self.conn.close()
            raise

    # ------------------------------------------------------------------ schema
    def schema_version(self) -> int:
        return int(self.conn.execute("PRAGMA user_version").fetchone()[0])

    def _check_or_migrate(self) -> None:
        version = self.schema_version()
        if version > SCHEMA_VERSION:
            raise StoreVersionError(f"{self.path} has schema version {version}; this code reads up to "
                                    f"{SCHEMA_VERSION} (update the code)")
        if version == SCHEMA_VERSION:
            return
        if self.readonly:
            raise StoreVersionError(f"{self.path} has schema version {version}, expected {SCHEMA_VERSION}; "
                                    "open it writable once to upgrade it")
        with self._transaction():
            version = self.schema_version()  # another process may have upgraded it meanwhile
            while version < SCHEMA_VERSION:
                for statement in _split_sql(MIGRATIONS[version]):
                    self.conn.execute(statement)
                version += 1
                self.conn.execute(f"PRAGMA user_version = {version}")
            self.conn.execute("INSERT OR REPLACE INTO store_info(key, value) VALUES ('schema_version', ?)",
                              (str(version),))
            self.conn.execute("INSERT OR IGNORE INTO store_info(key, value) VALUES ('created_at', ?)", (now_iso(),))

    @contextmanager
    def _transaction(self):
        """One write transaction, taken up front (BEGIN IMMEDIATE) so concurrent writers queue, not deadlock.
        Inside `batch()` it joins the batch's transaction."""
        if self.readonly:
            raise PermissionError(f"store opened read-only: {self.path}")
        if self.conn.in_transaction:
            yield self.conn
            return
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        else:
            self.conn.execute("COMMIT")

    @contextmanager
    def batch(self):
        """Many writes in one transaction (one disk sync): all of them land, or none."""
        with self._transaction():
            yield self

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ datasets
    def upsert_dataset(self, record: DatasetRecord) -> None:
        """Insert or update; data features already stored are kept when the record has none."""
        with self._transaction() as conn:
            conn.execute(
                """INSERT INTO datasets(dataset_id, name, parent_id, family_id, derivation, source,
                                        metadata_features, data_features, updated_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT(dataset_id) DO UPDATE SET
                     name=excluded.name, parent_id=excluded.parent_id, family_id=excluded.family_id,
                     derivation=excluded.derivation, source=COALESCE(excluded.source, datasets.source),
                     metadata_features=excluded.metadata_features,
                     data_features=COALESCE(excluded.data_features, datasets.data_features),
                     updated_at=excluded.updated_at""",
                (record.dataset_id, record.name, record.parent_id, record.family_id, _dumps(record.derivation),
                 record.source, _dumps(record.metadata_features), _dumps(record.data_features), now_iso()))

    def get_dataset(self, dataset_id: str) -> DatasetRecord | None:
        row = self.conn.execute("SELECT * FROM datasets WHERE dataset_id = ?", (dataset_id,)).fetchone()
        return None if row is None else _dataset_from_row(row)

    def datasets(self) -> list[DatasetRecord]:
        return [_dataset_from_row(r) for r in self.conn.execute("SELECT * FROM datasets ORDER BY dataset_id")]

    # ------------------------------------------------------------------ pipelines
    def upsert_pipeline(self, config: PipelineConfig, name: str | None = None) -> str:
        pipeline_id = config.pipeline_id()
        with self._transaction() as conn:
            conn.execute(
                """INSERT INTO pipelines(pipeline_id, name, config, created_at) VALUES (?, ?, ?, ?)
                   ON CONFLICT(pipeline_id) DO UPDATE SET name=COALESCE(excluded.name, pipelines.name),
                   config=excluded.config""",
                (pipeline_id, name, _dumps(config.to_dict()), now_iso()))
        return pipeline_id

    def get_pipeline(self, pipeline_id: str) -> PipelineConfig | None:
        row = self.conn.execute("SELECT config FROM pipelines WHERE pipeline_id = ?", (pipeline_id,)).fetchone()
        return None if row is None else PipelineConfig.from_record(json.loads(row["config"]))

    def pipelines(self) -> list[tuple[str, str | None, dict]]:
        """(pipeline_id, name, raw config dict): raw, so a record this code cannot parse is still listed."""
        return [(r["pipeline_id"], r["name"], json.loads(r["config"]))
                for r in self.conn.execute("SELECT * FROM pipelines ORDER BY created_at, pipeline_id")]

    # ------------------------------------------------------------------ runs
    def record_run(self, run: RunRecord) -> None:
        """Insert, or replace the run with the same run_key (a rerun of the same measurement)."""
        curve = {"timestamps": [float(t) for t in run.timestamps], "scores": [_finite_or_none(s) for s in run.scores]}
        values = dict(
            run_key=run.run_key(), dataset_id=run.dataset_id, pipeline_id=run.pipeline_id,
            time_budget=float(run.time_budget), hardware=run.hardware, hardware_info=_dumps(run.hardware_info),
            seed=int(run.seed), tf_mode=run.tf_mode, code_version=run.code_version, status=run.status,
            error=run.error, alc=_finite_or_none(run.alc), final_nauc=_finite_or_none(run.final_nauc),
            n_predictions=run.n_predictions, curve=_dumps(curve),
            time_to_first_prediction=_finite_or_none(run.time_to_first_prediction),
            peak_rss_bytes=run.peak_rss_bytes, init_seconds=_finite_or_none(run.init_seconds),
            wall_time=_finite_or_none(run.wall_time), started_at=run.started_at,
            finished_at=run.finished_at or now_iso(), study=run.study, worker=run.worker)
        columns = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        updates = ", ".join(f"{c}=excluded.{c}" for c in values if c != "run_key")
        with self._transaction() as conn:
            for table, key in (("datasets", "dataset_id"), ("pipelines", "pipeline_id")):
                if conn.execute(f"SELECT 1 FROM {table} WHERE {key} = ?", (values[key],)).fetchone() is None:
                    raise KeyError(f"run refers to unknown {key} {values[key]!r}: store the {table[:-1]} first")
            conn.execute(f"INSERT INTO runs({columns}) VALUES ({marks}) ON CONFLICT(run_key) DO UPDATE SET {updates}",
                         tuple(values.values()))

    def runs(self, dataset_id: str | None = None, pipeline_id: str | None = None, time_budget: float | None = None,
             hardware: str | None = None, status: str | None = None) -> list[RunRecord]:
        where, params = [], []
        for column, value in (("dataset_id", dataset_id), ("pipeline_id", pipeline_id),
                              ("time_budget", None if time_budget is None else float(time_budget)),
                              ("hardware", hardware), ("status", status)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        sql = "SELECT * FROM runs" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY run_id"
        return [_run_from_row(r) for r in self.conn.execute(sql, params)]

    def has_run(self, key: str) -> bool:
        return self.conn.execute("SELECT 1 FROM runs WHERE run_key = ?", (key,)).fetchone() is not None

    def measured_keys(self) -> set[str]:
        """Run keys of the runs in use that measured the solver: what meta-training need not redo (a
        harness error is not a measurement; a retired code version's run is a different solver's)."""
        return {r[0] for r in self.conn.execute(f"SELECT run_key FROM runs WHERE status != ? AND {_IN_USE}",
                                                (HARNESS_ERROR,))}

    def alc_table(self, time_budget: float | None = None, hardware: str | None = None) -> dict:
        """{(dataset_id, pipeline_id): mean ALC} over the runs in use that measured the solver (harness errors
        and retired code versions left out)."""
        sql = (f"SELECT dataset_id, pipeline_id, AVG(COALESCE(alc, 0.0)) AS alc FROM runs WHERE status != ? "
               f"AND {_IN_USE}"
               + (" AND time_budget = ?" if time_budget is not None else "")
               + (" AND hardware = ?" if hardware is not None else "")
               + " GROUP BY dataset_id, pipeline_id")
        params = [HARNESS_ERROR] + ([float(time_budget)] if time_budget is not None else []) \
            + ([hardware] if hardware is not None else [])
        return {(r["dataset_id"], r["pipeline_id"]): float(r["alc"]) for r in self.conn.execute(sql, params)}

    def cell_means(self, machine_instance: str | None = None) -> list[CellMean]:
        """Every cell of every stratum over the runs in use that measured the solver (harness errors and
        retired code versions left out): what the selector learns from.

        `machine_instance` (a boot id prefix, as runs record it) keeps only that machine's runs."""
        instance_filter, params = "", [HARNESS_ERROR]
        if machine_instance:  # a prefix match without LIKE: no character of the id acts as a wildcard
            instance_filter = f" AND instr({_MACHINE_INSTANCE}, ?) = 1"
            params.append(machine_instance.strip().lower())
        rows = self.conn.execute(
            "SELECT dataset_id, pipeline_id, time_budget, hardware, AVG(COALESCE(alc, 0.0)) AS alc, "
            "AVG(COALESCE(alc, 0.0) * COALESCE(alc, 0.0)) AS alc2, COUNT(*) AS n "
            f"FROM runs WHERE status != ? AND {_IN_USE}{instance_filter} GROUP BY 1, 2, 3, 4", params).fetchall()
        return [CellMean(r["dataset_id"], r["pipeline_id"], r["time_budget"], r["hardware"], r["alc"], r["alc2"],
                         r["n"]) for r in rows]

    def batch_runs(self, time_budget: float, hardware: str) -> list[BatchRun]:
        """The runs of one stratum that measured the solver (harness errors left out), retired ones included
        and marked: a retired batch is still compared with the others, by the store's own rule of retirement."""
        rows = self.conn.execute(
            "SELECT dataset_id, pipeline_id, COALESCE(code_version, '') || COALESCE('@' || NULLIF("
            f"{_MACHINE_INSTANCE}, ''), '') AS batch, COALESCE(alc, 0.0) AS alc, "
            f"COALESCE(finished_at, '') AS finished, NOT ({_IN_USE}) AS retired FROM runs "
            "WHERE status != ? AND time_budget = ? AND hardware = ?",
            (HARNESS_ERROR, float(time_budget), hardware)).fetchall()
        return [BatchRun(r["dataset_id"], r["pipeline_id"], r["batch"], r["alc"], r["finished"], bool(r["retired"]))
                for r in rows]

    def delete_runs(self, study: str) -> int:
        """Forget every run recorded under `study` (e.g. 'bench:kit' imports); returns how many.

        E.g. to learn from one judge only: the official kit and the local runner time the first
        prediction slightly differently (docs/history/metalearning-lab-notes.md).
        """
        with self._transaction() as conn:
            return conn.execute("DELETE FROM runs WHERE study = ?", (study,)).rowcount

    def retire_code(self, code_versions: list[str], reason: str) -> int:
        """Stop learning from the runs of these code versions (git commits or prefixes); returns how many
        runs that retires. Runs recorded later by a retired version are retired too.

        Why: a solver change makes the older code's runs another solver's results (0.1.12: re-measured
        with today's code, mnv2-top-lr16's cells moved by -0.001 to +0.015, as much as pipelines differ).
        """
        reason = _required_reason(reason, "a code version")
        prefixes = _commit_prefixes(code_versions)
        with self._transaction() as conn:
            before = self._retired_run_count()
            for prefix in prefixes:
                conn.execute("INSERT OR REPLACE INTO retired_code(code_version, reason, retired_at) VALUES (?, ?, ?)",
                             (prefix, reason, now_iso()))
            return self._retired_run_count() - before

    def restore_code(self, code_versions: list[str]) -> int:
        """Learn again from these retired code versions (exactly as retired); returns how many runs return."""
        prefixes = _commit_prefixes(code_versions)
        with self._transaction() as conn:
            before = self._retired_run_count()
            unknown = [p for p in prefixes if conn.execute("DELETE FROM retired_code WHERE code_version = ?",
                                                           (p,)).rowcount == 0]
            if unknown:
                raise ValueError(f"not retired: {unknown} (retired: {sorted(self.retired_code())})")
            return before - self._retired_run_count()

    def retired_code(self) -> dict[str, str]:
        """{code version prefix: reason}."""
        return {r["code_version"]: r["reason"] for r in self.conn.execute("SELECT * FROM retired_code")}

    def retire_pipelines(self, pipeline_ids: list[str], reason: str) -> int:
        """Drop these pipelines from the choices the selector makes (their runs stay, still counted as
        measured); returns how many runs in use they hold.

        Why not delete them: the runs are the record of what was measured, and a member retired from
        the portfolio may be worth restoring once new families show where it wins.
        """
        reason = _required_reason(reason, "a pipeline")
        ids = self._known_pipeline_ids(pipeline_ids)
        with self._transaction() as conn:
            for pipeline_id in ids:
                conn.execute("INSERT OR REPLACE INTO retired_pipelines(pipeline_id, reason, retired_at) "
                             "VALUES (?, ?, ?)", (pipeline_id, reason, now_iso()))
        return self._run_count_of(ids)

    def restore_pipelines(self, pipeline_ids: list[str]) -> int:
        """Let the selector choose these retired pipelines again; returns how many runs in use they hold."""
        ids = self._known_pipeline_ids(pipeline_ids)
        with self._transaction() as conn:
            unknown = [p for p in ids if conn.execute("DELETE FROM retired_pipelines WHERE pipeline_id = ?",
                                                      (p,)).rowcount == 0]
            if unknown:
                raise ValueError(f"not retired: {unknown} (retired: {sorted(self.retired_pipelines())})")
        return self._run_count_of(ids)

    def retired_pipelines(self) -> dict[str, str]:
        """{pipeline_id: reason}."""
        return {r["pipeline_id"]: r["reason"] for r in self.conn.execute("SELECT * FROM retired_pipelines")}

    def pipelines_in_use(self) -> list[tuple[str, str | None, dict]]:
        """(pipeline_id, name, raw config dict) of the pipelines the selector can choose from: not retired,
        with at least one run in use that measured the solver (the runs `alc_table` counts, any stratum).
        What `tools package` ships weights for."""
        sql = ("SELECT p.pipeline_id, p.name, p.config FROM pipelines p "
               "WHERE p.pipeline_id NOT IN (SELECT pipeline_id FROM retired_pipelines) "
               "AND EXISTS (SELECT 1 FROM runs WHERE runs.pipeline_id = p.pipeline_id AND runs.status != ? "
               f"AND {_IN_USE}) ORDER BY p.created_at, p.pipeline_id")
        return [(r["pipeline_id"], r["name"], json.loads(r["config"]))
                for r in self.conn.execute(sql, (HARNESS_ERROR,))]

    def _known_pipeline_ids(self, pipeline_ids) -> list[str]:
        ids = [str(p).strip() for p in pipeline_ids if p and str(p).strip()]
        if not ids:
            raise ValueError("name at least one pipeline id")
        known = {r[0] for r in self.conn.execute("SELECT pipeline_id FROM pipelines")}
        unknown = [p for p in ids if p not in known]
        if unknown:
            raise ValueError(f"pipeline(s) not in the store: {unknown}")
        return ids

    def _run_count_of(self, pipeline_ids: list[str]) -> int:
        marks = ",".join("?" * len(pipeline_ids))
        return int(self.conn.execute(f"SELECT COUNT(*) FROM runs WHERE pipeline_id IN ({marks}) AND {_IN_USE}",
                                     pipeline_ids).fetchone()[0])

    def _retired_run_count(self) -> int:
        return int(self.conn.execute(f"SELECT COUNT(*) FROM runs WHERE NOT {_IN_USE}").fetchone()[0])

    def copy_without_family(self, family_id: str, out_path: str | os.PathLike) -> Path:
        """A copy of this store that never saw `family_id` (its datasets, variants and runs removed).

        For end-to-end leave-one-dataset-out checks: the solver run on a held-out dataset with this
        copy (AUTODL_META_STORE) chooses exactly as the LODO evaluation says it would.
        """
        out_path = Path(out_path)
        if out_path.resolve() == self.path.resolve():
            raise ValueError(f"refusing to overwrite the source store {self.path}")
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.unlink(missing_ok=True)
        target = sqlite3.connect(out_path)
        try:
            self.conn.backup(target)
            target.execute("DELETE FROM runs WHERE dataset_id IN (SELECT dataset_id FROM datasets WHERE family_id = ?)",
                           (family_id,))
            target.execute("DELETE FROM datasets WHERE family_id = ?", (family_id,))
            target.commit()
            target.execute("VACUUM")
        finally:
            target.close()
        return out_path

    def summary(self) -> dict:
        count = lambda table: int(self.conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])  # noqa: E731
        statuses = {r[0]: r[1] for r in self.conn.execute("SELECT status, COUNT(*) FROM runs GROUP BY status")}
        retired = self._retired_run_count()
        budgets = [r[0] for r in self.conn.execute("SELECT DISTINCT time_budget FROM runs ORDER BY 1")]
        hardware = [r[0] for r in self.conn.execute("SELECT DISTINCT hardware FROM runs ORDER BY 1")]
        return {"schema_version": self.schema_version(), "datasets": count("datasets"),
                "pipelines": count("pipelines"), "runs": count("runs"), "retired_runs": retired,
                "retired_code": self.retired_code(), "retired_pipelines": self.retired_pipelines(),
                "statuses": statuses,
                "time_budgets": budgets, "hardware": hardware}


def _required_reason(reason: str | None, what: str) -> str:
    """A retirement's reason, stripped; ValueError when there is none (it is kept with the retirement)."""
    reason = (reason or "").strip()
    if not reason:
        raise ValueError(f"retiring {what} needs a reason (it is kept with it)")
    return reason


def _commit_prefixes(code_versions) -> list[str]:
    prefixes = [str(v).strip().lower() for v in code_versions if v and str(v).strip()]
    if not prefixes:
        raise ValueError("name at least one code version (a git commit or its prefix)")
    bad = [v for v in prefixes if not COMMIT_PREFIX.fullmatch(v)]
    if bad:
        raise ValueError(f"not a git commit or prefix (4-40 hex digits): {bad}")
    return prefixes


def _split_sql(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


def _dataset_from_row(row) -> DatasetRecord:
    return DatasetRecord(dataset_id=row["dataset_id"], name=row["name"], parent_id=row["parent_id"],
                         family_id=row["family_id"], derivation=_loads(row["derivation"]), source=row["source"],
                         metadata_features=_loads(row["metadata_features"]) or {},
                         data_features=_loads(row["data_features"]))


def _run_from_row(row) -> RunRecord:
    curve = _loads(row["curve"]) or {}
    return RunRecord(
        run_id=row["run_id"], dataset_id=row["dataset_id"], pipeline_id=row["pipeline_id"],
        time_budget=row["time_budget"], hardware=row["hardware"], hardware_info=_loads(row["hardware_info"]),
        seed=row["seed"], tf_mode=row["tf_mode"], code_version=row["code_version"], status=row["status"],
        error=row["error"], alc=row["alc"], final_nauc=row["final_nauc"], n_predictions=row["n_predictions"],
        timestamps=curve.get("timestamps", []), scores=curve.get("scores", []),
        time_to_first_prediction=row["time_to_first_prediction"], peak_rss_bytes=row["peak_rss_bytes"],
        init_seconds=row["init_seconds"], wall_time=row["wall_time"], started_at=row["started_at"],
        finished_at=row["finished_at"], study=row["study"], worker=row["worker"])
