"""What the stages of one run share: the configuration, the device and its plan, the warmed-up
backbone, the time planner, the data read, the feature caches, the candidate pool, and the
predictions the next test call returns."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from autodl_core.caches import FeatureCaches
from autodl_core.config import PipelineConfig
from autodl_core.device_plan import DevicePlan
from autodl_core.ensemble import CandidatePool
from autodl_core.memory import MemoryBudget
from autodl_core.metrics import nauc
from autodl_core.planner import TimePlanner
from autodl_core.run_data import RunData
from autodl_core.warmup import Backbone


def score(y_true, probs) -> float:
    """Validation NAUC, -inf where it is undefined (a split without both labels of a class)."""
    try:
        value = nauc(y_true, probs)
    except ValueError:
        return -np.inf
    return -np.inf if np.isnan(value) else value


@dataclass
class Predictions:
    """What the next test call returns.

    A stage either has a new prediction to make (`ready(predictor)`: the next test call runs the
    predictor), or has nothing new (`nothing_new()`: the next test call returns the last good
    predictions at no cost). `last_good` is what was last returned well-formed."""
    pending: np.ndarray | None = None
    predictor: Callable[[float], np.ndarray | None] | None = None
    last_good: np.ndarray | None = None

    def ready(self, predictor: Callable[[float], np.ndarray | None]):
        self.pending, self.predictor = None, predictor

    def nothing_new(self):
        self.pending = self.last_good

    def drop_predictor(self):
        """The current predictor's inputs are gone (caches rebuilt at another size)."""
        self.predictor = None


@dataclass
class RunContext:
    config: PipelineConfig
    metadata: object
    device: torch.device
    plan: DevicePlan
    net: Backbone
    planner: TimePlanner
    data: RunData
    caches: FeatureCaches
    candidates: CandidatePool
    predictions: Predictions = field(default_factory=Predictions)
    done_training: bool = False
    best_val_score: float = -np.inf  # the validation score of what was last predicted
    memory: MemoryBudget | None = None  # the memory cap, as what the solver holds against it

    def use_backbone(self, net: Backbone):
        """Frozen passes from now on through `net` (the any-time steps move between backbones): its caches
        start empty, the planner plans with its measured rate, and a predictor that needed the old
        caches is dropped (its prediction, if made, is in the candidate pool)."""
        self.net = net
        self.caches = FeatureCaches(net, self.data, self.plan, self.device)
        self.planner.rate = net.rate
        self.predictions.drop_predictor()

    @property
    def top_mode(self) -> bool:
        return self.net.strategy == "finetune_top"

    def best_combination(self) -> np.ndarray:
        """Test probabilities of the best candidate group on validation (its score is remembered)."""
        probs, value, _ = self.candidates.predict(self.data.val_labels())
        if np.isfinite(value):
            self.best_val_score = value
        return probs
