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


def import_npz_bench(results_path, store_path, seed: int = 0, code_version: str | None = None, log=print) -> int:
    """Store the GPU rows of a bench-npz results.jsonl (meta_db.build.import_npz_rows); returns how many runs
    were stored."""
    from meta_db.build import import_npz_rows

    results_path = Path(results_path)
    if not results_path.is_file():
        raise UserInputError(f"bench-npz results not found: {results_path}")
    try:
        rows = [json.loads(line) for line in results_path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise UserInputError(f"{results_path}: not a JSON-lines file ({exc})") from None
    return import_npz_rows(rows, store_path, pipeline_of, seed=seed, code_version=code_version, log=log)
