"""`tools meta-train`: run pipelines x datasets through the local judge into the meta-knowledge store.

    tools meta-train --datasets DIR... --time-budget T [--pipelines portfolio|NAME|ID ...]
                     [--store meta_db/store.sqlite] [--storage sqlite:///F|postgresql://...]
                     [--study meta-train] [--workers N] [--out runs/meta-train] [--retry-failed]
    tools meta-train --evaluate [--store S] [--time-budget T] [--report FILE]   leave-one-dataset-out table
    tools meta-train --sync --storage URL [--study NAME] [--store S]             merge a study's results
    tools meta-train --status --storage URL [--study NAME]                        task counts
    tools meta-train --make-variants SRC... --variants-out DIR [--per-dataset N | --variant SPEC ...]  derive datasets
    tools meta-train --lodo-stores DIR [--store S]                                one store per held-out family
    tools meta-train --drop-study STUDY [--store S]                               forget one study's runs
    tools meta-train --retire-code COMMIT... --reason TEXT [--store S]           stop learning from old code's runs
    tools meta-train --restore-code COMMIT... [--store S]                        learn from them again
    tools meta-train --retire-pipeline NAME|ID... --reason TEXT [--store S]      the selector stops choosing it
    tools meta-train --restore-pipeline NAME|ID... [--store S]                   it may be chosen again
    tools meta-train --list-portfolio

Each task (dataset, pipeline, budget, seed, TF mode) is one Optuna trial: enqueued once as
WAITING, claimed by exactly one worker (claims and enqueues are serialised by a lock: a file
lock next to an SQLite storage, a PostgreSQL advisory lock on a server), run through
`tools.runner.run_local` with AUTODL_PIPELINE_JSON forcing the pipeline, then recorded in the
store and in the trial (so workers on other machines, whose store files differ, can be merged
with --sync). Resumable: finished tasks are skipped; a task whose harness failed (not the
solver: that is a result) is stored with its error and skipped unless --retry-failed; a task
left RUNNING by a killed worker is re-queued once it is older than any run can last.
A run of a retired code version counts as not measured; a study that already completed its task
still skips it, so re-measure retired runs under a new --study (or through `tools bench` and
--import-bench).
"""
from __future__ import annotations

import fcntl
import importlib
import json
import multiprocessing
import os
import re
import socket
import time
import traceback
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tools.errors import UserInputError
from tools.shared_paths import REPO_ROOT
from tools.provenance import code_version

DEFAULT_OUT = Path("runs/meta-train")
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
    from meta_db.selector import ENV_BUDGET, ENV_PIPELINE
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


def run_record(result: dict, **fields):
    """A judge's result (tools.runner.run_local, or a `tools bench` row: same keys) as a RunRecord."""
    from meta_db.store import RunRecord

    return RunRecord(**fields, status=str(result.get("status") or "unknown"), alc=result.get("alc"),
                     final_nauc=result.get("final_nauc"), n_predictions=result.get("n_predictions"),
                     timestamps=list(result.get("timestamps") or []), scores=list(result.get("naucs") or []),
                     time_to_first_prediction=result.get("time_to_first_prediction"),
                     peak_rss_bytes=result.get("peak_rss_bytes"), init_seconds=result.get("init_seconds"),
                     wall_time=result.get("wall_time"), error=result.get("error"))


def _store_task_records(store, task: Task) -> None:
    from autodl_core.config import PipelineConfig
    from meta_db.store import DatasetRecord

    if task.dataset:
        store.upsert_dataset(DatasetRecord(**task.dataset))
    store.upsert_pipeline(PipelineConfig.from_dict(task.config), name=task.pipeline_name)


def worker_loop(cfg: WorkerConfig, log=print) -> int:
    """Claim and run tasks until none is left for this worker's datasets; returns how many it ran."""
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
                _store_task_records(store, task)
                store.record_run(run)
        except Exception as exc:  # the trial still carries the result: --sync can recover it
            log(f"[meta-train {cfg.worker_name}] could not write the store: {exc}")
        coordinator.finish(trial_id, run.to_dict(), outcome)
        done += 1
        alc = "-" if run.alc is None else f"{run.alc:.4f}"
        log(f"[meta-train {cfg.worker_name}]   status={run.status} ALC={alc} wall={run.wall_time or 0:.0f}s")


def _worker_main(cfg: WorkerConfig) -> None:
    try:
        worker_loop(cfg)
    except KeyboardInterrupt:
        pass


