"""meta_db: store schema and round trip, zero-shot features, portfolio, selector, leave-one-dataset-out.

All on synthetic stores written here (no corpus, no TensorFlow, no torch): fast.
"""
import json
import math
import sqlite3
import time

import numpy as np
import pytest

from autodl_core.config import PipelineConfig
from meta_db import selector as sel
from meta_db.evaluate import evaluate_store, leave_one_dataset_out, markdown_report, write_lodo_stores
from meta_db.knowledge import ENV_BUDGET, NOISE_PRIOR_DOF, NOISE_SD_PRIOR, Knowledge, best_fixed, load_knowledge
from meta_db.selectors import (ENV_SELECTOR, NearestNeighbourSelector, RidgeGapSelector, best_first, comparative_rows,
                               make_selector)
from meta_db.metafeatures import (ZERO_SHOT_FEATURES, ZERO_SHOT_NAMES, hardware_key, metadata_features,
                                  zero_shot_metadata, zero_shot_of, zero_shot_vector)
from meta_db.portfolio import PORTFOLIO, STRATEGIES, name_of, portfolio_ids, resolve_pipelines
from meta_db.store import (HARNESS_ERROR, SCHEMA_VERSION, DatasetRecord, RunRecord, Store, StoreVersionError,
                           task_key)

A = PORTFOLIO["mnv2-top-r32"]  # best on small grayscale sets in the synthetic store
B = PORTFOLIO["lite0-finetune-r96"]  # best on large colour sets
C = PORTFOLIO["mnv2-probe"]  # mediocre everywhere, best on the odd family
DEFAULT = PORTFOLIO["default"]


class FakeMetadata:
    """The kit's metadata methods the selector uses."""

    def __init__(self, n_train, n_classes, rows, cols, channels):
        self.n, self.k, self.shape, self.c = n_train, n_classes, (rows, cols), channels

    def size(self):
        return self.n

    def get_output_size(self):
        return self.k

    def get_matrix_size(self, bundle_index=0):
        return self.shape

    def get_num_channels(self, bundle_index=0):
        return self.c


def features(n, k, side, channels, rows=None):
    return {"n_train": n, "n_classes": k, "rows": rows if rows is not None else side, "cols": side,
            "channels": channels, "variable_size": side <= 0}


def on_device(monkeypatch, kind):
    """As on a `kind` machine: the stratum load_knowledge reads and the selector's cache key."""
    monkeypatch.setattr("meta_db.knowledge.current_device_kind", lambda: kind)
    monkeypatch.setattr(sel, "current_device_kind", lambda: kind)


def add_dataset(store, dataset_id, feats, alcs, budget=300.0, hardware="cpu2", family=None, parent=None):
    store.upsert_dataset(DatasetRecord(dataset_id, feats, parent_id=parent, family_id=family or ""))
    for config, alc in alcs.items():
        store.record_run(RunRecord(dataset_id, config.pipeline_id(), budget, hardware, "ok", alc=alc,
                                   timestamps=[1.0, 5.0], scores=[0.2, alc]))


@pytest.fixture()
def synthetic_store(tmp_path):
    """Two clear clusters: small grayscale (A best) and large colour (B best)."""
    path = tmp_path / "store.sqlite"
    rng = np.random.default_rng(0)
    with Store(path) as store, store.batch():
        for name, config in PORTFOLIO.items():
            store.upsert_pipeline(config, name)
        for i in range(5):
            add_dataset(store, f"gray{i}", features(int(rng.integers(800, 3000)), 10, int(rng.choice([28, 32])), 1),
                        {A: 0.80 + 0.01 * i, B: 0.60, C: 0.70, DEFAULT: 0.72})
            add_dataset(store, f"color{i}", features(int(rng.integers(20000, 60000)), 5, int(rng.choice([64, 96])), 3),
                        {A: 0.55, B: 0.85 + 0.01 * i, C: 0.65, DEFAULT: 0.75})
    return path


# ---------------------------------------------------------------------- store


def test_store_schema_created_versioned_and_reopened(tmp_path):
    path = tmp_path / "s.sqlite"
    with Store(path) as store:
        assert store.schema_version() == SCHEMA_VERSION
        tables = {r[0] for r in store.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"store_info", "datasets", "pipelines", "runs"} <= tables
        info = dict(store.conn.execute("SELECT key, value FROM store_info").fetchall())
        assert info["schema_version"] == str(SCHEMA_VERSION) and "created_at" in info
    with Store(path, readonly=True) as store:  # reopening changes nothing
        assert store.summary()["runs"] == 0
        with pytest.raises(PermissionError):
            store.upsert_pipeline(DEFAULT)


def test_store_upgrades_old_and_refuses_newer_files(tmp_path):
    old = tmp_path / "old.sqlite"
    sqlite3.connect(old).close()  # version 0: an empty file
    with pytest.raises(StoreVersionError, match="open it writable"):
        Store(old, readonly=True)
    with Store(old) as store:
        assert store.schema_version() == SCHEMA_VERSION
    newer = tmp_path / "newer.sqlite"
    conn = sqlite3.connect(newer)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreVersionError, match="update the code"):
        Store(newer)
    with pytest.raises(FileNotFoundError):
        Store(tmp_path / "missing.sqlite", readonly=True)


def test_store_round_trip_and_queries(tmp_path):
    with Store(tmp_path / "s.sqlite") as store:
        feats = features(1000, 10, 28, 1)
        store.upsert_dataset(DatasetRecord("mnist", feats, data_features={"pixel_mean": 0.13}))
        store.upsert_dataset(DatasetRecord("mnist__c5-r1", feats, parent_id="mnist", derivation={"classes": 5}))
        store.upsert_dataset(DatasetRecord("mnist", feats))  # no data features given: the stored ones stay
        assert store.get_dataset("mnist").data_features == {"pixel_mean": 0.13}
        variant = store.get_dataset("mnist__c5-r1")
        assert variant.parent_id == "mnist" and variant.family_id == "mnist" and variant.derivation == {"classes": 5}
        assert store.get_dataset("nothing") is None

        pid = store.upsert_pipeline(A, "r32")
        assert pid == A.pipeline_id() and store.get_pipeline(pid) == A
        assert store.pipelines() == [(pid, "r32", A.to_dict())]

        run = RunRecord("mnist", pid, 300, "cpu2", "ok", alc=0.71, final_nauc=float("nan"), n_predictions=4,
                        timestamps=[2.0, 9.5], scores=[0.3, float("nan")], time_to_first_prediction=2.0,
                        peak_rss_bytes=123, code_version="abc", hardware_info={"kind": "cpu", "cpu_count": 2})
        store.record_run(run)
        got = store.runs(dataset_id="mnist")[0]
        assert got.alc == pytest.approx(0.71) and got.final_nauc is None  # NaN is stored as NULL
        assert got.timestamps == [2.0, 9.5] and got.scores == [0.3, None]
        assert got.hardware_info == {"kind": "cpu", "cpu_count": 2} and got.code_version == "abc"
        assert got.run_key() == task_key("mnist", pid, 300, 0, "graph", "cpu2")
        store.record_run(RunRecord("mnist", pid, 300, "cpu2", "ok", alc=0.75))  # same key: replaces
        assert [r.alc for r in store.runs()] == [pytest.approx(0.75)]
        store.record_run(RunRecord("mnist", pid, 600, "cpu2", HARNESS_ERROR, error="boom"))
        assert store.has_run(task_key("mnist", pid, 600, 0, "graph", "cpu2"))
        assert store.runs(status=HARNESS_ERROR)[0].error == "boom"
        assert store.alc_table() == {("mnist", pid): pytest.approx(0.75)}  # harness errors are no measurement
        assert store.runs(time_budget=600, hardware="cpu2")[0].status == HARNESS_ERROR
        with pytest.raises(KeyError, match="unknown dataset_id"):
            store.record_run(RunRecord("ghost", pid, 300, "cpu2", "ok", alc=0.1))
        summary = store.summary()
        assert summary["runs"] == 2 and summary["datasets"] == 2 and summary["time_budgets"] == [300.0, 600.0]


