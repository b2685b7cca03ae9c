"""The in-run second choice (meta_db/second_choice.py): which pipelines a run can still switch to, the
store's own verdict on whether landmarkers pay, and the callback the solver calls after its probe."""
from __future__ import annotations

import numpy as np
import pytest

from autodl_core.config import PipelineConfig
from meta_db import second_choice as sc
from meta_db.metafeatures import zero_shot_vector
from meta_db.portfolio import PORTFOLIO, single_stage
from meta_db.knowledge import load_knowledge
from meta_db.store import DatasetRecord, RunRecord, Store

DEFAULT = PORTFOLIO["default"]
F96 = PORTFOLIO["mnv2-top-f96"]
R96 = PORTFOLIO["mnv2-top-r96"]  # another probe resolution: not switchable from the default
FEATURES = {"n_train": 5000, "n_classes": 10, "rows": 32, "cols": 32, "channels": 3, "variable_size": False}


def test_the_fine_tuning_settings_are_what_a_run_can_still_change():
    assert DEFAULT.same_until_finetuning(F96, "cpu")  # "auto" is finetune_top on a CPU, as f96 says
    assert not DEFAULT.same_until_finetuning(F96, "cuda")  # on a GPU "auto" is full fine-tuning
    assert not DEFAULT.same_until_finetuning(R96, "cpu")  # the probe itself runs at another size
    assert not DEFAULT.same_until_finetuning(PipelineConfig(backbone="efficientnet_lite0"), "cpu")
    assert DEFAULT.same_until_finetuning(single_stage(top_lr=0.032, patience_slices=2), "cpu")
    # the any-time steps store the images larger from the first read: a run cannot switch into or out of them
    assert not DEFAULT.same_until_finetuning(PipelineConfig(top_lr=0.032), "cpu")
    assert PipelineConfig().same_until_finetuning(PipelineConfig(top_lr=0.032, max_step_side=224), "cpu")


def _landmark_store(path, signal: bool, n: int = 12):
    """Datasets alike in metadata (zero-shot cannot tell them apart) whose winner between the default and
    f96 follows the probe landmarker (signal) or not (no signal); r96 is measured too, never switchable."""
    rng = np.random.default_rng(3)
    with Store(path) as store, store.batch():
        for name, config in PORTFOLIO.items():
            store.upsert_pipeline(config, name)
        for i in range(n):
            probe = float(rng.uniform(0.5, 1.0))
            f96_wins = probe > 0.75 if signal else bool(rng.integers(0, 2))
            features = {**FEATURES, "n_train": int(5000 + 10 * i)}
            store.upsert_dataset(DatasetRecord(f"set{i}", features, data_features={
                sc.probe_landmark(DEFAULT.backbone): probe, sc.THUMBNAIL_LANDMARK: float(rng.uniform(0.4, 0.9))}))
            alcs = {DEFAULT: 0.85 + (0.0 if f96_wins else 0.02), F96: 0.85 + (0.02 if f96_wins else 0.0),
                    R96: 0.80}
            for config, alc in alcs.items():
                store.record_run(RunRecord(f"set{i}", config.pipeline_id(), 300.0, "cpu2", "ok", alc=alc,
                                           timestamps=[1.0, 5.0], scores=[0.2, alc]))
    zero_shot = load_knowledge(path, time_budget=300.0, hardware="cpu2")
    return zero_shot, sc.with_landmarks(zero_shot, DEFAULT.backbone)


def test_switchable_pipelines_share_the_probe(tmp_path):
    _, knowledge = _landmark_store(tmp_path / "s.sqlite", signal=True)
    assert sc.switchable(knowledge, DEFAULT) == {DEFAULT.pipeline_id(), F96.pipeline_id()}
    assert knowledge.features.shape[1] == len(zero_shot_vector(FEATURES)) + 2


def test_the_gate_opens_when_landmarkers_tell_the_winner(tmp_path):
    zero_shot, knowledge = _landmark_store(tmp_path / "s.sqlite", signal=True)
    verdict = sc.gate(zero_shot, knowledge)
    assert verdict.n == 12 and verdict.enabled, verdict.summary()
    assert verdict.gain > verdict.se and verdict.wins > verdict.losses