# ---------------------------------------------------------------------- the whole meta-training


def expand_dataset_dirs(dirs) -> list[Path]:
    """Each DIR is an AutoDL dataset folder, or a folder holding several (one level down)."""
    found = []
    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            raise UserInputError(f"dataset folder not found: {d}")
        if any(p.is_dir() for p in d.glob("*.data")):
            found.append(d)
            continue
        inner = sorted(p for p in d.iterdir() if p.is_dir() and any(q.is_dir() for q in p.glob("*.data")))
        if not inner:
            raise UserInputError(f"{d}: no AutoDL dataset (a folder with <name>.data/) in it or directly below")
        found.extend(inner)
    return found


def dataset_record(dataset_dir: Path, data_features: dict | None = None):
    """The store's record of an AutoDL dataset folder: metadata features of the train split, parent if a variant."""
    from meta_db.metafeatures import metadata_features
    from meta_db.sources import portable_source
    from meta_db.store import DatasetRecord
    from meta_db.variants import parent_of
    from autodl_data.autodl_format import AutoDLMetadata, find_task

    task = find_task(dataset_dir)
    parent, family, derivation = parent_of(dataset_dir)
    return DatasetRecord(dataset_id=task.name, name=task.name, parent_id=parent, family_id=family or "",
                         derivation=derivation, source=portable_source(dataset_dir, task.name),
                         metadata_features=metadata_features(AutoDLMetadata(task.train_dir)),
                         data_features=data_features)


def add_data_features(record, dataset_dir: Path, store, compute: bool, landmark_backbone: str | None, log=print):
    """The record's data meta-features: those already in the store, else computed (when `compute`)."""
    stored = store.get_dataset(record.dataset_id)
    if stored is not None and stored.data_features:
        record.data_features = stored.data_features
    elif compute:
        log(f"[meta-train] data meta-features of {record.dataset_id} ...")
        record.data_features = compute_data_features(dataset_dir, landmark_backbone)


def compute_data_features(dataset_dir: Path, landmark_backbone: str | None = None) -> dict:
    import torch  # noqa: F401  (torch, then dynamo/triton, before TensorFlow: see the notes on triton)

    try:
        import torch._dynamo  # noqa: F401
    except Exception:
        pass
    from meta_db.metafeatures import data_features, read_first_chunk

    images, labels = read_first_chunk(dataset_dir)
    return data_features(images, labels, landmark_backbone=landmark_backbone)