def add_gray_and_color(store):
    """Two datasets of one shape and pipelines A and DEFAULT: what the retirement tests measure on."""
    for name in ("gray", "color"):
        store.upsert_dataset(DatasetRecord(name, features(1000, 10, 28, 1)))
    for config in (A, DEFAULT):
        store.upsert_pipeline(config)


def test_retired_code_versions_stay_recorded_but_are_not_learned_from(tmp_path):
    path = tmp_path / "s.sqlite"
    with Store(path) as store:
        add_gray_and_color(store)
        old = dict(code_version="aaaa1111")
        store.record_run(RunRecord("gray", A.pipeline_id(), 300, "cpu2", "ok", alc=0.9, **old))
        store.record_run(RunRecord("color", A.pipeline_id(), 300, "cpu2", "ok", alc=0.9, **old))
        store.record_run(RunRecord("gray", DEFAULT.pipeline_id(), 300, "cpu2", "ok", alc=0.7, code_version="bbbb2222"))
        store.record_run(RunRecord("color", DEFAULT.pipeline_id(), 300, "cpu2", "ok", alc=0.8,
                                   code_version="bbbb2222+dirty"))
        assert len(store.measured_keys()) == 4
        assert store.retire_code(["AAAA"], "the 0.1.9 solver") == 2  # a prefix, any case
        assert store.retire_code(["aaaa1111"], "again") == 0  # nothing more to retire
        assert store.alc_table() == {("gray", DEFAULT.pipeline_id()): pytest.approx(0.7),
                                     ("color", DEFAULT.pipeline_id()): pytest.approx(0.8)}
        assert len(store.runs()) == 4  # kept: the record of what was measured
        assert task_key("gray", A.pipeline_id(), 300, 0, "graph", "cpu2") not in store.measured_keys()
        # a run recorded later by a retired version is retired too
        store.record_run(RunRecord("gray", A.pipeline_id(), 300, "cpu2", "ok", alc=0.95, seed=1, **old))
        assert ("gray", A.pipeline_id()) not in store.alc_table()
        summary = store.summary()
        assert summary["retired_runs"] == 3 and set(summary["retired_code"]) == {"aaaa", "aaaa1111"}
        with pytest.raises(ValueError, match="reason"):
            store.retire_code(["bbbb"], " ")
        with pytest.raises(ValueError, match="hex digits"):
            store.retire_code(["bb%"], "wildcards are not commits")
        with pytest.raises(ValueError, match="at least one"):
            store.retire_code([], "nothing named")
    knowledge = load_knowledge(path, time_budget=300, hardware="cpu2")
    assert knowledge.pipeline_ids == [DEFAULT.pipeline_id()]  # A's cells were all retired code
    with Store(path, readonly=True) as store:
        assert [pipeline_id for pipeline_id, _, _ in store.pipelines_in_use()] == [DEFAULT.pipeline_id()]
    with Store(path) as store:
        with pytest.raises(ValueError, match="not retired"):
            store.restore_code(["cccc"])
        assert store.restore_code(["aaaa", "aaaa1111"]) == 3
        assert store.alc_table()[("gray", A.pipeline_id())] == pytest.approx(0.925)  # both seeds back
    assert sorted(load_knowledge(path, time_budget=300, hardware="cpu2").pipeline_ids) == \
        sorted([A.pipeline_id(), DEFAULT.pipeline_id()])


def test_retired_pipelines_keep_their_runs_but_are_never_chosen(tmp_path, capsys):
    from tools.cli import main

    path = tmp_path / "s.sqlite"
    with Store(path) as store:
        add_gray_and_color(store)
        store.record_run(RunRecord("gray", A.pipeline_id(), 300, "cpu2", "ok", alc=0.9))
        store.record_run(RunRecord("color", A.pipeline_id(), 300, "cpu2", "ok", alc=0.9))
        store.record_run(RunRecord("gray", DEFAULT.pipeline_id(), 300, "cpu2", "ok", alc=0.7))
        store.record_run(RunRecord("color", DEFAULT.pipeline_id(), 300, "cpu2", "ok", alc=0.8))
        with pytest.raises(ValueError, match="reason"):
            store.retire_pipelines([A.pipeline_id()], "")
        with pytest.raises(ValueError, match="not in the store"):
            store.retire_pipelines(["0123456789ab"], "unknown")
    knowledge = load_knowledge(path, time_budget=300, hardware="cpu2")
    assert make_selector(knowledge).choose(zero_shot_vector(features(1000, 10, 28, 1)))[0] == A.pipeline_id()
    # by portfolio name, through the command line
    assert main(["meta-train", "--retire-pipeline", "mnv2-top-r32", "--store", str(path)]) == 2  # no reason
    assert main(["meta-train", "--retire-pipeline", "mnv2-top-r32", "--reason", "never wins",
                 "--store", str(path)]) == 0
    assert "2 run(s) kept" in capsys.readouterr().out
    with Store(path) as store:
        assert store.retired_pipelines() == {A.pipeline_id(): "never wins"}
        assert len(store.measured_keys()) == 4  # still measured: meta-training does not redo them
        assert store.summary()["retired_pipelines"] == {A.pipeline_id(): "never wins"}
        in_use = {pipeline_id for pipeline_id, _, _ in store.pipelines_in_use()}  # what `tools package` ships for
    knowledge = load_knowledge(path, time_budget=300, hardware="cpu2")
    assert knowledge.pipeline_ids == [DEFAULT.pipeline_id()] == sorted(in_use)
    assert make_selector(knowledge).choose(zero_shot_vector(features(1000, 10, 28, 1)))[0] == DEFAULT.pipeline_id()
    assert main(["meta-train", "--restore-pipeline", "mnv2-probe", "--store", str(path)]) == 2  # not stored
    assert main(["meta-train", "--restore-pipeline", A.pipeline_id(), "--store", str(path)]) == 0
    with Store(path) as store:
        assert store.retired_pipelines() == {}
        with pytest.raises(ValueError, match="not retired"):
            store.restore_pipelines([A.pipeline_id()])
        in_use = {pipeline_id for pipeline_id, _, _ in store.pipelines_in_use()}
    assert len(load_knowledge(path, time_budget=300, hardware="cpu2").pipeline_ids) == 2
    assert in_use == {A.pipeline_id(), DEFAULT.pipeline_id()}


