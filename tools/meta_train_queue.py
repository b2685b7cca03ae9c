"""The job queue of `tools meta-train`: tasks as trials of an Optuna study, claimed by workers.

Each task (dataset, pipeline, budget, seed, TF mode) is one Optuna trial: enqueued once as
WAITING, claimed by exactly one worker (claims and enqueues are serialised by a lock: a file
lock next to an SQLite storage, a PostgreSQL advisory lock on a server), run through
`tools.runner.run_local` with AUTODL_PIPELINE_JSON forcing the pipeline, then recorded in the
store and in the trial (so workers on other machines, whose store files differ, can be merged
with --sync). A task whose harness failed (not the solver: that is a result) is kept failed
unless retried; a task left RUNNING by a killed worker is re-queued once it is older than any
run can last.
"""
from __future__ import annotations

import fcntl
import importlib
import json
import os
import time
import traceback
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tools.errors import UserInputError

DEFAULT_STUDY = "meta-train"
DEFAULT_RUNNER = "tools.runner:run_local"
OUTCOME_OK, OUTCOME_HARNESS, OUTCOME_STALE, OUTCOME_INTERRUPTED = "ok", "harness_error", "stale", "interrupted"
STALE_MARGIN_SECONDS = 600.0


# ---------------------------------------------------------------------- tasks


@dataclass
class Task:
    dataset_id: str
    pipeline_id: str
    pipeline_name: str
    config: dict
    time_budget: float
    seed: int = 0
    tf_mode: str = "graph"
    init_limit: float = 1200.0
    dataset: dict = field(default_factory=dict)  # DatasetRecord fields, for merging on another machine

    def key(self) -> str:
        from meta_db.store import task_key

        return task_key(self.dataset_id, self.pipeline_id, self.time_budget, self.seed, self.tf_mode)

    def to_attrs(self) -> dict:
        return {"task_key": self.key(), "task": self.__dict__.copy()}

    @classmethod
    def from_attrs(cls, attrs: dict) -> "Task":
        return cls(**attrs["task"])

    def max_seconds(self) -> float:
        """Longest a run of this task can take: the runner kills at init + startup allowance + T."""
        from tools.runner import KILL_GRACE_SECONDS, STARTUP_ALLOWANCE_SECONDS

        return self.time_budget + self.init_limit + STARTUP_ALLOWANCE_SECONDS + KILL_GRACE_SECONDS


# ---------------------------------------------------------------------- coordination (Optuna storage)


def default_storage_url(out_dir: Path) -> str:
    return f"sqlite:///{(Path(out_dir) / 'optuna.sqlite').resolve()}"


