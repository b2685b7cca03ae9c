"""The in-run second choice: once the probe has seen the data, the store ranks again with landmarkers.

Why: metadata (size, classes, side, colour) cannot tell two sets of 32 px colour photos apart, yet
one may want its top fine-tuned at 96 px and the other not. By the end of the probe stage the run
has measured what the data is like: how well a linear head separates the backbone's frozen
features of the first examples (`landmark_probe_nauc_<backbone>`) and their raw thumbnails
(`landmark_thumbnail_nauc`), the same quantities `tools meta-train` stores per dataset
(meta_db/metafeatures.py: `data_features`). The store then ranks again, with these two columns
added to the zero-shot vector.

Only what the run has not yet acted on may change: the fine-tuning stage's fields
(`autodl_core.config.FINETUNE_FIELDS`). The candidates are the store's pipelines that share every other field with
the first choice (the default and mnv2-top-f96: the same probe, another fine-tuning resolution).

The store decides whether a second look is worth its cost (`gate`): leave-one-family-out inside
the store, the two-step choice (zero-shot, then re-ranked with landmarkers among the switchable
pipelines) against the zero-shot choice alone. It is on only when its mean gain exceeds the
standard error of run-to-run noise; otherwise the run keeps its first choice and pays nothing.
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import numpy as np

from autodl_core.config import PipelineConfig
from meta_db.metafeatures import landmark_nauc
from meta_db.knowledge import Knowledge
from meta_db.selector import selector_for
from meta_db.selectors import DEFAULT_K, make_selector

THUMBNAIL_LANDMARK = "landmark_thumbnail_nauc"
LANDMARK_EXAMPLES = 1000  # the first examples the landmarkers use, as `read_first_chunk` offline
MIN_GATE_DATASETS = 5  # fewer original datasets with a choice: the store cannot tell, stay off


def probe_landmark(backbone: str) -> str:
    return f"landmark_probe_nauc_{backbone}"


def switchable(knowledge: Knowledge, config: PipelineConfig) -> set[str]:
    """Pipeline ids of `knowledge` the run of `config` can still switch to after its probe (itself included),
    on the kind of device `knowledge` was measured on."""
    device_type = "cuda" if (knowledge.hardware or "").startswith("cuda") else "cpu"
    return {p for p, c in knowledge.configs.items() if config.same_until_finetuning(c, device_type)}


# ---------------------------------------------------------------------- knowledge with landmarkers


def with_landmarks(knowledge: Knowledge, backbone: str) -> Knowledge:
    """`knowledge` with two more feature columns from its stored data meta-features (the probe landmark of
    `backbone`, the thumbnail one), keeping the datasets that have both."""
    names = (probe_landmark(backbone), THUMBNAIL_LANDMARK)
    stored = [[knowledge.data_features.get(d, {}).get(n) for n in names] for d in knowledge.dataset_ids]
    values = np.array([[math.nan if v is None else float(v) for v in row] for row in stored],
                      dtype=np.float64).reshape(len(stored), 2)
    extended = dataclasses.replace(knowledge, features=np.hstack([knowledge.features, values]))
    return extended.subset(np.isfinite(values).all(axis=1))


# ---------------------------------------------------------------------- the two-step choice


def two_step(zero_shot_selector, landmark_selector, landmarks: Knowledge, zero_shot: np.ndarray,
             landmark_vector: np.ndarray, candidates: set[str] | None = None) -> tuple[str | None, str | None]:
    """(the first choice, from metadata; the second, re-ranked with landmarkers among the pipelines
    switchable from the first), both among `candidates`."""
    ranking, _ = zero_shot_selector.rank(zero_shot, candidates)
    if not ranking:
        return None, None
    first = ranking[0][0]
    if first not in landmarks.configs or landmark_selector.empty:
        return first, first
    allowed = switchable(landmarks, landmarks.configs[first]) & (candidates or set(landmarks.pipeline_ids))
    if len(allowed) < 2:
        return first, first
    ranking, _ = landmark_selector.rank(landmark_vector, allowed)
    return first, (ranking[0][0] if ranking else first)


@dataclasses.dataclass
class GateResult:
    """Leave-one-family-out over the store's original datasets: the two-step choice against the first alone."""
    enabled: bool
    n: int
    first_mean: float
    second_mean: float
    wins: int
    losses: int
    se: float

    @property
    def gain(self) -> float:
        return self.second_mean - self.first_mean

    def summary(self) -> str:
        if self.n == 0:
            return "no dataset with landmarkers and a choice: the second look is off"
        return (f"second look with landmarkers, leave-one-family-out over {self.n} datasets: mean ALC "
                f"{self.first_mean:.4f} -> {self.second_mean:.4f} ({self.gain:+.4f}, noise SE {self.se:.4f}; "
                f"{self.wins} wins, {self.losses} losses): {'on' if self.enabled else 'off'}")