def test_one_machine_view_keeps_only_that_instances_runs(tmp_path, capsys):
    """Two machines of one stratum key can rank members apart; --machine-instance shows one machine's view."""
    from tools.cli import main

    path = tmp_path / "s.sqlite"
    xeon, epyc = {"machine_instance": "0a1b2c3d"}, {"machine_instance": "9f8e7d6c"}
    with Store(path) as store:
        add_gray_and_color(store)
        store.upsert_pipeline(B)
        for dataset, a_xeon, a_epyc in (("gray", 0.95, 0.80), ("color", 0.96, 0.81)):
            store.record_run(RunRecord(dataset, A.pipeline_id(), 300, "cpu2", "ok", alc=a_xeon, hardware_info=xeon))
            store.record_run(RunRecord(dataset, A.pipeline_id(), 300, "cpu2", "ok", alc=a_epyc, seed=1,
                                       hardware_info=epyc))
            store.record_run(RunRecord(dataset, DEFAULT.pipeline_id(), 300, "cpu2", "ok", alc=0.85,
                                       hardware_info=epyc))
        store.record_run(RunRecord("gray", B.pipeline_id(), 300, "cpu2", "ok", alc=0.99))  # no instance recorded
    mixed = load_knowledge(path, time_budget=300, hardware="cpu2")
    one = load_knowledge(path, time_budget=300, hardware="cpu2", machine_instance="9f8e")
    a, default = mixed.pipeline_ids.index(A.pipeline_id()), mixed.pipeline_ids.index(DEFAULT.pipeline_id())
    assert mixed.alc[0, a] > mixed.alc[0, default]  # mixed machines: A ahead on its Xeon runs
    assert B.pipeline_id() in mixed.pipeline_ids and B.pipeline_id() not in one.pipeline_ids
    a, default = one.pipeline_ids.index(A.pipeline_id()), one.pipeline_ids.index(DEFAULT.pipeline_id())
    assert one.alc[:, a].tolist() == pytest.approx([0.81, 0.80]) and (one.alc[:, default] == 0.85).all()
    assert load_knowledge(path, time_budget=300, hardware="cpu2", machine_instance="9F8E").pipeline_ids == \
        one.pipeline_ids  # case does not matter
    assert load_knowledge(path, time_budget=300, hardware="cpu2", machine_instance="%").pipeline_ids == []
    assert main(["meta-train", "--evaluate", "--store", str(path), "--time-budget", "300", "--hardware", "cpu2",
                 "--machine-instance", "9f8e7d6c"]) == 0
    assert "Runs of machine instance 9f8e7d6c only." in capsys.readouterr().out


def test_store_upgrades_a_version_1_file_keeping_its_runs(tmp_path):
    from meta_db.store import MIGRATIONS

    path = tmp_path / "v1.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript(MIGRATIONS[0])
    conn.execute("PRAGMA user_version = 1")
    conn.execute("INSERT INTO datasets VALUES ('d', 'd', NULL, 'd', NULL, NULL, '{}', NULL, 'now')")
    conn.execute("INSERT INTO pipelines VALUES ('p', 'p', '{}', 'now')")
    conn.execute("INSERT INTO runs(run_key, dataset_id, pipeline_id, time_budget, hardware, status, alc, "
                 "code_version) VALUES ('k', 'd', 'p', 300, 'cpu2', 'ok', 0.5, 'abcd123')")
    conn.commit()
    conn.close()
    with Store(path) as store:
        assert store.schema_version() == SCHEMA_VERSION == 3
        assert store.retired_code() == {} and store.alc_table() == {("d", "p"): pytest.approx(0.5)}
        assert store.retire_code(["abcd"], "old") == 1
        assert store.retired_pipelines() == {} and store.retire_pipelines(["p"], "dropped") == 0  # its run: old code


def test_store_answers_cell_means_and_batch_runs(tmp_path):
    """What the selector and the batch comparison read, asked of the store (no SQL outside it)."""
    with Store(tmp_path / "s.sqlite") as store:
        store.upsert_dataset(DatasetRecord("d", features(1000, 10, 28, 1)))
        store.upsert_pipeline(A)
        for seed, alc, code, instance in ((0, 0.8, "aaaa111", "0a1b2c3d"), (1, 0.6, "aaaa111", None),
                                          (2, 0.1, "bbbb222", "0a1b2c3d")):
            store.record_run(RunRecord("d", A.pipeline_id(), 300, "cpu2", "ok", alc=alc, seed=seed, code_version=code,
                                       hardware_info={"machine_instance": instance} if instance else None))
        store.record_run(RunRecord("d", A.pipeline_id(), 300, "cpu2", HARNESS_ERROR, seed=3))
        store.retire_code(["bbbb"], "an older solver")
        [cell] = store.cell_means()  # the harness error and the retired run left out
        assert (cell.dataset_id, cell.time_budget, cell.hardware, cell.n) == ("d", 300.0, "cpu2", 2)
        assert math.isclose(cell.alc, 0.7) and math.isclose(cell.alc2, 0.5)
        assert [c.n for c in store.cell_means(machine_instance="0A1B")] == [1]
        runs = sorted(store.batch_runs(300, "cpu2"), key=lambda r: r.alc)
        assert [(r.batch, r.retired) for r in runs] == [("bbbb222@0a1b2c3d", True), ("aaaa111", False),
                                                        ("aaaa111@0a1b2c3d", False)]
        assert store.batch_runs(60, "cpu2") == []


# ---------------------------------------------------------------------- meta-features and portfolio


def test_zero_shot_vector():
    fixed = zero_shot_vector(metadata_features(FakeMetadata(1000, 10, 28, 28, 1)))
    assert fixed.shape == (len(ZERO_SHOT_NAMES),)
    assert fixed[0] == pytest.approx(3.0) and fixed[1] == pytest.approx(1.0)
    assert fixed[3] == pytest.approx(math.log2(28))
    assert fixed[5] == 0.0 and fixed[6] == 0.0
    variable = zero_shot_vector(metadata_features(FakeMetadata(500, 4, -1, -1, 3)))
    assert variable[6] == 1.0 and variable[5] == 1.0 and np.all(np.isfinite(variable))
    with pytest.raises(ValueError, match="n_train >= 1"):
        zero_shot_vector(features(0, 10, 28, 1))
    with pytest.raises(ValueError, match="incomplete"):
        zero_shot_vector({"n_train": 10})
    assert hardware_key("cpu", 8) == "cpu8" and hardware_key("cuda", 16, "NVIDIA H200") == "cuda-nvidia-h200"


def test_zero_shot_features_are_one_ordered_registry():
    """One function per meta-feature; the names and the vector both come from the registry, in its order."""
    assert ZERO_SHOT_NAMES == tuple(ZERO_SHOT_FEATURES) == (
        "log_n_train", "log_n_classes", "log_examples_per_class", "log_side", "log_aspect", "color", "variable_size")
    meta = FakeMetadata(1000, 10, 56, 28, 3)
    vector = zero_shot_of(meta)
    assert np.array_equal(vector, zero_shot_vector(metadata_features(meta)))
    checked = zero_shot_metadata(metadata_features(meta))
    assert vector.tolist() == [feature(checked) for feature in ZERO_SHOT_FEATURES.values()]
    assert vector[ZERO_SHOT_NAMES.index("log_aspect")] == pytest.approx(1.0)  # 56 x 28: twice as tall as wide