def check_storage_url(url: str) -> str:
    """The backend name of a storage URL we support (sqlite file, postgresql); UserInputError otherwise."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:
        raise UserInputError(f"not a storage URL: {url!r} (use sqlite:///FILE or postgresql://USER@HOST/DB)") from None
    backend = parsed.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise UserInputError(f"storage {url!r}: only sqlite:/// and postgresql:// storages are supported")
    if backend == "sqlite" and (not parsed.database or parsed.database == ":memory:"):
        raise UserInputError("an in-memory SQLite storage cannot be shared by workers: give a file")
    return backend


def _driver_error(url: str, exc: ModuleNotFoundError) -> UserInputError:
    return UserInputError(f"storage {url!r} needs the database driver '{exc.name}' "
                          "(PostgreSQL: pip install 'psycopg[binary]' for postgresql://, or psycopg2-binary "
                          "and a postgresql+psycopg2:// URL)")


def _engine(url: str):
    import sqlalchemy

    try:
        return sqlalchemy.create_engine(url, pool_pre_ping=True)
    except ModuleNotFoundError as exc:
        raise _driver_error(url, exc) from None


def make_storage(url: str):
    import optuna

    backend = check_storage_url(url)
    kwargs = {"connect_args": {"timeout": 120}} if backend == "sqlite" else {"pool_pre_ping": True}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    except ModuleNotFoundError as exc:
        raise _driver_error(url, exc) from None


class FileLock:
    """Exclusive lock between the processes of one machine (SQLite storages live on one machine)."""

    def __init__(self, path: Path):
        self.path = path

    @contextmanager
    def hold(self):
        with open(self.path, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


class AdvisoryLock:
    """PostgreSQL session advisory lock: exclusive between workers on any machine using the server."""

    def __init__(self, engine, name: str):
        self.engine = engine
        self.key = zlib.crc32(name.encode()) & 0x7FFFFFFF

    @contextmanager
    def hold(self):
        from sqlalchemy import text

        with self.engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": self.key})
            conn.commit()
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
                conn.commit()


class Coordinator:
    """The study whose trials are the tasks: enqueue, claim, finish, and list them."""

    def __init__(self, storage_url: str, study_name: str = DEFAULT_STUDY):
        import optuna
        from sqlalchemy.engine import make_url

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.url, self.study_name = storage_url, study_name
        check_storage_url(storage_url)
        parsed = make_url(storage_url)
        if parsed.get_backend_name() == "sqlite":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            self.lock = FileLock(Path(parsed.database + ".lock"))
        else:
            self.lock = AdvisoryLock(_engine(storage_url), f"autodl-meta-train:{study_name}")
        # Optuna's schema creation is not safe against a concurrent first use: serialise it too.
        with self.lock.hold():
            self.storage = make_storage(storage_url)
            self.study = optuna.create_study(storage=self.storage, study_name=study_name, load_if_exists=True,
                                             direction="maximize")
        self.study_id = self.storage.get_study_id_from_name(study_name)

    def trials(self, states=None):
        return [t for t in self.storage.get_all_trials(self.study_id, deepcopy=False, states=states)
                if "task_key" in t.user_attrs]

    def _trial_id(self, trial) -> int:
        return self.storage.get_trial_id_from_study_id_trial_number(self.study_id, trial.number)

    def enqueue(self, tasks: list[Task], retry_failed: bool = False, now: float | None = None,
                stale_after: float | None = None) -> dict:
        """Queue the tasks not done, not queued and not running; re-queue stale and interrupted ones."""
        from optuna.trial import TrialState

        counts = {"queued": 0, "done": 0, "failed_kept": 0, "pending": 0, "stale_requeued": 0}
        now = time.time() if now is None else now
        with self.lock.hold():
            by_key: dict = {}
            for trial in self.trials():
                by_key.setdefault(trial.user_attrs["task_key"], []).append(trial)
            for task in tasks:
                trials = by_key.get(task.key(), [])
                limit = stale_after if stale_after is not None else task.max_seconds() + STALE_MARGIN_SECONDS
                live = False
                for trial in trials:
                    if trial.state == TrialState.RUNNING and trial.datetime_start is not None \
                            and now - trial.datetime_start.timestamp() > limit:
                        trial_id = self._trial_id(trial)
                        self.storage.set_trial_user_attr(trial_id, "outcome", OUTCOME_STALE)
                        self.storage.set_trial_state_values(trial_id, TrialState.FAIL)
                        counts["stale_requeued"] += 1
                    elif trial.state in (TrialState.WAITING, TrialState.RUNNING):
                        live = True
                states = [(t.state, t.user_attrs.get("outcome")) for t in trials]
                if any(s == TrialState.COMPLETE for s, _ in states):
                    counts["done"] += 1
                elif live:
                    counts["pending"] += 1
                elif any(s == TrialState.FAIL and o == OUTCOME_HARNESS for s, o in states) and not retry_failed:
                    counts["failed_kept"] += 1
                else:
                    self.study.enqueue_trial({}, user_attrs=task.to_attrs())
                    counts["queued"] += 1
        return counts

    def claim(self, dataset_ids) -> tuple[int, Task] | None:
        """Atomically take the oldest WAITING task whose dataset this worker has; None when none is left."""
        from optuna.trial import TrialState

        dataset_ids = set(dataset_ids)
        with self.lock.hold():
            for trial in sorted(self.trials(states=(TrialState.WAITING,)), key=lambda t: t.number):
                task = Task.from_attrs(trial.user_attrs)
                if task.dataset_id not in dataset_ids:
                    continue
                trial_id = self._trial_id(trial)
                if self.storage.set_trial_state_values(trial_id, TrialState.RUNNING):
                    return trial_id, task
        return None

    def finish(self, trial_id: int, result: dict, outcome: str) -> bool:
        """Record the run in the trial and close it (COMPLETE with the ALC, or FAIL); False if it was
        closed meanwhile (declared stale by another worker)."""
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        try:
            self.storage.set_trial_user_attr(trial_id, "result", result)
            self.storage.set_trial_user_attr(trial_id, "outcome", outcome)
            if outcome == OUTCOME_OK:
                self.storage.set_trial_state_values(trial_id, TrialState.COMPLETE, [float(result.get("alc") or 0.0)])
            else:
                self.storage.set_trial_state_values(trial_id, TrialState.FAIL)
        except UpdateFinishedTrialError:
            return False
        return True

    def measurements(self):
        """(Task, run dict) of each trial that recorded a run (finished, or failed with its error): what
        `--sync` merges into a store."""
        for trial in self.trials():
            result = trial.user_attrs.get("result")
            if not result or "dataset_id" not in result:
                continue
            yield Task.from_attrs(trial.user_attrs), result

    def status(self) -> dict:
        from optuna.trial import TrialState

        counts: dict = {}
        for trial in self.trials():
            name = trial.state.name.lower()
            if trial.state == TrialState.FAIL:
                name = f"fail:{trial.user_attrs.get('outcome', '?')}"
            counts[name] = counts.get(name, 0) + 1
        return counts


# ---------------------------------------------------------------------- one worker


@dataclass
class WorkerConfig:
    storage_url: str
    study_name: str
    store_path: str
    out_dir: str
    code_dir: str
    dataset_dirs: dict  # dataset_id -> local folder
    hardware: dict
    code_version: str | None
    run_fn: object = DEFAULT_RUNNER  # callable or "module:function"
    worker_name: str = "w0"


def resolve_run_fn(run_fn):
    if callable(run_fn):
        return run_fn
    module_name, _, attr = str(run_fn).partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise UserInputError(f"runner {run_fn!r} not found ({exc}); expected module:function") from None


@contextmanager
def _env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: str(v) for k, v in values.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _safe(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)


def execute_task(task: Task, cfg: WorkerConfig, run_fn):
    """Run one task; returns (RunRecord, outcome). Never raises for a failing run (KeyboardInterrupt aside)."""
    from meta_db.build import run_record
    from meta_db.knowledge import ENV_BUDGET
    from meta_db.selector import ENV_PIPELINE
    from meta_db.store import HARNESS_ERROR, RunRecord, now_iso

    out = Path(cfg.out_dir) / "runs" / _safe(task.dataset_id) / _safe(
        f"{task.pipeline_name}-{task.pipeline_id}-T{task.time_budget:g}-s{task.seed}-{task.tf_mode}")
    started_at = now_iso()
    wall0 = time.time()
    common = dict(dataset_id=task.dataset_id, pipeline_id=task.pipeline_id, time_budget=task.time_budget,
                  hardware=cfg.hardware["key"], hardware_info=cfg.hardware, seed=task.seed, tf_mode=task.tf_mode,
                  code_version=cfg.code_version, started_at=started_at, worker=cfg.worker_name,
                  study=cfg.study_name)
    try:
        out.mkdir(parents=True, exist_ok=True)
        pipeline_file = out / "pipeline.json"
        pipeline_file.write_text(json.dumps(task.config, indent=1, sort_keys=True))
        with _env(**{ENV_PIPELINE: pipeline_file, ENV_BUDGET: task.time_budget, "AUTODL_SEED": task.seed}):
            result = run_fn(cfg.code_dir, cfg.dataset_dirs[task.dataset_id], task.time_budget, out,
                            tf_mode=task.tf_mode, init_limit=task.init_limit)
        return run_record({"wall_time": time.time() - wall0, **result}, **common), OUTCOME_OK
    except Exception as exc:  # the harness failed (not the solver): stored with its error
        error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}"
        return RunRecord(**common, status=HARNESS_ERROR, error=error, wall_time=time.time() - wall0), OUTCOME_HARNESS


def worker_loop(cfg: WorkerConfig, log=print) -> int:
    """Claim and run tasks until none is left for this worker's datasets; returns how many it ran."""
    from meta_db.build import record_measurement
    from meta_db.store import Store

    coordinator = Coordinator(cfg.storage_url, cfg.study_name)
    run_fn = resolve_run_fn(cfg.run_fn)
    done = 0
    while True:
        claimed = coordinator.claim(cfg.dataset_dirs)
        if claimed is None:
            return done
        trial_id, task = claimed
        log(f"[meta-train {cfg.worker_name}] {task.pipeline_name} on {task.dataset_id} (T={task.time_budget:g}s)")
        try:
            run, outcome = execute_task(task, cfg, run_fn)
        except BaseException:
            coordinator.finish(trial_id, {"error": "interrupted"}, OUTCOME_INTERRUPTED)
            raise
        try:
            with Store(cfg.store_path) as store:
                record_measurement(store, run, task.dataset, task.pipeline_name, task.config)
        except Exception as exc:  # the trial still carries the result: --sync can recover it
            log(f"[meta-train {cfg.worker_name}] could not write the store: {exc}")
        coordinator.finish(trial_id, run.to_dict(), outcome)
        done += 1
        alc = "-" if run.alc is None else f"{run.alc:.4f}"
        log(f"[meta-train {cfg.worker_name}]   status={run.status} ALC={alc} wall={run.wall_time or 0:.0f}s")


def worker_main(cfg: WorkerConfig) -> None:
    try:
        worker_loop(cfg)
    except KeyboardInterrupt:
        pass