def gate(zero_shot: Knowledge, landmarks: Knowledge, method: str | None = None, k: int = DEFAULT_K) -> GateResult:
    """Whether re-ranking with landmarkers would have paid in this store: leave-one-family-out over the
    original datasets that have landmarkers, the first choice made as `Model.__init__` makes it (from
    all of `zero_shot`, variants included), the second from `landmarks` (`with_landmarks(zero_shot)`)."""
    first_alc, second_alc = [], []
    row_of = {d: i for i, d in enumerate(zero_shot.dataset_ids)}
    for i, dataset_id in enumerate(landmarks.dataset_ids):
        measured = ~np.isnan(landmarks.alc[i])
        if dataset_id != landmarks.families[i] or measured.sum() < 2:
            continue  # variants are extra training tasks, not separate evidence (as in meta_db.evaluate)
        alc = {p: float(landmarks.alc[i, j]) for j, p in enumerate(landmarks.pipeline_ids) if measured[j]}
        family = landmarks.families[i]
        first, second = two_step(make_selector(zero_shot.without_family(family), method, k),
                                 make_selector(landmarks.without_family(family), method, k), landmarks,
                                 zero_shot.features[row_of[dataset_id]], landmarks.features[i], set(alc))
        if first is None:
            continue
        first_alc.append(alc[first])
        second_alc.append(alc[second])
    n = len(first_alc)
    if n == 0:
        return GateResult(False, 0, math.nan, math.nan, 0, 0, math.nan)
    first_arr, second_arr = np.array(first_alc), np.array(second_alc)
    diff = second_arr - first_arr
    switched = int(np.count_nonzero(np.abs(diff) > 1e-9))
    # Two sources of doubt: which datasets happened to be in the store (the spread of the per-dataset
    # differences: a second look that wins 0.02 here and loses 0.02 there by chance has a wide one), and
    # run-to-run noise (each switched dataset compares two runs' ALC).
    spread = float(diff.std(ddof=1)) / math.sqrt(n) if n > 1 else math.inf
    run_noise = landmarks.noise_sd() * math.sqrt(2.0 * max(switched, 1)) / n
    se = math.sqrt(spread ** 2 + run_noise ** 2)
    wins, losses = int((diff > 1e-9).sum()), int((diff < -1e-9).sum())
    enabled = n >= MIN_GATE_DATASETS and float(diff.mean()) > se and wins > losses
    return GateResult(enabled, n, float(first_arr.mean()), float(second_arr.mean()), wins, losses, se)


# ---------------------------------------------------------------------- in a run


def in_run_landmarks(probe_features, images, labels, backbone: str) -> dict:
    """The landmarkers of a run's first examples, measured as `meta_db.metafeatures.data_features` does
    offline (the solver's linear head, the same split): on the probe's own features (at the probe's working
    size, where offline resizes to 64 px) and on raw thumbnails."""
    from autodl_core.heads import thumbnails

    n = min(LANDMARK_EXAMPLES, len(labels))
    labels = np.asarray(labels[:n], dtype=np.float32)
    return {probe_landmark(backbone): landmark_nauc(np.asarray(probe_features[:n], dtype=np.float32), labels),
            THUMBNAIL_LANDMARK: landmark_nauc(thumbnails(np.asarray(images[:n])), labels)}


class SecondChoice:
    """The callback the solver calls once, at the end of its probe stage: (a pipeline to switch to or
    None, why). Uses the knowledge the first choice was read into; runs the gate on that call, not in
    `Model.__init__` (whose selector time stays a few milliseconds)."""

    def __init__(self, store_path, first: PipelineConfig, zero_shot: np.ndarray, method: str | None = None):
        self.store_path, self.first, self.zero_shot, self.method = Path(store_path), first, zero_shot, method

    def __call__(self, probe_features, images, labels) -> tuple[PipelineConfig | None, str]:
        backbone = self.first.backbone
        zero_shot = selector_for(self.store_path).knowledge  # what the first choice was made from (cached)
        knowledge = with_landmarks(zero_shot, backbone)
        if self.first.pipeline_id() not in knowledge.pipeline_ids:
            return None, "first choice not measured in the store's stratum: kept"
        allowed = switchable(knowledge, self.first)
        if len(allowed) < 2:
            return None, "no stored pipeline shares this probe: kept"
        verdict = gate(zero_shot, knowledge, self.method)
        if not verdict.enabled:
            return None, f"kept ({verdict.summary()})"
        landmarks = in_run_landmarks(probe_features, images, labels, backbone)
        values = [landmarks[probe_landmark(backbone)], landmarks[THUMBNAIL_LANDMARK]]
        if any(v is None for v in values):
            return None, f"kept (landmarkers not measurable here: {landmarks})"
        vector = np.concatenate([self.zero_shot, np.array(values, dtype=np.float64)])
        ranking, _ = make_selector(knowledge, self.method).rank(vector, allowed)
        chosen = ranking[0][0] if ranking else self.first.pipeline_id()
        text = ", ".join(f"{name} {value:.3f}" for name, value in zip(("probe", "thumbnails"), values))
        if chosen == self.first.pipeline_id():
            return None, f"kept with landmarkers {text} ({verdict.summary()})"
        return knowledge.configs[chosen], (f"switched to {knowledge.label(chosen)} with landmarkers {text} "
                                           f"({verdict.summary()})")


def second_choice_for(metadata, first: PipelineConfig) -> SecondChoice | None:
    """The callback for a run whose first choice came from the store; None when the pipeline was forced
    (meta-training measures exactly the pipeline it asked for) or no store or metadata is usable."""
    from meta_db.metafeatures import zero_shot_of
    from meta_db.selector import ENV_PIPELINE, store_path

    if os.environ.get(ENV_PIPELINE):
        return None
    path = store_path()
    try:
        vector = zero_shot_of(metadata)
    except Exception:
        return None
    return SecondChoice(path, first, vector) if path.is_file() else None