def test_portfolio_is_small_valid_and_resolvable():
    ids = portfolio_ids()
    # small: every member costs one run per dataset and budget (13 x 11 x 5 min = 12 h on this machine)
    assert 8 <= len(ids) <= 18 and len(set(ids.values())) == len(ids)
    for name, config in PORTFOLIO.items():
        assert PipelineConfig.from_dict(json.loads(json.dumps(config.to_dict()))).pipeline_id() == ids[name]
        assert config.strategy in STRATEGIES
        assert config.backbone in ("mobilenetv2_100", "efficientnet_lite0")
        assert name_of(ids[name]) == name
    assert len(resolve_pipelines(["portfolio"])) == len(ids)
    assert [n for n, _ in resolve_pipelines(["mnv2-probe", ids["default"], "mnv2-probe"])] == ["mnv2-probe", "default"]
    custom = PipelineConfig(lr=0.123)
    assert resolve_pipelines([custom.pipeline_id()], {custom.pipeline_id(): custom})[0][1] == custom
    with pytest.raises(ValueError, match="unknown pipeline"):
        resolve_pipelines(["nope"])


# ---------------------------------------------------------------------- selector


def test_selector_picks_the_known_answer(synthetic_store):
    config, reason = sel.select_pipeline(FakeMetadata(1500, 10, 28, 28, 1), store=synthetic_store)
    assert config == A and "nearest datasets" in reason and "gray" in reason
    config, reason = sel.select_pipeline(FakeMetadata(40000, 5, 80, 80, 3), store=synthetic_store)
    assert config == B and "color" in reason


def test_selector_handles_out_of_range_metadata(synthetic_store):
    # a billion 4000-px images with 5000 classes: far from everything -> the best pipeline on average
    config, reason = sel.select_pipeline(FakeMetadata(10**9, 5000, 4000, 4000, 3), store=synthetic_store)
    assert "best on average" in reason and config in (A, B, C, DEFAULT)
    knowledge = load_knowledge(synthetic_store)
    assert config.pipeline_id() == best_fixed(knowledge)  # one definition of "best on average"
    selector = NearestNeighbourSelector(knowledge)
    assert selector.choose(np.full(len(ZERO_SHOT_NAMES), np.nan))[1].endswith("unusable meta-features)")
    # garbage metadata never breaks the solver
    config, reason = sel.select_pipeline(FakeMetadata(0, 0, 0, 0, 0), store=synthetic_store)
    assert config == PipelineConfig() and "metadata unusable" in reason


def test_selector_falls_back_without_a_usable_store(tmp_path, monkeypatch):
    meta = FakeMetadata(1000, 10, 28, 28, 1)
    config, reason = sel.select_pipeline(meta, store=tmp_path / "missing.sqlite")
    assert config == PipelineConfig() and "no meta-knowledge store" in reason
    with Store(tmp_path / "empty.sqlite"):
        pass
    config, reason = sel.select_pipeline(meta, store=tmp_path / "empty.sqlite")
    assert config == PipelineConfig() and "no usable run" in reason
    broken = tmp_path / "broken.sqlite"
    broken.write_bytes(b"this is not an sqlite file" * 100)
    config, reason = sel.select_pipeline(meta, store=broken)
    assert config == PipelineConfig() and "store unusable" in reason
    monkeypatch.setenv(sel.ENV_STORE, str(tmp_path / "missing-too.sqlite"))
    assert "missing-too" in sel.select_pipeline(meta)[1]


def test_selector_skips_pipelines_this_code_cannot_run(synthetic_store):
    with Store(synthetic_store) as store:  # a record from a future code version with an unknown field
        store.conn.execute("UPDATE pipelines SET config = ? WHERE pipeline_id = ?",
                           (json.dumps({**A.to_dict(), "future_field": 1}), A.pipeline_id()))
    config, _ = sel.select_pipeline(FakeMetadata(1500, 10, 28, 28, 1), store=synthetic_store)
    assert config != A
    knowledge = load_knowledge(synthetic_store, backbone_ok=lambda name: name != "efficientnet_lite0")
    assert B.pipeline_id() not in knowledge.pipeline_ids


def test_forced_pipeline(tmp_path, monkeypatch, synthetic_store):
    meta = FakeMetadata(1500, 10, 28, 28, 1)
    monkeypatch.setenv(sel.ENV_PIPELINE, json.dumps(C.to_dict()))
    assert sel.select_pipeline(meta, store=synthetic_store) == (C, f"forced by {sel.ENV_PIPELINE}")
    path = tmp_path / "p.json"
    path.write_text(json.dumps(B.to_dict()))
    monkeypatch.setenv(sel.ENV_PIPELINE, str(path))
    assert sel.select_pipeline(meta)[0] == B
    for bad, message in ((str(tmp_path / "none.json"), "neither a JSON object"), ("{oops", "not valid JSON"),
                         (json.dumps({"lr": 0.1, "bogus": 1}), "not a valid PipelineConfig")):
        monkeypatch.setenv(sel.ENV_PIPELINE, bad)
        with pytest.raises(ValueError, match=message):
            sel.select_pipeline(meta)


def test_selector_uses_the_stratum_of_this_machine_and_budget(tmp_path, monkeypatch):
    path = tmp_path / "s.sqlite"
    with Store(path) as store:
        feats = features(1000, 10, 28, 1)
        store.upsert_dataset(DatasetRecord("d", feats))
        for config in (A, B, C):
            store.upsert_pipeline(config)
        for config, alc in ((A, 0.9), (B, 0.5)):
            store.record_run(RunRecord("d", config.pipeline_id(), 300, "cpu2", "ok", alc=alc))
        for config, alc in ((A, 0.5), (B, 0.9)):
            store.record_run(RunRecord("d", config.pipeline_id(), 300, "cuda-h200", "ok", alc=alc))
        store.record_run(RunRecord("d", C.pipeline_id(), 60, "cpu2", "ok", alc=0.99))
    meta = FakeMetadata(1000, 10, 28, 28, 1)
    on_device(monkeypatch, "cpu")
    config, reason = sel.select_pipeline(meta, store=path)
    assert config == A and "T=300s, cpu2" in reason  # 300 s is nearer 1200 s than 60 s
    monkeypatch.setenv(ENV_BUDGET, "50")
    assert sel.select_pipeline(meta, store=path)[0] == C
    monkeypatch.delenv(ENV_BUDGET)
    on_device(monkeypatch, "cuda")
    assert sel.select_pipeline(meta, store=path)[0] == B


