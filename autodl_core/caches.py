"""Frozen-network outputs kept so that they are computed once: trunk activations of the
training and test sets at one working size (fp16, filled on demand by position), the probe's
pooled features of them, and the flipped-image caches that flip TTA needs.

Activations and features go stale together when the size changes: `at(size)` starts afresh.
"""
from __future__ import annotations

import numpy as np
import torch

from autodl_core.trunk import ActivationCache, top_features


class FeatureCaches:
    def __init__(self, net, run_data, plan, device: torch.device):
        self.net, self.data, self.plan, self.device = net, run_data, plan, device
        self.train: ActivationCache | None = None
        self.test: ActivationCache | None = None
        self.train_features: torch.Tensor | None = None  # probe features of every read example (in read order)
        self.test_features: torch.Tensor | None = None
        self.val_flip: ActivationCache | None = None
        self.test_flip: ActivationCache | None = None

    @property
    def size(self):
        return None if self.train is None else self.train.size

    def feature_device(self) -> torch.device:
        """Where probe features live: on the GPU they stay there (its head is fitted there too)."""
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def at(self, size):
        """Train and test caches at `size`: new ones (and no features) when the size changed."""
        if self.train is None or self.train.size != tuple(size):
            self.train, self.test = (self.new(size) for _ in range(2))
            self.train_features = None
            self.test_features = None

    def new(self, size, flip: bool = False) -> ActivationCache:
        return ActivationCache(self.net.trunk_runner, self.data.preprocess, size,
                               batch_size=self.plan.feature_batch_for(size),
                               flip=flip, store_device=self.feature_device())

    def flipped(self, split: str, size) -> ActivationCache:
        """The flipped-image cache of "val" or "test" at `size`, made on first use."""
        name = f"{split}_flip"
        cache = getattr(self, name)
        if cache is None:
            cache = self.new(size, flip=True)
            setattr(self, name, cache)
        return cache

    def nbytes(self) -> int:
        """What the caches hold (activations and pooled features)."""
        held = sum(cache.store.numel() * cache.store.element_size() for cache in
                   (self.train, self.test, self.val_flip, self.test_flip) if cache is not None and cache.store is not None)
        return held + sum(t.numel() * t.element_size() for t in (self.train_features, self.test_features)
                          if t is not None)

    def drop_flipped(self):
        self.val_flip = self.test_flip = None

    def pooled(self, cache: ActivationCache, positions: np.ndarray, deadline: float | None = None):
        """The top's pooled features of cached activations (None when they cannot end by the deadline)."""
        return top_features(self.net.top_runner, cache, positions, self.device, out_device=self.feature_device(),
                            batch_size=min(256, 4 * self.plan.feature_batch_for(cache.size)),
                            deadline=deadline)
