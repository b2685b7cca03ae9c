"""Building the store from measurements: dataset records, their data meta-features, runs with the dataset
and pipeline they refer to, merges of many runs, bench results, and which pipelines the store may choose.

What `tools meta-train` writes into the store goes through here; the command line (tools/meta_train.py)
only decides what to run and reads its inputs (bench results files, the study of the job queue).
Offline only: the submission never imports this module (it reads AutoDL folders and the data).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from autodl_core.config import PipelineConfig
from meta_db.portfolio import known_members, resolve_pipelines
from meta_db.store import DatasetRecord, RunRecord, Store


# ---------------------------------------------------------------------- datasets


def dataset_record(dataset_dir: Path, data_features: dict | None = None) -> DatasetRecord:
    """The store's record of an AutoDL dataset folder: metadata features of the train split, parent if a variant."""
    from meta_db.metafeatures import metadata_features
    from meta_db.sources import portable_source
    from meta_db.variants import parent_of
    from autodl_data.autodl_format import AutoDLMetadata, find_task

    task = find_task(dataset_dir)
    parent, family, derivation = parent_of(dataset_dir)
    return DatasetRecord(dataset_id=task.name, name=task.name, parent_id=parent, family_id=family or "",
                         derivation=derivation, source=portable_source(dataset_dir, task.name),
                         metadata_features=metadata_features(AutoDLMetadata(task.train_dir)),
                         data_features=data_features)


def add_data_features(record: DatasetRecord, dataset_dir: Path, store: Store, compute: bool,
                      landmark_backbone: str | None, log=print) -> None:
    """The record's data meta-features: those already in the store, else computed (when `compute`)."""
    stored = store.get_dataset(record.dataset_id)
    if stored is not None and stored.data_features:
        record.data_features = stored.data_features
    elif compute:
        log(f"[meta-train] data meta-features of {record.dataset_id} ...")
        record.data_features = compute_data_features(dataset_dir, landmark_backbone)


def register_datasets_and_pipelines(store_path, dataset_dirs, pipelines, with_data_features: bool,
                                    landmark_backbone: str | None, log=print) -> dict:
    """Before meta-training queues its runs: every dataset folder's record (with its data meta-features) and
    every (name, PipelineConfig) of `pipelines` in the store; returns {dataset_id: (record, folder)}.
    ValueError when two folders hold tasks of one name."""
    records = {}
    with Store(store_path) as store:
        for d in dataset_dirs:
            record = dataset_record(d)
            if record.dataset_id in records:
                raise ValueError(f"two dataset folders hold tasks named {record.dataset_id!r}: "
                                 f"{records[record.dataset_id][1]} and {d}")
            add_data_features(record, d, store, with_data_features, landmark_backbone, log)
            store.upsert_dataset(record)
            records[record.dataset_id] = (record, d)
        for name, config in pipelines:
            store.upsert_pipeline(config, name=name)
    return records


def compute_data_features(dataset_dir: Path, landmark_backbone: str | None = None) -> dict:
    import torch  # noqa: F401  (torch, then dynamo/triton, before TensorFlow: see the notes on triton)

    try:
        import torch._dynamo  # noqa: F401
    except Exception:
        pass
    from meta_db.metafeatures import data_features, read_first_chunk

    images, labels = read_first_chunk(dataset_dir)
    return data_features(images, labels, landmark_backbone=landmark_backbone)


# ---------------------------------------------------------------------- runs


def run_record(result: dict, **fields) -> RunRecord:
    """A judge's result (tools.runner.run_local, or a `tools bench` row: same keys) as a RunRecord."""
    return RunRecord(**fields, status=str(result.get("status") or "unknown"), alc=result.get("alc"),
                     final_nauc=result.get("final_nauc"), n_predictions=result.get("n_predictions"),
                     timestamps=list(result.get("timestamps") or []), scores=list(result.get("naucs") or []),
                     time_to_first_prediction=result.get("time_to_first_prediction"),
                     peak_rss_bytes=result.get("peak_rss_bytes"), init_seconds=result.get("init_seconds"),
                     wall_time=result.get("wall_time"), error=result.get("error"))


def record_measurement(store: Store, run: RunRecord, dataset: dict | None, pipeline_name: str | None,
                       pipeline_config: dict) -> None:
    """One run with what it refers to: its dataset (DatasetRecord fields, when given) and its pipeline
    (a PipelineConfig dict) are stored first, as the store refuses a run of an unknown one."""
    if dataset:
        store.upsert_dataset(DatasetRecord(**dataset))
    store.upsert_pipeline(PipelineConfig.from_dict(pipeline_config), name=pipeline_name)
    store.record_run(run)


def merge_runs(store_path, measurements) -> int:
    """Store every (RunRecord, dataset fields, pipeline name, pipeline config dict) of `measurements` in one
    transaction (all of them or none); returns how many. Idempotent: runs are keyed by `RunRecord.run_key`."""
    merged = 0
    with Store(store_path) as store, store.batch():
        for run, dataset, pipeline_name, pipeline_config in measurements:
            record_measurement(store, run, dataset, pipeline_name, pipeline_config)
            merged += 1
    return merged


# ---------------------------------------------------------------------- bench results


