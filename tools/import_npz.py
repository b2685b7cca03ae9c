"""Store the runs of `tools bench-npz` in the meta-knowledge store, as the stratum of the device they ran on.

Why: runs measured on a GPU (where TensorFlow, and so the kit, cannot run) are the only knowledge the
selector can have of that hardware; rankings measured on a 2-core CPU do not transfer there. A GPU
row becomes a run of the stratum (T, `cuda-<gpu name>`), marked `tf_mode = "npz"` (played in-process
by `tools run-npz`, not by the kit). CPU rows are skipped: the CPU strata learn from kit runs only.

    tools meta-train --import-npz OUT/results.jsonl [--seed N] [--store FILE]

A row names its pipeline by `pipeline_config` (rows since bench-npz recorded it) or by the bench's
named pipelines (`default`, `cpu-path`); its dataset by name, which must be in the store already
(the corpus datasets are) or be readable from the row's `dataset_dir` (a corpus data.npz folder).
"""
from __future__ import annotations

import json
from pathlib import Path

from tools.errors import UserInputError


def pipeline_of(row: dict):
    """The PipelineConfig a bench-npz row ran, or None when it cannot be known."""
    from autodl_core.config import PipelineConfig
    from tools.bench_npz import NAMED_PIPELINES

    config = row.get("pipeline_config")
    try:
        if config is not None:  # the whole pipeline as the run recorded it
            return PipelineConfig.from_record(config)
        if row.get("pipeline") in NAMED_PIPELINES:  # a name of bench-npz's: its fields over the defaults
            named = NAMED_PIPELINES[row["pipeline"]]
            return PipelineConfig.from_dict({} if named is None else json.loads(named))
    except (TypeError, ValueError):
        return None
    return None


def dataset_record_of(row: dict, store):
    """The store's record of the row's dataset: the stored one, else built from its corpus folder."""
    from meta_db.metafeatures import metadata_features
    from meta_db.store import DatasetRecord

    stored = store.get_dataset(row["dataset"])
    if stored is not None:
        return stored
    folder = Path(row.get("dataset_dir") or "")
    if not (folder / "data.npz").is_file():
        return None
    from autodl_core.arrays import ArrayMetadata
    from autodl_data.corpus_npz import corpus_origin, load_corpus_npz
    from meta_db.sources import corpus_reference

    train, _, info = load_corpus_npz(folder)
    return DatasetRecord(dataset_id=row["dataset"], name=row["dataset"], parent_id=None, family_id=row["dataset"],
                         derivation=None, source=corpus_reference(corpus_origin(info, folder.name)),
                         metadata_features=metadata_features(ArrayMetadata(train, info["name"])))


def import_npz_bench(results_path, store_path, seed: int = 0, code_version: str | None = None, log=print) -> int:
    """Store the GPU rows of a bench-npz results.jsonl; returns how many runs were stored."""
    from meta_db.metafeatures import hardware_key
    from meta_db.portfolio import name_of
    from meta_db.store import RunRecord, Store

    results_path = Path(results_path)
    if not results_path.is_file():
        raise UserInputError(f"bench-npz results not found: {results_path}")
    try:
        rows = [json.loads(line) for line in results_path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise UserInputError(f"{results_path}: not a JSON-lines file ({exc})") from None
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
            record = dataset_record_of(row, store)
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
