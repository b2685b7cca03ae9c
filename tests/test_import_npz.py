"""GPU runs of `tools bench-npz` become their hardware's own stratum; CPU rankings never stand in for a GPU."""
from __future__ import annotations

import json

from autodl_core.config import PipelineConfig
from meta_db.knowledge import choose_stratum, load_knowledge
from meta_db.selectors import make_selector
from meta_db.store import DatasetRecord, RunRecord, Store
from tools.import_npz import import_npz_bench

CIFAR = {"channels": 3, "cols": 32, "n_classes": 10, "n_train": 50000, "rows": 32, "variable_size": False}
PNEUMONIA = {"channels": 1, "cols": 28, "n_classes": 2, "n_train": 5232, "rows": 28, "variable_size": False}


def row(dataset, pipeline, alc, device="NVIDIA H200", **extra):
    return {"dataset": dataset, "pipeline": pipeline, "time_budget": 120.0, "status": "ok", "alc": alc,
            "final_nauc": alc + 0.02, "first_prediction_s": 0.3, "n_predictions": 5, "device": device, **extra}


def make_store(path):
    with Store(path) as store:
        store.upsert_dataset(DatasetRecord("cifar10", CIFAR))
        store.upsert_dataset(DatasetRecord("pneumoniamnist", PNEUMONIA))
        cpu_default = PipelineConfig(strategy="finetune_top")
        store.upsert_pipeline(cpu_default, name="cpu")
        for dataset in ("cifar10", "pneumoniamnist"):  # a CPU stratum: it must not be used on a GPU
            store.record_run(RunRecord(dataset, cpu_default.pipeline_id(), 120.0, "cpu2", "ok", alc=0.9))


def test_gpu_rows_become_their_own_stratum_and_cpu_rows_are_skipped(tmp_path):
    store_path, results = tmp_path / "store.sqlite", tmp_path / "results.jsonl"
    make_store(store_path)
    rows = [row("cifar10", "default", 0.97, timestamps=[0.3, 9.0], naucs=[0.5, 0.98]),
            row("cifar10", "cpu-path", 0.95),
            row("pneumoniamnist", "default", 0.93), row("pneumoniamnist", "cpu-path", 0.86),
            row("cifar10", "default", 0.88, device="cpu"),
            row("cifar10", "mystery", 0.5),
            row("unknown_set", "default", 0.5)]
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    messages = []
    assert import_npz_bench(results, store_path, code_version="abc1234", log=messages.append) == 4
    assert any("measured on a CPU" in m for m in messages)
    assert any("pipeline is not recorded" in m for m in messages)
    assert any("dataset not in the store" in m for m in messages)
    with Store(store_path, readonly=True) as store:
        runs = [r for r in store.runs() if r.hardware != "cpu2"]
    assert {r.hardware for r in runs} == {"cuda-nvidia-h200"} and {r.tf_mode for r in runs} == {"npz"}
    assert {r.code_version for r in runs} == {"abc1234"}

    gpu = load_knowledge(store_path, device_kind="cuda", time_budget=1200.0)
    assert gpu.hardware == "cuda-nvidia-h200" and set(gpu.dataset_ids) == {"cifar10", "pneumoniamnist"}
    chosen, _ = make_selector(gpu).choose(gpu.features[0])
    assert chosen == PipelineConfig().pipeline_id()  # the GPU default won on both sets
    assert load_knowledge(store_path, device_kind="cpu", time_budget=1200.0).hardware == "cpu2"


def test_no_stratum_of_this_device_kind_means_none_not_the_cpus():
    strata = {(300.0, "cpu2"): 80, (60.0, "cpu2"): 10}
    assert choose_stratum(strata, "cuda", 1200.0) is None
    assert choose_stratum(strata, "cpu", 1200.0, cpu_count=2) == (300.0, "cpu2")
    assert choose_stratum({**strata, (120.0, "cuda-nvidia-h200"): 2}, "cuda", 1200.0) == (120.0, "cuda-nvidia-h200")