def test_selector_is_fast_on_a_full_size_store(tmp_path):
    path = tmp_path / "big.sqlite"
    rng = np.random.default_rng(1)
    with Store(path) as store, store.batch():  # one transaction, as a merge of many runs writes them
        for name, config in PORTFOLIO.items():
            store.upsert_pipeline(config, name)
        for i in range(150):  # ~ 10 corpus datasets x 15 variants
            f = features(int(rng.integers(100, 60000)), int(rng.integers(2, 50)), int(rng.choice([8, 28, 64, 100])),
                         int(rng.choice([1, 3])))
            store.upsert_dataset(DatasetRecord(f"d{i}", f, parent_id=f"p{i // 15}"))
            for config in PORTFOLIO.values():
                store.record_run(RunRecord(f"d{i}", config.pipeline_id(), 300, "cpu2", "ok", alc=float(rng.random()),
                                           timestamps=list(range(30)), scores=[0.5] * 30))
    sel._CACHE.clear()
    started = time.perf_counter()
    config, reason = sel.select_pipeline(FakeMetadata(5000, 10, 32, 32, 3), store=path)
    first = time.perf_counter() - started
    started = time.perf_counter()
    sel.select_pipeline(FakeMetadata(5000, 10, 32, 32, 3), store=path)
    again = time.perf_counter() - started
    assert "nearest datasets" in reason and config in PORTFOLIO.values()
    assert first < 1.0 and again < 0.05, (first, again)


# ---------------------------------------------------------------------- leave-one-dataset-out


def test_lodo_on_a_synthetic_store(synthetic_store, tmp_path):
    with Store(synthetic_store) as store:
        # An odd family (huge class count) where C wins, with a variant that would leak the answer
        # if leave-one-dataset-out did not drop the held-out dataset's whole family.
        add_dataset(store, "odd", features(3000, 200, 48, 3), {A: 0.6, B: 0.6, C: 0.9, DEFAULT: 0.5})
        add_dataset(store, "odd__c150", features(2500, 150, 48, 3), {A: 0.6, B: 0.6, C: 0.9, DEFAULT: 0.5},
                    parent="odd")
    knowledge = load_knowledge(synthetic_store)
    assert knowledge.families[knowledge.dataset_ids.index("odd__c150")] == "odd"
    rows = {r.dataset_id: r for r in leave_one_dataset_out(knowledge, k=3, default_id=DEFAULT.pipeline_id())}
    assert len(rows) == 12
    for i in range(5):
        assert rows[f"gray{i}"].selected == A.pipeline_id() and rows[f"gray{i}"].regret_selected == pytest.approx(0)
        assert rows[f"color{i}"].selected == B.pipeline_id() and rows[f"color{i}"].regret_selected == pytest.approx(0)
    assert rows["odd"].selected != C.pipeline_id() and rows["odd"].oracle == C.pipeline_id()
    assert rows["odd"].regret_selected > 0.2
    # the single best fixed pipeline cannot fit both clusters: it regrets on one of them
    assert sum(r.regret_fixed for r in rows.values()) > sum(r.regret_selected for r in rows.values())
    assert rows["gray0"].default_alc == pytest.approx(0.72)
    text = markdown_report(list(rows.values()), knowledge, k=3)
    assert "| gray0 | mnv2-top-r32 | 0.8000 |" in text and "wins" in text
    # the headline mean is over the 11 original datasets; the variant row is listed and averaged apart
    originals = [r for r in rows.values() if r.is_original]
    assert len(originals) == 11 and not rows["odd__c150"].is_original
    headline = next(line for line in text.splitlines() if line.startswith("| **mean** (11)"))
    assert f"{np.mean([r.selected_alc for r in originals]):.4f}" in headline
    assert "| **mean, variants** (1) |" in text and "Variant rows (1)" in text
    # the noise beside the table: runs per cell, each dataset's run-to-run SD, the SE of the headline gain
    assert "| runs sel./fixed | noise SD |" in text and "standard error from run-to-run noise" in text
    _, written = evaluate_store(synthetic_store, k=3, out=tmp_path / "lodo.md")
    assert (tmp_path / "lodo.md").read_text() == written


def test_lodo_noise_counts_only_rows_where_the_choices_differ(synthetic_store):
    from meta_db.evaluate import LodoRow, Noise

    knowledge = load_knowledge(synthetic_store)
    noise = Noise(knowledge)
    a, b = A.pipeline_id(), B.pipeline_id()

    def row(dataset_id, selected, fixed):
        return LodoRow(dataset_id, dataset_id, selected, 0.8, fixed, 0.7, a, 0.8, None, "neighbours")

    same, differ = row("gray0", a, a), row("color0", a, b)
    assert noise.difference_se([same]) == 0.0  # one cell on both sides: the difference has no noise
    sd = noise.sd("color0")
    assert sd > 0
    # one run per cell in the synthetic store: SE of the mean over these rows = sd * sqrt(1 + 1) / 2
    assert noise.difference_se([same, differ]) == pytest.approx(sd * np.sqrt(2.0) / 2)
    assert noise.runs("color0", a) == "1" and noise.runs("color0", None) == "-"
    assert "standard error from run-to-run noise" in noise.summary([same, differ])


def test_lodo_stores_leave_each_family_out(synthetic_store, tmp_path):
    with Store(synthetic_store) as store:
        add_dataset(store, "gray0__c5", features(700, 5, 28, 1), {A: 0.9, B: 0.5}, parent="gray0")
    written = {family: (path, choice) for family, path, choice in write_lodo_stores(synthetic_store, tmp_path / "lodo",
                                                                                      k=3)}
    assert set(written) == {f"gray{i}" for i in range(5)} | {f"color{i}" for i in range(5)}
    path, choice = written["gray0"]
    with Store(path, readonly=True) as held_out, Store(synthetic_store, readonly=True) as full:
        kept = {d.dataset_id for d in held_out.datasets()}
        assert "gray0" not in kept and "gray0__c5" not in kept and "gray1" in kept
        assert not held_out.runs(dataset_id="gray0") and not held_out.runs(dataset_id="gray0__c5")
        assert len(held_out.runs()) == len(full.runs()) - 6  # 4 pipelines on gray0, 2 on its variant
    assert choice.startswith("mnv2-top-r32") and "gray0" not in choice.split("nearest datasets")[1]
    assert written["color3"][1].startswith("lite0-finetune-r96")
    # the solver, pointed at a held-out store, chooses what the table says
    config, _ = sel.select_pipeline(FakeMetadata(1500, 10, 28, 28, 1), store=path)
    assert config == A
    with pytest.raises(ValueError, match="overwrite"):
        with Store(synthetic_store, readonly=True) as store:
            store.copy_without_family("gray0", synthetic_store)


def test_runs_of_one_study_can_be_forgotten(synthetic_store):
    with Store(synthetic_store) as store:
        n = len(store.runs())
        store.record_run(RunRecord("gray0", A.pipeline_id(), 300.0, "cpu2", "ok", alc=0.5, seed=1, study="bench:kit",
                                   timestamps=[1.0], scores=[0.5]))
        assert len(store.runs()) == n + 1
        assert store.delete_runs("bench:kit") == 1 and store.delete_runs("bench:kit") == 0
        assert len(store.runs()) == n and len(store.runs(dataset_id="gray0")) == 4


def test_best_fixed_needs_coverage():
    knowledge = Knowledge(["a", "b", "c"], ["a", "b", "c"], np.zeros((3, len(ZERO_SHOT_NAMES))), ["p", "q"],
                              {}, np.array([[0.5, 0.99], [0.5, np.nan], [0.5, np.nan]]))
    assert best_fixed(knowledge) == "p"  # q looks better but was measured on one dataset of three