def meta_train(dataset_dirs, pipelines, time_budget: float, store_path, out_dir=DEFAULT_OUT,
               storage_url: str | None = None, study_name: str = DEFAULT_STUDY, workers: int = 1,
               tf_mode: str = "graph", seed: int = 0, retry_failed: bool = False, run_fn=DEFAULT_RUNNER,
               hardware: dict | None = None, code_dir=REPO_ROOT, with_data_features: bool = False,
               landmark_backbone: str | None = None, init_limit: float = 1200.0, log=print) -> dict:
    """Enqueue the missing (dataset, pipeline) tasks, run them with `workers` local processes, merge the
    study into the store. `pipelines`: [(name, PipelineConfig)]. Returns counts and the study status."""
    import math

    from meta_db.metafeatures import hardware_profile
    from meta_db.store import Store, task_key

    if not (time_budget > 0 and math.isfinite(time_budget)):
        raise UserInputError(f"time budget must be a positive number of seconds, got {time_budget}")
    if workers < 1:
        raise UserInputError(f"workers must be >= 1, got {workers}")
    if tf_mode not in ("graph", "eager"):
        raise UserInputError(f"tf mode must be 'graph' or 'eager', got {tf_mode!r}")
    if not (Path(code_dir) / "model.py").is_file():
        raise UserInputError(f"no model.py in code folder {code_dir}")
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    storage_url = storage_url or default_storage_url(out_dir)
    dirs = expand_dataset_dirs(dataset_dirs)
    hardware = hardware or hardware_profile()
    records = {}
    with Store(store_path) as store:
        for d in dirs:
            record = dataset_record(d)
            if record.dataset_id in records:
                raise UserInputError(f"two dataset folders hold tasks named {record.dataset_id!r}: "
                                     f"{records[record.dataset_id][1]} and {d}")
            add_data_features(record, d, store, with_data_features, landmark_backbone, log)
            store.upsert_dataset(record)
            records[record.dataset_id] = (record, d)
        for name, config in pipelines:
            store.upsert_pipeline(config, name=name)
    tasks = [Task(dataset_id=dataset_id, pipeline_id=config.pipeline_id(), pipeline_name=name,
                  config=config.to_dict(), time_budget=float(time_budget), seed=int(seed), tf_mode=tf_mode,
                  init_limit=float(init_limit), dataset=record.__dict__.copy())
             for name, config in pipelines for dataset_id, (record, _) in sorted(records.items())]
    # Runs already in the store (e.g. a shipped store, or one built through another study) are not redone.
    with Store(store_path) as store:
        measured = store.measured_keys()  # a retired code version's runs are redone
    in_store = [t for t in tasks if task_key(t.dataset_id, t.pipeline_id, t.time_budget, t.seed, t.tf_mode,
                                             hardware["key"]) in measured]
    if in_store:
        log(f"[meta-train] {len(in_store)} task(s) already measured in {store_path}: skipped")
        tasks = [t for t in tasks if t not in in_store]
    coordinator = Coordinator(storage_url, study_name)
    counts = coordinator.enqueue(tasks, retry_failed=retry_failed)
    log(f"[meta-train] {len(tasks)} tasks: {counts['queued']} queued now, {counts['done']} done, "
        f"{counts['failed_kept']} failed earlier (kept; --retry-failed reruns them), {counts['pending']} queued or "
        f"running elsewhere; storage {storage_url}, study {study_name!r}")
    cfg = dict(storage_url=storage_url, study_name=study_name, store_path=str(Path(store_path).resolve()),
               out_dir=str(out_dir), code_dir=str(Path(code_dir).resolve()),
               dataset_dirs={k: str(Path(d).resolve()) for k, (_, d) in records.items()}, hardware=hardware,
               code_version=code_version(Path(code_dir)), run_fn=run_fn)
    host = socket.gethostname().split(".")[0]
    if workers == 1:
        ran = worker_loop(WorkerConfig(**cfg, worker_name=f"{host}-w0"), log=log)
    else:
        context = multiprocessing.get_context("spawn")  # no fork of a process that may hold TF/torch threads
        procs = [context.Process(target=_worker_main, args=(WorkerConfig(**cfg, worker_name=f"{host}-w{i}"),),
                                 name=f"meta-train-w{i}") for i in range(workers)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        bad = [p.name for p in procs if p.exitcode != 0]
        if bad:
            log(f"[meta-train] worker(s) exited abnormally: {bad} (their tasks are re-queued once stale)")
        ran = None
    merged = sync_store(coordinator, store_path)
    status = coordinator.status()
    log(f"[meta-train] study status: {status}; store {store_path}: {merged} runs merged")
    return {"enqueue": counts, "status": status, "ran_here": ran, "merged": merged}


def import_bench(results_path, store_path, with_data_features: bool = True, landmark_backbone: str | None = None,
                 seed: int = 0, log=print) -> int:
    """Store the runs of `tools bench` (OUT/results.jsonl): our solver's rows whose logged pipeline is known.

    A bench row is the same measurement as a meta-training run (one solver, one dataset, one budget,
    scored by the same ALC), so the bench's runs of the solver need not be run again. Rows are taken
    only when the ingestion log named the pipeline (bench records it) and that pipeline is in the
    portfolio or the store, only on the machine type the bench ran on (same CPU count / device), and
    not when the bench saw other processes use more than BACKGROUND_LIMIT of the machine meanwhile.
    A run is keyed by dataset, pipeline, budget, seed and machine type: importing a rerun under the
    same `seed` replaces the earlier one; a replicate needs its own `seed`.
    """
    from meta_db.metafeatures import hardware_profile
    from meta_db.portfolio import known_members
    from meta_db.store import Store
    from tools.bench import load_results, row_key
    from tools.contention import BACKGROUND_LIMIT

    results_path = Path(results_path)
    if not results_path.is_file():
        raise UserInputError(f"bench results not found: {results_path}")
    hardware = hardware_profile()
    latest = {}
    for row in load_results(results_path):
        latest[row_key(row)] = row
    imported = 0
    with Store(store_path) as store:
        known = {config.pipeline_id(): (name, config) for name, config in known_members().items()}
        for pipeline_id, (name, config) in stored_pipelines(store).items():
            known.setdefault(pipeline_id, (name, config))
        for row in latest.values():
            what = f"{row['solver']} on {row['dataset']}"
            if row["solver"].startswith("kit:") or row.get("status") == "judge_failed":
                continue
            background = row.get("background_cpu")
            if background is not None and background > BACKGROUND_LIMIT:
                log(f"[import] skip {what}: other processes used {background:.0%} of the machine during it")
                continue
            pipeline_id = row.get("pipeline_id")
            if pipeline_id not in known:
                log(f"[import] skip {what}: pipeline {pipeline_id or '(not logged)'} unknown")
                continue
            cpus = re.search(r"(\d+) cpu", row.get("hardware") or "")
            if hardware["kind"] != "cpu" or not cpus or int(cpus.group(1)) != hardware["cpu_count"]:
                log(f"[import] skip {what}: measured on {row.get('hardware')!r}, this machine is {hardware['key']}")
                continue
            dataset_dir = Path(row["dataset_dir"])
            if not dataset_dir.is_dir():
                log(f"[import] skip {what}: dataset folder {dataset_dir} is gone")
                continue
            record = dataset_record(dataset_dir)
            add_data_features(record, dataset_dir, store, with_data_features, landmark_backbone, log)
            store.upsert_dataset(record)
            name, config = known[pipeline_id]
            store.upsert_pipeline(config, name=name)
            # the instance that ran the row, not the one importing it (older rows: unknown)
            measured_on = {**hardware, "machine_instance": row.get("machine_instance") or ""}
            store.record_run(run_record(
                row, dataset_id=record.dataset_id, pipeline_id=pipeline_id, time_budget=float(row["time_budget"]),
                hardware=hardware["key"], hardware_info=measured_on, tf_mode=row.get("tf_mode", "graph"),
                seed=int(seed), code_version=row.get("code_version"), finished_at=row.get("finished_at"),
                study=f"bench:{row.get('judge')}", worker=row["solver"]))
            imported += 1
            log(f"[import] {what}: {name} ALC {row.get('alc'):.4f}")
    return imported


def sync_store(coordinator: Coordinator, store_path) -> int:
    """Copy every finished trial's run (and its dataset and pipeline) into the store; idempotent."""
    from meta_db.store import RunRecord, Store

    merged = 0
    with Store(store_path) as store, store.batch():
        for trial in coordinator.trials():
            result = trial.user_attrs.get("result")
            if not result or "dataset_id" not in result:
                continue
            task = Task.from_attrs(trial.user_attrs)
            _store_task_records(store, task)
            store.record_run(RunRecord.from_dict(result))
            merged += 1
    return merged


# ---------------------------------------------------------------------- CLI


def stored_pipelines(store) -> dict:
    """{pipeline_id: (name, PipelineConfig)} of the store's pipelines this code can parse."""
    from autodl_core.config import PipelineConfig

    known = {}
    for pipeline_id, name, raw in store.pipelines():
        try:
            known[pipeline_id] = (name, PipelineConfig.from_record(raw))
        except (TypeError, ValueError):  # a record of newer code: not usable here
            continue
    return known


def _pipelines_from_args(specs, store_path):
    from meta_db.portfolio import resolve_pipelines
    from meta_db.store import Store

    known = {}
    if Path(store_path).is_file():
        with Store(store_path, readonly=True) as store:
            known = {pipeline_id: config for pipeline_id, (_, config) in stored_pipelines(store).items()}
    try:
        return resolve_pipelines(specs, known)
    except ValueError as exc:
        raise UserInputError(str(exc)) from None


def retire_or_restore_pipelines(store_path, retire: list[str] | None, restore: list[str] | None,
                                reason: str | None, log=print) -> int:
    """`--retire-pipeline` / `--restore-pipeline`: names or ids resolved as `--pipelines` resolves them."""
    from meta_db.portfolio import resolve_pipelines
    from meta_db.store import Store

    specs = retire or restore
    with Store(store_path) as store:  # writable first: an older file is upgraded before it is read
        try:
            known = {pipeline_id: config for pipeline_id, (_, config) in stored_pipelines(store).items()}
            ids = [config.pipeline_id() for _, config in resolve_pipelines(specs, known)]
            if retire:
                n = store.retire_pipelines(ids, reason)
                log(f"retired {', '.join(specs)} in {store_path}: the selector no longer chooses them "
                    f"({n} run(s) kept; {reason})")
            else:
                n = store.restore_pipelines(ids)
                log(f"{', '.join(specs)} may be chosen again ({n} run(s) in use)")
        except ValueError as exc:
            raise UserInputError(str(exc)) from None
        log(f"retired pipelines: {json.dumps(store.retired_pipelines())}")
    return 0


def write_lodo_stores(store_path, out_dir, k: int = 5, method: str | None = None) -> list[tuple[str, Path, str]]:
    """One store per corpus family with that family left out, and what the selector then picks for it.

    Run the solver on a held-out dataset with AUTODL_META_STORE=<its store> to measure, end to end,
    the selection that the leave-one-dataset-out table only looks up. Returns (family, path, choice).
    """
    from meta_db.metafeatures import zero_shot_vector
    from meta_db.selector import load_knowledge, make_selector
    from meta_db.store import Store

    with Store(store_path, readonly=True) as store:
        datasets = {d.dataset_id: d for d in store.datasets()}
        stratum = load_knowledge(store_path)
        families = sorted({datasets[d].family_id for d in stratum.dataset_ids})
        written = []
        for family in families:
            path = store.copy_without_family(family, Path(out_dir) / f"{family}.sqlite")
            held_out = datasets.get(family)
            choice = "-"
            if held_out is not None:
                knowledge = load_knowledge(path, time_budget=stratum.time_budget, hardware=stratum.hardware)
                pipeline_id, reason = make_selector(knowledge, method, k=k).choose(
                    zero_shot_vector(held_out.metadata_features))
                choice = reason if pipeline_id else "default pipeline (nothing measured)"
            written.append((family, path, choice))
    return written


def list_portfolio(store_path, log=print) -> int:
    """`--list-portfolio`: id and name of each portfolio pipeline, "(retired)" where the store retired it
    (the selector no longer chooses it; `--restore-pipeline` undoes that)."""
    import sqlite3

    from meta_db.portfolio import PORTFOLIO
    from meta_db.store import Store, StoreVersionError

    retired = {}
    if Path(store_path).is_file():
        try:
            with Store(store_path, readonly=True) as store:
                retired = store.retired_pipelines()
        except (StoreVersionError, sqlite3.Error) as exc:
            log(f"note: retired pipelines not shown ({exc})")
    for name, config in PORTFOLIO.items():
        pipeline_id = config.pipeline_id()
        reason = retired.get(pipeline_id, "")
        reason = reason if len(reason) <= 80 else reason[:77].rstrip() + "..."
        mark = f"  (retired) {reason}" if pipeline_id in retired else ""
        log(f"{pipeline_id}  {name}{mark}".rstrip())
    return 0


def _cli(args) -> int:
    from meta_db.store import DEFAULT_STORE_PATH

    store_path = Path(args.store or DEFAULT_STORE_PATH)
    if args.list_portfolio:
        return list_portfolio(store_path)
    if args.make_variants:
        from meta_db.variants import make_variants, parse_spec
        from tools.tf_support import require_tensorflow

        require_tensorflow("variants are AutoDL datasets, read and written with it")

        if not args.variants_out:
            raise UserInputError("--make-variants needs --variants-out DIR")
        specs = [parse_spec(text) for text in args.variant or []]
        made = make_variants(args.make_variants, args.variants_out, args.per_dataset, seed=args.seed, specs=specs)
        print(f"{len(made)} variant dataset(s) under {args.variants_out}")
        return 0
    if args.import_npz:
        from tools.import_npz import import_npz_bench

        n = import_npz_bench(args.import_npz, store_path, seed=args.seed, code_version=args.code_version)
        print(f"{n} bench-npz run(s) stored in {store_path} (seed {args.seed})")
        return 0
    if args.import_bench:
        if not args.no_data_features:
            from tools.tf_support import require_tensorflow

            require_tensorflow("the data meta-features read the datasets' TFRecords; or pass --no-data-features")
        n = import_bench(args.import_bench, store_path, with_data_features=not args.no_data_features,
                         landmark_backbone=None if args.no_data_features else args.landmark_backbone,
                         seed=args.seed)
        print(f"{n} bench run(s) stored in {store_path} (seed {args.seed})")
        return 0
    if (args.evaluate or args.drop_study or args.lodo_stores or args.retire_code or args.restore_code
            or args.retire_pipeline or args.restore_pipeline) and not store_path.is_file():
        raise UserInputError(f"store not found: {store_path}")  # these modes read an existing store
    if args.evaluate:
        from meta_db.evaluate import evaluate_store

        rows, text = evaluate_store(store_path, time_budget=args.time_budget, hardware=args.hardware, k=args.k,
                                    out=args.report, method=args.selector, machine_instance=args.machine_instance)
        print(text)
        return 0 if rows else 3
    if args.drop_study:
        from meta_db.store import Store

        with Store(store_path) as store:
            print(f"{store.delete_runs(args.drop_study)} run(s) of study {args.drop_study!r} removed from {store_path}")
        return 0
    if args.retire_code or args.restore_code:
        from meta_db.store import Store

        with Store(store_path) as store:
            try:
                if args.retire_code:
                    n = store.retire_code(args.retire_code, args.reason)
                    print(f"{n} run(s) retired in {store_path} (code {', '.join(args.retire_code)}: {args.reason})")
                else:
                    n = store.restore_code(args.restore_code)
                    print(f"{n} run(s) back in use in {store_path}")
            except ValueError as exc:
                raise UserInputError(str(exc)) from None
            summary = store.summary()
        print(f"runs: {summary['runs']}, retired: {summary['retired_runs']} "
              f"(code versions {json.dumps(summary['retired_code'])})")
        return 0
    if args.retire_pipeline or args.restore_pipeline:
        return retire_or_restore_pipelines(store_path, args.retire_pipeline, args.restore_pipeline, args.reason)
    if args.lodo_stores:
        for family, path, choice in write_lodo_stores(store_path, args.lodo_stores, k=args.k, method=args.selector):
            print(f"{family}\t{path}\t{choice}")
        return 0
    storage_url = args.storage or default_storage_url(Path(args.out))
    if args.sync or args.status:
        coordinator = Coordinator(storage_url, args.study)
        if args.sync:
            print(f"{sync_store(coordinator, store_path)} run(s) merged into {store_path}")
        print(json.dumps(coordinator.status(), sort_keys=True))
        return 0
    if not args.datasets or args.time_budget is None:
        raise UserInputError("meta-training needs --datasets DIR... and --time-budget T "
                             "(or one of --evaluate, --sync, --status, --make-variants, --list-portfolio)")
    if args.runner == DEFAULT_RUNNER or not args.no_data_features:
        from tools.tf_support import require_tensorflow

        require_tensorflow("meta-training runs the kit's ingestion loop on AutoDL datasets")
    from meta_db.metafeatures import hardware_profile

    hardware = hardware_profile(measure_backbone=None if args.no_throughput else "mobilenetv2_100")
    meta_train(args.datasets, _pipelines_from_args(args.pipelines, store_path), args.time_budget, store_path,
               out_dir=args.out, storage_url=storage_url, study_name=args.study, workers=args.workers,
               tf_mode=args.tf_mode, seed=args.seed, retry_failed=args.retry_failed, run_fn=args.runner,
               hardware=hardware, code_dir=args.code_dir, with_data_features=not args.no_data_features,
               landmark_backbone=None if args.no_data_features else args.landmark_backbone,
               init_limit=args.init_limit)
    # tasks still queued or running belong to other workers (or datasets this machine lacks): not an error here
    return 0


def register(subparsers) -> None:
    import argparse

    from meta_db.selector import DEFAULT_SELECTOR, SELECTORS

    parser = subparsers.add_parser("meta-train", help="run pipelines x datasets into the meta-knowledge store",
                                   description="\n\n".join(__doc__.split("\n\n")[:2]),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--evaluate", action="store_true", help="leave-one-dataset-out evaluation of the selector")
    mode.add_argument("--sync", action="store_true", help="merge the study's finished runs into the store")
    mode.add_argument("--status", action="store_true", help="print the study's task counts")
    mode.add_argument("--make-variants", nargs="+", metavar="SRC",
                      help="derive datasets from corpus folders (data.npz) or AutoDL folders")
    mode.add_argument("--import-bench", metavar="RESULTS_JSONL",
                      help="store our solver's runs from a `tools bench` results.jsonl (pipeline read from its logs)")
    mode.add_argument("--import-npz", metavar="RESULTS_JSONL",
                      help="store the GPU runs of a `tools bench-npz` results.jsonl as that hardware's stratum")
    mode.add_argument("--lodo-stores", metavar="DIR",
                      help="write DIR/<family>.sqlite: the store without each corpus family (end-to-end LODO)")
    mode.add_argument("--drop-study", metavar="STUDY",
                      help="remove the runs recorded under STUDY (e.g. bench:kit imports) from the store")
    mode.add_argument("--retire-code", nargs="+", metavar="COMMIT",
                      help="stop learning from the runs of these code versions (git commits or prefixes; "
                           "kept in the store, needs --reason)")
    mode.add_argument("--restore-code", nargs="+", metavar="COMMIT", help="learn from retired code versions again")
    mode.add_argument("--retire-pipeline", nargs="+", metavar="P",
                      help="the selector stops choosing these pipelines (portfolio names or ids; their runs stay; "
                           "needs --reason)")
    mode.add_argument("--restore-pipeline", nargs="+", metavar="P", help="let the selector choose retired pipelines again")
    mode.add_argument("--list-portfolio", action="store_true", help="print the portfolio's pipeline ids and names")
    parser.add_argument("--datasets", nargs="+", metavar="DIR",
                        help="AutoDL dataset folders, or folders holding several")
    parser.add_argument("--pipelines", nargs="+", default=["portfolio"], metavar="P",
                        help="'portfolio' (default), portfolio names or pipeline ids")
    parser.add_argument("--time-budget", type=float, help="time budget T in seconds per run")
    parser.add_argument("--store", help="store file (default meta_db/store.sqlite in the repository)")
    parser.add_argument("--storage", help="Optuna storage URL shared by the workers "
                                          "(default sqlite:///OUT/optuna.sqlite; postgresql://... for many machines)")
    parser.add_argument("--study", default=DEFAULT_STUDY, help="Optuna study name (default %(default)s)")
    parser.add_argument("--workers", type=int, default=1, help="local worker processes (default 1)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="run folders, default storage (default %(default)s)")
    parser.add_argument("--tf-mode", choices=("graph", "eager"), default="graph",
                        help="TensorFlow mode of the ingestion: graph (default; TF1 semantics, as the challenge "
                             "platform runs the kit) or eager (TF2)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed recorded with the runs (AUTODL_SEED); with --import-bench, a replicate's seed "
                             "(importing under the same seed replaces the run)")
    parser.add_argument("--retry-failed", action="store_true", help="rerun tasks whose harness failed before")
    parser.add_argument("--init-limit", type=float, default=1200.0, help="seconds allowed for Model.__init__")
    parser.add_argument("--code-dir", default=str(REPO_ROOT), help="folder with the model.py to run "
                                                                   "(default: this repository)")
    parser.add_argument("--no-data-features", action="store_true",
                        help="skip the data meta-features (first chunk + landmarkers) of new datasets")
    parser.add_argument("--landmark-backbone", default="mobilenetv2_100",
                        help="backbone of the frozen-feature landmarker (default %(default)s)")
    parser.add_argument("--no-throughput", action="store_true", help="skip measuring backbone throughput")
    parser.add_argument("--runner", default=DEFAULT_RUNNER, help=argparse.SUPPRESS)  # tests: a fake judge
    parser.add_argument("--code-version", help="--import-npz: the code version of rows that do not record one")
    parser.add_argument("--hardware", help="--evaluate: hardware stratum (default: as the selector chooses)")
    parser.add_argument("--machine-instance", metavar="BOOT_ID",
                        help="--evaluate: only the runs of this machine instance (a boot id prefix, as runs "
                             "record it): members compared on one machine")
    parser.add_argument("--k", type=int, default=5, help="--evaluate: neighbours (default %(default)s)")
    parser.add_argument("--selector", choices=sorted(SELECTORS), default=DEFAULT_SELECTOR,
                        help="--evaluate, --lodo-stores: which selector (default %(default)s)")
    parser.add_argument("--report", help="--evaluate: also write the markdown table to this file")
    parser.add_argument("--reason", help="--retire-code, --retire-pipeline: why (kept in the store)")
    parser.add_argument("--variants-out", help="--make-variants: output folder")
    parser.add_argument("--per-dataset", type=int, default=3, help="--make-variants: random variants per source")
    parser.add_argument("--variant", action="append", metavar="SPEC",
                        help="--make-variants: this derivation instead of random ones, e.g. "
                             "side=8,train_fraction=0.2 (keys classes, train_fraction, side, grayscale, seed; "
                             "repeatable)")
    parser.set_defaults(func=_cli)
