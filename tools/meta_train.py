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

This module is the command line and the orchestration; the job queue (tasks, locks, workers) is
tools/meta_train_queue.py, and what goes into the store is meta_db/build.py.
"""
from __future__ import annotations

import json
import multiprocessing
import socket
from pathlib import Path

from tools.errors import UserInputError
from tools.meta_train_queue import (DEFAULT_RUNNER, DEFAULT_STUDY, Coordinator, Task, WorkerConfig,
                                    default_storage_url, worker_loop, worker_main)
from tools.shared_paths import REPO_ROOT
from tools.provenance import code_version

DEFAULT_OUT = Path("runs/meta-train")


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


def meta_train(dataset_dirs, pipelines, time_budget: float, store_path, out_dir=DEFAULT_OUT,
               storage_url: str | None = None, study_name: str = DEFAULT_STUDY, workers: int = 1,
               tf_mode: str = "graph", seed: int = 0, retry_failed: bool = False, run_fn=DEFAULT_RUNNER,
               hardware: dict | None = None, code_dir=REPO_ROOT, with_data_features: bool = False,
               landmark_backbone: str | None = None, init_limit: float = 1200.0, log=print) -> dict:
    """Enqueue the missing (dataset, pipeline) tasks, run them with `workers` local processes, merge the
    study into the store. `pipelines`: [(name, PipelineConfig)]. Returns counts and the study status."""
    import math

    from meta_db.build import register_datasets_and_pipelines
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
    try:
        records = register_datasets_and_pipelines(store_path, dirs, pipelines, with_data_features,
                                                  landmark_backbone, log)
    except ValueError as exc:
        raise UserInputError(str(exc)) from None
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
        procs = [context.Process(target=worker_main, args=(WorkerConfig(**cfg, worker_name=f"{host}-w{i}"),),
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
    """Store the runs of `tools bench` (OUT/results.jsonl): our solver's rows whose logged pipeline is known,
    the latest row of each bench key (`meta_db.build.import_bench_rows` says which rows are taken)."""
    from meta_db.build import import_bench_rows
    from meta_db.metafeatures import hardware_profile
    from tools.bench import load_results, row_key
    from tools.contention import BACKGROUND_LIMIT

    results_path = Path(results_path)
    if not results_path.is_file():
        raise UserInputError(f"bench results not found: {results_path}")
    hardware = hardware_profile()
    latest = {}
    for row in load_results(results_path):
        latest[row_key(row)] = row
    return import_bench_rows(latest.values(), store_path, hardware, BACKGROUND_LIMIT,
                             with_data_features=with_data_features, landmark_backbone=landmark_backbone, seed=seed,
                             log=log)


def sync_store(coordinator: Coordinator, store_path) -> int:
    """Copy every finished trial's run (and its dataset and pipeline) into the store; idempotent."""
    from meta_db.build import merge_runs
    from meta_db.store import RunRecord

    return merge_runs(store_path, ((RunRecord.from_dict(result), task.dataset, task.pipeline_name, task.config)
                                   for task, result in coordinator.measurements()))


# ---------------------------------------------------------------------- CLI


def _pipelines_from_args(specs, store_path):
    from meta_db.build import stored_pipelines
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


def list_portfolio(store_path, log=print) -> int:
    """`--list-portfolio`: id, name and what it changes against today's defaults (by stage) of each portfolio
    pipeline, "(retired)" where the store retired it (the selector no longer chooses it; `--restore-pipeline`
    undoes that)."""
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
        log(f"{pipeline_id}  {name:<16} {config.describe()}{mark}".rstrip())
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
        from meta_db.build import retire_or_restore_pipelines

        try:
            return retire_or_restore_pipelines(store_path, args.retire_pipeline, args.restore_pipeline, args.reason)
        except ValueError as exc:
            raise UserInputError(str(exc)) from None
    if args.lodo_stores:
        from meta_db.evaluate import write_lodo_stores

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

    from meta_db.selectors import DEFAULT_SELECTOR, SELECTORS

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