def test_best_fixed_coverage_counts_families_not_variants():
    # p and q were measured on big's five variants too, r on the three originals only: 3 datasets of 8,
    # which a dataset count rejected (then q won), although r measured every family, and leads on each
    ids = ["big"] + [f"big__v{i}" for i in range(5)] + ["small0", "small1"]
    families = ["big"] * 6 + ["small0", "small1"]
    alc = np.array([[0.80, 0.79, 0.82]] + [[0.80, 0.81, np.nan]] * 5 + [[0.90, 0.90, 0.93]] * 2)
    knowledge = Knowledge(ids, families, np.zeros((len(ids), len(ZERO_SHOT_NAMES))), ["p", "q", "r"], {}, alc)
    assert best_fixed(knowledge) == "r"  # compared on the three originals, the datasets all three share


def test_best_fixed_compares_pipelines_on_the_same_datasets():
    # p was also run on a hard dataset (c) that q was not: on the common datasets p is better
    alc = np.array([[0.9, 0.85], [0.9, 0.85], [0.3, np.nan]])
    knowledge = Knowledge(["a", "b", "c"], ["a", "b", "c"], np.zeros((3, len(ZERO_SHOT_NAMES))), ["p", "q"],
                              {}, alc)
    assert best_fixed(knowledge) == "p"


# ---------------------------------------------------------------------- learned ranking (ridge)


def _one_feature_store(path, trend: bool):
    """Datasets spread over size and class count; colour alone decides (trend) or nothing does (no trend).

    Nearest neighbours are misled here: each colour dataset's nearest datasets are grey ones of a
    similar size. The ridge selector must find that only colour matters.
    """
    rng = np.random.default_rng(1)
    with Store(path) as store, store.batch():
        for name, config in PORTFOLIO.items():
            store.upsert_pipeline(config, name)
        for i in range(12):
            colour = i % 4 == 0  # a minority: 3 colour sets among 12
            n = int(10 ** rng.uniform(3, 4.7))
            feats = features(n, int(rng.choice([5, 10, 40])), int(rng.choice([28, 32, 64])), 3 if colour else 1)
            if trend:
                noise = 0.002 * rng.standard_normal(2)
                alcs = {A: 0.90 + (-0.02 if colour else 0.01) + noise[0],
                        B: 0.90 + (0.02 if colour else -0.005) + noise[1]}
            else:  # B better everywhere by a margin that does not depend on any meta-feature
                noise = 0.0003 * rng.standard_normal(2)
                alcs = {A: 0.90 + noise[0], B: 0.903 + noise[1]}
            add_dataset(store, f"set{i}", feats, alcs)
    return load_knowledge(path)


def test_ridge_selector_learns_which_feature_matters(tmp_path):
    knowledge = _one_feature_store(tmp_path / "s.sqlite", trend=True)
    rows = {r.dataset_id: r for r in leave_one_dataset_out(knowledge, method="ridge")}
    colour = [f"set{i}" for i in range(12) if i % 4 == 0]
    assert all(rows[d].selected == B.pipeline_id() for d in colour)
    assert all(rows[d].selected == A.pipeline_id() for d in rows if d not in colour)
    assert np.mean([r.regret_selected for r in rows.values()]) < np.mean([r.regret_fixed for r in rows.values()])
    selector = RidgeGapSelector(knowledge)
    assert math.isfinite(selector.lam)  # the trend is real: a finite penalty wins the store's own cross-validation
    pipeline_id, reason = selector.choose(zero_shot_vector(features(5000, 10, 32, 3)))
    assert pipeline_id == B.pipeline_id() and "ridge" in reason


def test_ridge_selector_without_a_trend_is_the_best_fixed_pipeline(tmp_path):
    knowledge = _one_feature_store(tmp_path / "s.sqlite", trend=False)
    selector = RidgeGapSelector(knowledge)
    assert math.isinf(selector.lam)  # every penalty chooses alike: the simplest model wins the tie
    fixed = best_fixed(knowledge)
    assert fixed == B.pipeline_id()
    for d in range(12):
        assert selector.choose(knowledge.features[d])[0] == fixed


def test_ridge_selector_stays_sane_far_from_the_store(synthetic_store):
    selector = make_selector(load_knowledge(synthetic_store), "ridge")
    assert isinstance(selector, RidgeGapSelector)
    ranking, info = selector.rank(zero_shot_vector(features(10**9, 5000, 4000, 3)))
    assert info["mode"] == "global" and ranking  # beyond the stored range: the best on average
    # inside the range, predictions never claim to beat the best pipeline (gaps are <= 0)
    ranking, info = selector.rank(zero_shot_vector(features(2000, 10, 28, 1)))
    assert info["mode"] == "ridge" and all(score <= 0 for _, score in ranking)
    assert ranking[0][0] == A.pipeline_id()


def test_selector_method_is_chosen_by_name(synthetic_store, monkeypatch):
    with pytest.raises(ValueError, match="unknown selector 'svm'"):
        make_selector(load_knowledge(synthetic_store), "svm")
    monkeypatch.setenv(ENV_SELECTOR, "ridge")
    config, reason = sel.select_pipeline(FakeMetadata(1500, 10, 28, 28, 1), store=synthetic_store)
    assert config == A and "ridge" in reason
    monkeypatch.setenv(ENV_SELECTOR, "svm")  # a bad value inside a run: default pipeline, reason says why
    config, reason = sel.select_pipeline(FakeMetadata(1500, 10, 28, 28, 1), store=synthetic_store)
    assert config == PipelineConfig() and "unknown selector 'svm'" in reason


# ---------------------------------------------------------------------- noise guard (neighbours)


def _near_tie_store(path, lead: float, replicate_spread: float, colour_spread: float | None = None):
    """DEFAULT is best on average; A leads it by `lead` on the grey cluster and loses badly on colour.
    Every cell is run twice, `replicate_spread` apart (`colour_spread` on the colour cluster, if given):
    the store's own measure of run-to-run noise."""
    with Store(path) as store, store.batch():
        for name, config in PORTFOLIO.items():
            store.upsert_pipeline(config, name)
        for i in range(5):
            for dataset_id, feats, alcs, spread in (
                    (f"gray{i}", features(1000 + 300 * i, 10, 28, 1), {DEFAULT: 0.90, A: 0.90 + lead},
                     replicate_spread),
                    (f"color{i}", features(30000 + 5000 * i, 5, 64, 3), {DEFAULT: 0.90, A: 0.80},
                     replicate_spread if colour_spread is None else colour_spread)):
                store.upsert_dataset(DatasetRecord(dataset_id, feats))
                for config, alc in alcs.items():
                    for seed, sign in ((0, -1), (1, 1)):
                        store.record_run(RunRecord(dataset_id, config.pipeline_id(), 300.0, "cpu2", "ok", seed=seed,
                                                   alc=alc + sign * spread / 2,
                                                   timestamps=[1.0], scores=[alc]))
    return path


def test_noise_sd_is_pooled_from_replicates_else_the_prior(tmp_path):
    knowledge = load_knowledge(_near_tie_store(tmp_path / "s.sqlite", 0.01, 0.004), 300.0, "cpu2")
    assert knowledge.noise_sd() == pytest.approx(0.004 / math.sqrt(2), rel=1e-3)  # a pair d apart: SD d/sqrt(2)
    single = Knowledge(["a"], ["a"], np.zeros((1, len(ZERO_SHOT_NAMES))), ["p"], {}, np.array([[0.5]]))
    assert single.noise_sd() == NOISE_SD_PRIOR


