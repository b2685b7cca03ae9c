"""What the solver knows about the task: metadata, a peek at raw examples, then the labels it reads.

These are also the cheap meta-features the meta-knowledge store matches datasets on.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class DataProfile:
    n_train: int
    n_classes: int
    rows: int  # -1 when sizes vary
    cols: int
    channels: int
    median_hw: tuple[int, int]
    value_min: float
    value_max: float
    multilabel: bool = False
    storage_hw: tuple[int, int] = (0, 0)
    max_cached_examples: int = 0
    pixel_max: float = 0.0
    label_cardinality: float = 1.0
    class_prior: np.ndarray | None = field(default=None, repr=False)

    @classmethod
    def from_metadata_and_peek(cls, metadata, peek) -> "DataProfile":
        rows, cols = (int(v) for v in metadata.get_matrix_size(0))
        profile = cls(
            n_train=int(metadata.size()), n_classes=int(metadata.get_output_size()),
            rows=rows, cols=cols, channels=int(peek.channels), median_hw=peek.median_hw,
            value_min=peek.value_min, value_max=peek.value_max)
        profile.update_labels(peek.labels)
        return profile

    @property
    def variable_size(self) -> bool:
        return self.rows <= 0 or self.cols <= 0

    @property
    def flip_ok(self) -> bool:
        """Horizontal flips as augmentation: natural colour images yes; grey glyph-like data no."""
        return self.channels >= 3

    def update_labels(self, labels: np.ndarray) -> None:
        labels = np.asarray(labels)
        if len(labels) == 0:
            return
        row_sums = labels.sum(axis=1)
        self.multilabel = self.multilabel or bool(np.any(np.abs(row_sums - 1) > 1e-6))
        self.label_cardinality = float(row_sums.mean())
        self.class_prior = labels.mean(axis=0)

    def meta_features(self) -> dict:
        return {
            "n_train": self.n_train, "n_classes": self.n_classes, "channels": self.channels,
            "height": self.median_hw[0], "width": self.median_hw[1], "variable_size": self.variable_size,
            "multilabel": self.multilabel, "label_cardinality": self.label_cardinality,
        }


STORAGE_SHARE = 0.5  # of the memory cap, for the stored training images when the storage size is free to shrink
MIN_STORAGE_SIDE = 64  # shrinking to fit memory stops here (fewer examples are kept instead)


def choose_storage_shape(profile: DataProfile, max_side: int, memory_cap_gb: float,
                         shrink_to_fit: bool = False) -> tuple[int, int]:
    """Cache shape: native size, or the median size for variable data, shrunk so the longer side <= max_side.

    `shrink_to_fit`: also shrunk (down to MIN_STORAGE_SIDE on the shorter side) so that every training
    example fits in STORAGE_SHARE of the memory cap: large sets of large images keep all their examples
    at a smaller size rather than a share of them at full size.
    Also fixes how many examples fit under the memory cap (profile.max_cached_examples).
    """
    h, w = (profile.rows, profile.cols) if not profile.variable_size else profile.median_hw
    h, w = max(1, int(h)), max(1, int(w))
    scale = min(1.0, max_side / max(h, w))
    channels = max(1, profile.channels)
    if shrink_to_fit:
        per_example = STORAGE_SHARE * memory_cap_gb * 1e9 / max(1, profile.n_train)
        fit = (per_example / (h * w * channels)) ** 0.5
        floor = min(1.0, MIN_STORAGE_SIDE / min(h, w))
        scale = min(scale, max(fit, floor))
    h, w = max(8, int(round(h * scale))), max(8, int(round(w * scale)))
    if profile.variable_size:
        h, w = max(8, h // 4 * 4), max(8, w // 4 * 4)
    bytes_per = h * w * channels
    profile.max_cached_examples = int(max(1000, memory_cap_gb * 1e9 // bytes_per))
    return h, w