def test_the_gate_stays_shut_without_a_signal(tmp_path):
    zero_shot, knowledge = _landmark_store(tmp_path / "s.sqlite", signal=False)
    verdict = sc.gate(zero_shot, knowledge)
    assert not verdict.enabled, verdict.summary()


def test_datasets_without_landmarkers_are_left_out_of_the_second_look(tmp_path):
    path = tmp_path / "s.sqlite"
    zero_shot, knowledge = _landmark_store(path, signal=True)
    with Store(path) as store:
        store.upsert_dataset(DatasetRecord("bare", FEATURES))
        store.record_run(RunRecord("bare", DEFAULT.pipeline_id(), 300.0, "cpu2", "ok", alc=0.9,
                                   timestamps=[1.0], scores=[0.9]))
    zero_shot = load_knowledge(path, time_budget=300.0, hardware="cpu2")
    extended = sc.with_landmarks(zero_shot, DEFAULT.backbone)
    assert "bare" in zero_shot.dataset_ids and "bare" not in extended.dataset_ids


@pytest.mark.parametrize("probe_landmark, expected", [(0.95, F96), (0.55, None)])
def test_the_callback_switches_only_where_the_store_says(tmp_path, monkeypatch, probe_landmark, expected):
    path = tmp_path / "s.sqlite"
    _landmark_store(path, signal=True)
    monkeypatch.setenv("AUTODL_META_STORE", str(path))
    monkeypatch.setenv("AUTODL_TIME_BUDGET", "300")
    monkeypatch.delenv("AUTODL_PIPELINE_JSON", raising=False)
    monkeypatch.setattr(sc, "in_run_landmarks", lambda *args: {
        sc.probe_landmark(DEFAULT.backbone): probe_landmark, sc.THUMBNAIL_LANDMARK: 0.6})
    from tests.test_meta_db import FakeMetadata

    callback = sc.second_choice_for(FakeMetadata(5005, 10, 32, 32, 3), DEFAULT)
    assert callback is not None
    config, reason = callback(np.zeros((50, 8)), np.zeros((50, 32, 32, 3), np.uint8), np.eye(10)[np.arange(50) % 10])
    assert config == expected, reason
    assert ("switched to mnv2-top-f96" if expected else "kept with landmarkers") in reason


def test_a_gate_that_is_shut_costs_no_landmarker(tmp_path, monkeypatch):
    path = tmp_path / "s.sqlite"
    _landmark_store(path, signal=False)

    def never(*args):
        raise AssertionError("landmarkers measured although the store says they do not pay")

    monkeypatch.setattr(sc, "in_run_landmarks", never)
    config, reason = sc.SecondChoice(path, DEFAULT, zero_shot_vector(FEATURES))(None, None, None)
    assert config is None and reason.startswith("kept") and "off" in reason


def test_no_second_look_for_a_forced_pipeline(monkeypatch):
    from tests.test_meta_db import FakeMetadata

    monkeypatch.setenv("AUTODL_PIPELINE_JSON", "{}")
    assert sc.second_choice_for(FakeMetadata(5000, 10, 32, 32, 3), DEFAULT) is None


def test_in_run_landmarkers_are_measured_like_the_stored_ones():
    rng = np.random.default_rng(0)
    labels = np.eye(4, dtype=np.float32)[np.arange(400) % 4]
    features = labels @ rng.normal(size=(4, 16)) + 0.3 * rng.normal(size=(400, 16))  # separable
    images = rng.integers(0, 255, size=(400, 16, 16, 1), dtype=np.uint8)  # noise
    landmarks = sc.in_run_landmarks(features, images, labels, "mobilenetv2_100")
    assert landmarks[sc.probe_landmark("mobilenetv2_100")] > 0.9
    assert abs(landmarks[sc.THUMBNAIL_LANDMARK]) < 0.3