def import_bench_rows(rows, store_path, hardware: dict, background_limit: float, with_data_features: bool = True,
                      landmark_backbone: str | None = None, seed: int = 0, log=print) -> int:
    """Store our solver's rows of `tools bench` results (the latest row of each bench key) as runs of
    this machine's stratum (`hardware`: `hardware_profile()`); returns how many were stored.

    A bench row is the same measurement as a meta-training run (one solver, one dataset, one budget,
    scored by the same ALC), so the bench's runs of the solver need not be run again. Rows are taken
    only when the ingestion log named the pipeline (bench records it) and that pipeline is in the
    portfolio or the store, only on the machine type the bench ran on (same CPU count / device), and
    not when the bench saw other processes use more than `background_limit` of the machine meanwhile.
    A run is keyed by dataset, pipeline, budget, seed and machine type: importing a rerun under the
    same `seed` replaces the earlier one; a replicate needs its own `seed`.
    """
    imported = 0
    with Store(store_path) as store:
        known = {config.pipeline_id(): (name, config) for name, config in known_members().items()}
        for pipeline_id, (name, config) in stored_pipelines(store).items():
            known.setdefault(pipeline_id, (name, config))
        for row in rows:
            what = f"{row['solver']} on {row['dataset']}"
            if row["solver"].startswith("kit:") or row.get("status") == "judge_failed":
                continue
            background = row.get("background_cpu")
            if background is not None and background > background_limit:
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


def corpus_dataset_record(dataset_id: str, folder: Path) -> DatasetRecord | None:
    """The store's record of a corpus data.npz folder (a run played in-process, not through an AutoDL
    folder), or None when the folder holds no data.npz."""
    if not (folder / "data.npz").is_file():
        return None
    from autodl_core.arrays import ArrayMetadata
    from autodl_data.corpus_npz import corpus_origin, load_corpus_npz
    from meta_db.metafeatures import metadata_features
    from meta_db.sources import corpus_reference

    train, _, info = load_corpus_npz(folder)
    return DatasetRecord(dataset_id=dataset_id, name=dataset_id, parent_id=None, family_id=dataset_id,
                         derivation=None, source=corpus_reference(corpus_origin(info, folder.name)),
                         metadata_features=metadata_features(ArrayMetadata(train, info["name"])))


def import_npz_rows(rows, store_path, pipeline_of, seed: int = 0, code_version: str | None = None,
                    log=print) -> int:
    """Store the GPU rows of `tools bench-npz` results as runs of the stratum (T, `cuda-<gpu name>`), marked
    `tf_mode = "npz"`; returns how many were stored. `pipeline_of(row)`: the PipelineConfig the row ran, or
    None (the bench's own pipeline names are the caller's). CPU rows are skipped: the CPU strata learn from
    kit runs only. A row's dataset is the stored one of its name, else built from its `dataset_dir`."""
    from meta_db.metafeatures import hardware_key
    from meta_db.portfolio import name_of

    stored = 0
    with Store(store_path) as store:
        for row in rows:
            what = f"{row.get('pipeline')} on {row.get('dataset')}"
            device = row.get("device") or "cpu"
            if device == "cpu":
                log(f"[import-npz] skip {what}: measured on a CPU (CPU strata learn from kit runs)")
                continue
            config = pipeline_of(row)
            if config is None:
                log(f"[import-npz] skip {what}: its pipeline is not recorded")
                continue
            record = store.get_dataset(row["dataset"])
            if record is None:
                record = corpus_dataset_record(row["dataset"], Path(row.get("dataset_dir") or ""))
            if record is None:
                log(f"[import-npz] skip {what}: dataset not in the store and no data.npz folder recorded")
                continue
            store.upsert_dataset(record)
            pipeline_id = config.pipeline_id()
            store.upsert_pipeline(config, name=name_of(pipeline_id) or f"npz:{row['pipeline']}")
            hardware = hardware_key("cuda", 0, device)
            store.record_run(RunRecord(
                dataset_id=record.dataset_id, pipeline_id=pipeline_id, time_budget=float(row["time_budget"]),
                hardware=hardware, status=str(row.get("status") or "unknown"), alc=row.get("alc"),
                final_nauc=row.get("final_nauc"), n_predictions=row.get("n_predictions"),
                timestamps=list(row.get("timestamps") or []), scores=list(row.get("naucs") or []),
                time_to_first_prediction=row.get("first_prediction_s"), init_seconds=row.get("init_s"),
                error=row.get("error"), seed=int(seed), tf_mode="npz",
                code_version=row.get("code_version") or code_version,
                hardware_info={"kind": "cuda", "gpu": device, "key": hardware}, study="bench-npz",
                worker=row.get("pipeline")))
            stored += 1
    return stored


# ---------------------------------------------------------------------- pipelines


def stored_pipelines(store: Store) -> dict:
    """{pipeline_id: (name, PipelineConfig)} of the store's pipelines this code can parse."""
    known = {}
    for pipeline_id, name, raw in store.pipelines():
        try:
            known[pipeline_id] = (name, PipelineConfig.from_record(raw))
        except (TypeError, ValueError):  # a record of newer code: not usable here
            continue
    return known


def retire_or_restore_pipelines(store_path, retire: list[str] | None, restore: list[str] | None,
                                reason: str | None, log=print) -> int:
    """`--retire-pipeline` / `--restore-pipeline`: names or ids resolved as `--pipelines` resolves them.
    ValueError names what could not be resolved, retired or restored."""
    specs = retire or restore
    with Store(store_path) as store:  # writable first: an older file is upgraded before it is read
        known = {pipeline_id: config for pipeline_id, (_, config) in stored_pipelines(store).items()}
        ids = [config.pipeline_id() for _, config in resolve_pipelines(specs, known)]
        if retire:
            n = store.retire_pipelines(ids, reason)
            log(f"retired {', '.join(specs)} in {store_path}: the selector no longer chooses them "
                f"({n} run(s) kept; {reason})")
        else:
            n = store.restore_pipelines(ids)
            log(f"{', '.join(specs)} may be chosen again ({n} run(s) in use)")
        log(f"retired pipelines: {json.dumps(store.retired_pipelines())}")
    return 0