def test_noise_is_estimated_per_dataset_shrunk_toward_the_typical_one(tmp_path):
    knowledge = load_knowledge(_near_tie_store(tmp_path / "s.sqlite", 0.01, 0.0002, colour_spread=0.04),
                                   300.0, "cpu2")
    grey = np.array([d.startswith("gray") for d in knowledge.dataset_ids])
    typical_var = (0.0002 ** 2 / 2 + 0.04 ** 2 / 2) / 2  # the median of five quiet and five noisy datasets
    assert knowledge.noise_sd() == pytest.approx(math.sqrt(typical_var), rel=1e-3)
    by_dataset = knowledge.noise_sd_by_dataset()
    prior = NOISE_PRIOR_DOF
    for mask, own in ((grey, 0.0002 ** 2 / 2), (~grey, 0.04 ** 2 / 2)):  # two cells, one replicate each
        assert by_dataset[mask] == pytest.approx(math.sqrt((2 * own + prior * typical_var) / (2 + prior)), rel=1e-3)
    # no replicates anywhere: every dataset gets the prior
    single = Knowledge(["a", "b"], ["a", "b"], np.zeros((2, len(ZERO_SHOT_NAMES))), ["p"], {},
                           np.array([[0.5], [0.6]]), runs=np.ones((2, 1), dtype=int), sq_dev=np.zeros((2, 1)))
    assert np.allclose(single.noise_sd_by_dataset(), NOISE_SD_PRIOR)


def test_a_lead_on_noisy_neighbours_counts_less_than_on_quiet_ones(tmp_path):
    """The same lead of A on the grey neighbours and the same typical noise: real where the grey sets'
    reruns agree, within the noise where they scatter (a pooled SD could not tell the two apart)."""
    query = FakeMetadata(1500, 10, 28, 28, 1)  # in the grey cluster
    quiet = _near_tie_store(tmp_path / "quiet.sqlite", 0.008, 0.0002, colour_spread=0.04)
    config, reason = sel.select_pipeline(query, store=quiet)
    assert config == A and "noise" not in reason, reason
    sel._CACHE.clear()
    noisy = _near_tie_store(tmp_path / "noisy.sqlite", 0.008, 0.04, colour_spread=0.0002)
    config, reason = sel.select_pipeline(query, store=noisy)
    assert config == DEFAULT and "within run-to-run noise" in reason, reason


def test_neighbours_keep_the_best_pipeline_on_average_against_a_lead_within_noise(tmp_path):
    query = FakeMetadata(1500, 10, 28, 28, 1)  # in the grey cluster
    # A leads by 0.001 on every grey neighbour, reruns differ by 0.01: noise, the overall best stays
    noisy = _near_tie_store(tmp_path / "noisy.sqlite", 0.001, 0.01)
    config, reason = sel.select_pipeline(query, store=noisy)
    assert config == DEFAULT and "within run-to-run noise" in reason, reason
    # the same lead with reruns 0.0002 apart is real: A is chosen
    sel._CACHE.clear()
    clean = _near_tie_store(tmp_path / "clean.sqlite", 0.001, 0.0002)
    config, reason = sel.select_pipeline(query, store=clean)
    assert config == A and "noise" not in reason, reason


def test_a_dataset_with_one_measured_pipeline_does_not_vote(synthetic_store):
    # right where the query is, a dataset measured with C alone: its "gap 0" compares C with nothing
    with Store(synthetic_store) as store:
        add_dataset(store, "lonely", features(1500, 10, 28, 1), {C: 0.40})
    knowledge = load_knowledge(synthetic_store)
    assert "lonely" in knowledge.dataset_ids
    query = zero_shot_vector(features(1500, 10, 28, 1))
    for method in ("knn", "ridge"):
        selector = make_selector(knowledge, method, k=1)
        assert "lonely" not in selector.knowledge.dataset_ids
        assert selector.choose(query)[0] == A.pipeline_id(), method
    # with no comparison anywhere, what was run is still known (the fallback's ranking)
    only_one = knowledge.subset(np.array([d == "lonely" for d in knowledge.dataset_ids]))
    assert comparative_rows(only_one.alc).tolist() == [True]
    assert NearestNeighbourSelector(only_one).choose(query)[0] == C.pipeline_id()


def _variant_heavy_store(path):
    """Family "big" has four variants and prefers B; three single-dataset families prefer A."""
    with Store(path) as store, store.batch():
        for name, config in PORTFOLIO.items():
            store.upsert_pipeline(config, name)
        add_dataset(store, "big", features(40000, 5, 64, 3), {A: 0.70, B: 0.90}, family="big")
        for i in range(4):
            add_dataset(store, f"big__v{i}", features(4000 + 1000 * i, 5, 64, 3), {A: 0.70, B: 0.90},
                        family="big", parent="big")
        for i in range(3):
            add_dataset(store, f"small{i}", features(1000 + 500 * i, 10, 28, 1), {A: 0.90, B: 0.80},
                        family=f"small{i}")
    return path


def test_each_family_counts_once_whatever_its_variants(tmp_path):
    knowledge = load_knowledge(_variant_heavy_store(tmp_path / "s.sqlite"))
    weights = dict(zip(knowledge.dataset_ids, knowledge.family_weights()))
    assert weights["big"] == weights["big__v0"] == pytest.approx(0.2) and weights["small0"] == 1.0
    # over a subset (the datasets one pipeline was measured on), a family counts once among those
    rows = [knowledge.dataset_ids.index(d) for d in ("big", "big__v1", "small0")]
    assert knowledge.family_weights(rows).tolist() == [0.5, 0.5, 1.0]
    # per dataset B would be best on average (5 x +0.20 against 3 x -0.10); per family A is (3 x 0.10 against 0.20)
    assert best_fixed(knowledge) == A.pipeline_id()
    selector = NearestNeighbourSelector(knowledge, k=2)
    assert best_first(selector.global_scores, {})[0][0] == A.pipeline_id()
    # among the k nearest, one family's variants share its vote: four variants of "big" (B) and one
    # small family (A), equally near, are one vote each
    selector = NearestNeighbourSelector(knowledge, k=5)
    rows = np.array([knowledge.dataset_ids.index(d) for d in ("big__v0", "big__v1", "big__v2", "big__v3",
                                                               "small0")])
    scores = selector._aggregate(np.ones(5), rows, by_family=True)
    assert scores[A.pipeline_id()] == pytest.approx(-0.10) and scores[B.pipeline_id()] == pytest.approx(-0.05)
    advantage, _ = selector.paired_advantage(A.pipeline_id(), B.pipeline_id(), rows, np.ones(5))
    assert advantage == pytest.approx((0.10 - 0.20) / 2)


def test_ridge_weighs_families_not_datasets(tmp_path):
    knowledge = load_knowledge(_variant_heavy_store(tmp_path / "s.sqlite"))
    selector = RidgeGapSelector(knowledge, lam=math.inf)  # no trend: the family-weighted mean gaps
    b_a, _, _ = selector.models[A.pipeline_id()]
    b_b, _, _ = selector.models[B.pipeline_id()]
    assert b_a == pytest.approx((3 * 0.0 - 0.20) / 4) and b_b == pytest.approx((3 * -0.10 + 0.0) / 4)


def test_batch_offsets_flag_a_batch_that_sits_below_the_others(tmp_path):
    from meta_db.batches import batch_offsets, markdown_batches

    path = tmp_path / "s.sqlite"
    datasets = [f"d{i}" for i in range(6)]
    with Store(path) as store:
        for name in datasets:
            store.upsert_dataset(DatasetRecord(name, features(1000, 10, 28, 1)))
        for config in (A, DEFAULT):
            store.upsert_pipeline(config)

        def run(dataset_id, config, alc, batch, seed):
            store.record_run(RunRecord(dataset_id, config.pipeline_id(), 300, "cpu2", "ok", alc=alc, seed=seed,
                                       code_version=batch, finished_at=f"2026-12-0{seed + 1}T10:00:00+00:00"))

        rng = np.random.default_rng(0)
        for i, name in enumerate(datasets):
            for config in (A, DEFAULT):
                truth = 0.8 + 0.02 * i
                run(name, config, truth + rng.normal(0, 0.003), "aaaa1111", 0)  # the reference batch
                run(name, config, truth + rng.normal(0, 0.003), "bbbb2222", 1)  # noise only
                run(name, config, truth - 0.05 + rng.normal(0, 0.003), "cccc3333", 2)  # a slow machine
        run("d0", A, 0.8, "dddd4444", 3)  # one run: too few to judge
        store.retire_code(["eeee"], "an old solver")
        run("d1", A, 0.1, "eeee5555", 4)  # retired: judged against the batches in use, never a reference
        store.record_run(RunRecord("d2", A.pipeline_id(), 300, "cpu2", "ok", alc=0.84, seed=9, code_version="ffff6666",
                                   hardware_info={"machine_instance": "0a1b2c3d"}, finished_at="2026-12-09T10:00:00+00:00"))  # a batch names its instance
    offsets = {o.code_version: o for o in batch_offsets(path, 300, "cpu2")}
    assert list(offsets)[:5] == ["aaaa1111", "bbbb2222", "cccc3333", "dddd4444", "eeee5555"]  # oldest first
    assert offsets["ffff6666@0a1b2c3d"].paired == 1
    slow, fine, single = offsets["cccc3333"], offsets["bbbb2222"], offsets["dddd4444"]
    # the fit puts the typical batch at 0 and the slow one 0.05 below (the others do not look high)
    assert slow.paired == 12 and slow.offset == pytest.approx(-0.05, abs=0.005)
    assert fine.offset == pytest.approx(0.0, abs=0.005) and offsets["aaaa1111"].offset == pytest.approx(0.0, abs=0.005)
    assert slow.suspect(run_sd=0.005) and not fine.suspect(run_sd=0.005)
    assert not slow.suspect(run_sd=0.1)  # an offset within one run's noise is not a batch effect
    assert single.paired == 1 and not single.suspect(run_sd=0.0)
    retired = offsets["eeee5555"]
    assert retired.retired and retired.paired == 1 and retired.offset == pytest.approx(0.1 - 0.82, abs=0.01)
    table = markdown_batches(list(offsets.values()), run_sd=0.005)
    assert "| cccc3333 | 12 |" in table and "| -0.05" in table and "**suspect**" in table
    assert table.count("**suspect**") == 1 and "| eeee5555 | 1 |" in table and "| retired |" in table
    assert "## Measuring batches" in evaluate_store(path, time_budget=300, hardware="cpu2")[1]


def test_list_portfolio_marks_retired_pipelines(tmp_path, capsys):
    from tools.cli import main

    path = tmp_path / "s.sqlite"
    with Store(path) as store:
        add_gray_and_color(store)
        store.record_run(RunRecord("gray", A.pipeline_id(), 300, "cpu2", "ok", alc=0.9))
        store.retire_pipelines([A.pipeline_id()], "never wins")
    assert main(["meta-train", "--list-portfolio", "--store", str(path)]) == 0
    lines = {line.split()[1]: line for line in capsys.readouterr().out.splitlines()}
    assert set(lines) == set(PORTFOLIO)
    assert lines["mnv2-top-r32"].endswith("(retired) never wins")
    assert "(retired)" not in lines["default"]
    assert main(["meta-train", "--list-portfolio", "--store", str(tmp_path / "none.sqlite")]) == 0  # no store: none
    assert "(retired)" not in capsys.readouterr().out


def test_pipeline_fields_belong_to_stages_and_a_member_reads_as_what_it_changes():
    """Every field names its stage; the fields a run can still change after its probe are exactly the ones
    the second look (meta_db/second_choice.py) was built on; a member's changes are grouped by stage."""
    from dataclasses import fields

    from autodl_core.config import FINETUNE_FIELDS, STAGES, PipelineConfig, fields_of
    from meta_db.portfolio import PORTFOLIO

    named = [f.name for f in fields(PipelineConfig) if f.name != "extra"]
    assert sorted(n for stage in STAGES for n in fields_of(stage)) == sorted(named)
    assert FINETUNE_FIELDS == {
        "finetune_resolution", "lr", "top_lr", "top_dropout", "batch_size", "weight_decay", "ema_decay",
        "label_smoothing", "augment_flip", "augment_shift", "slice_growth", "first_slice_seconds",
        "patience_slices", "max_epochs_without_val", "flip_tta", "resolution_growth", "max_resolution_growths",
        "val_noise_z", "step_backbones", "max_step_side", "group_validation"}
    assert PipelineConfig().changes() == {} and PipelineConfig().describe() == "defaults"
    f96 = PORTFOLIO["mnv2-top-f96"].changes()
    assert f96["probe"] == {"strategy": "finetune_top"}
    assert f96["finetune"] == {"finetune_resolution": 96, "batch_size": 32}
    assert f96["steps"]["anytime_steps"] is False
    assert list(f96) == [s for s in STAGES if s in f96]  # in run order
    assert PORTFOLIO["mnv2-probe"].describe(PORTFOLIO["mnv2-top-lr2"]) == "probe: strategy=probe"
    with pytest.raises(ValueError, match="unknown stage"):
        fields_of("training")


def test_live_pipelines_are_in_use_readable_and_runnable_here():
    """The one rule the selector and the packager share: the store's pipelines in use, readable by this code,
    with a backbone that runs here (named as today's portfolio names them)."""
    from meta_db.portfolio import PORTFOLIO, live_pipelines

    f96 = PORTFOLIO["mnv2-top-f96"]
    lite0 = PORTFOLIO["lite0-top-f128"]
    in_use = [(f96.pipeline_id(), "old name", f96.to_dict()), (lite0.pipeline_id(), None, lite0.to_dict()),
              ("future", "from a later version", {"no_such_field": 1})]
    live = live_pipelines(in_use)
    assert list(live) == [f96.pipeline_id(), lite0.pipeline_id()]
    assert live[f96.pipeline_id()] == ("mnv2-top-f96", f96)
    only_mnv2 = live_pipelines(in_use, backbone_ok=lambda name: name == "mobilenetv2_100")
    assert list(only_mnv2) == [f96.pipeline_id()]
