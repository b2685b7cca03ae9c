"""A validation split that near-duplicates cannot fool.

The AutoDL format has no groups, but many datasets hold near-duplicates: frames of one video, photos
of one person, augmented copies of one cell. When the test set was split by group (by person, by
track) while the validation split is drawn at random, held-out examples have near-duplicates among
the training examples and the test examples do not: validation then reads 1.000 while the test set
reads 0.85, and a solver stops buying quality it still needs (a facial-expression set ended its run
at 91 s of 300 with validation at 1.000 from the probe on).

So the split is measured against the test set, in the frozen probe's feature space (cosine similarity
of centred, L2-normalised features): how often a test example has a near-duplicate among the
training examples, and how often a randomly held-out one has. When the held-out examples have
clearly more, the split is rebuilt from whole near-duplicate clusters (connected components of the
graph "cosine similarity above the threshold"), so that no held-out example has a near-duplicate
left on the training side; otherwise the random split, which then mirrors the test set, stays.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger("autodl_core.validation")

# Similarities (cosine) at which two examples may count as near-duplicates: which one applies is read off
# the data (check_split; docs/benchmarks.md).
THRESHOLDS = (0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
# A threshold is a candidate when at it this many more held-out examples than test examples have a
# near-duplicate on the training side (as shares).
EXCESS_SHARE = 0.1
MAX_TEST_SAMPLE = 1000  # test examples whose nearest training neighbour is looked up
CHUNK = 1024


@dataclass
class SplitReport:
    """What the check measured and decided (logged, and kept in the run's stats)."""
    grouped: bool
    test_share: float  # test examples with a near-duplicate among the training examples
    val_share: float  # random held-out examples with one among the other training examples
    threshold: float = 0.0  # the cosine similarity of near-duplicates, read off the data
    val_share_after: float | None = None  # held-out examples with one on the training side, grouped split
    n_val: int = 0
    clusters: int = 0
    reason: str = ""

    def line(self) -> str:
        after = "" if self.val_share_after is None else f", {self.val_share_after:.2f} after"
        return (f"validation {'grouped by near-duplicate clusters' if self.grouped else 'random'}: near-duplicates "
                f"(cosine >= {self.threshold:.2f}) for {self.test_share:.2f} of test and {self.val_share:.2f} of "
                f"held-out examples{after}; {self.n_val} held out"
                f"{f' in {self.clusters} clusters' if self.grouped else ''}" + (f" ({self.reason})" if self.reason else ""))


def unit_features(features: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    x = features.float() - center
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def nearest_similarity(queries: torch.Tensor, keys: torch.Tensor, exclude: np.ndarray | None = None) -> np.ndarray:
    """Highest cosine similarity of each (unit) query among the (unit) keys; `exclude[i]` is a key position
    query i may not match (itself), or -1."""
    best = np.full(len(queries), -1.0, np.float32)
    if len(keys) == 0:
        return best
    for start in range(0, len(queries), CHUNK):
        sims = queries[start:start + CHUNK] @ keys.T
        if exclude is not None:
            rows = np.arange(len(sims))
            own = exclude[start:start + CHUNK]
            mask = own >= 0
            sims[torch.from_numpy(rows[mask]), torch.from_numpy(own[mask])] = -1.0
        best[start:start + CHUNK] = sims.max(dim=1).values.numpy()
    return best


class SimilarityGraph:
    """The pairs of examples at least `floor` similar (found a chunk of rows at a time), from which the
    components at any higher threshold follow without computing similarities again."""

    def __init__(self, unit: torch.Tensor, floor: float, max_pairs: int | None = None):
        self.n = len(unit)
        max_pairs = max_pairs if max_pairs is not None else 50 * self.n
        rows_all, cols_all, sims_all, total = [], [], [], 0
        self.complete = True
        for start in range(0, self.n, CHUNK):
            sims = unit[start:start + CHUNK] @ unit.T
            rows, cols = torch.nonzero(sims >= floor, as_tuple=True)
            total += len(rows)
            if total > max_pairs + self.n:  # each example is its own neighbour
                self.complete = False
                break
            rows_all.append((rows + start).numpy())
            cols_all.append(cols.numpy())
            sims_all.append(sims[rows, cols].numpy())
        empty = np.zeros(0, np.int64)
        self.rows = np.concatenate(rows_all) if rows_all else empty
        self.cols = np.concatenate(cols_all) if cols_all else empty
        self.sims = np.concatenate(sims_all) if sims_all else np.zeros(0, np.float32)

    def components(self, threshold: float) -> np.ndarray | None:
        """Connected components at `threshold` (None when the graph was too dense to hold)."""
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        if not self.complete:
            return None
        keep = self.sims >= threshold
        graph = coo_matrix((np.ones(int(keep.sum()), np.int8), (self.rows[keep], self.cols[keep])),
                           shape=(self.n, self.n))
        return connected_components(graph, directed=False)[1]


def near_duplicate_components(unit: torch.Tensor, threshold: float, max_pairs: int | None = None) -> np.ndarray | None:
    """Connected components of the graph linking examples whose similarity is at least `threshold`; None
    when it has more than `max_pairs` edges (then most examples are one another's near-duplicates, and no
    grouping can hold any out)."""
    return SimilarityGraph(unit, threshold, max_pairs).components(threshold)


def grouped_mask(components: np.ndarray, labels: np.ndarray, random_mask: np.ndarray, target: int,
                 multilabel: bool) -> np.ndarray:
    """Whole components held out, those of the random split's examples first (in read order), until
    `target` examples. Left on the training side: a component that would take the split past 1.25 x the
    target, and one holding more than half of a class's examples (a class must stay learnable). Large
    components are not left out otherwise: held-out examples drawn from the small ones only were the
    atypical ones, and read as well as a random split (traffic signs: 0.963 against 0.977, test 0.861)."""
    n = len(components)
    class_counts = labels.sum(axis=0)
    sizes = np.bincount(components)
    mask = np.zeros(n, bool)
    order = np.concatenate([np.flatnonzero(random_mask), np.flatnonzero(~random_mask)])
    seen = set()
    for i in order:
        root = components[i]
        if root in seen:
            continue
        seen.add(root)
        if mask.sum() + sizes[root] > 1.25 * target:
            continue
        members = np.flatnonzero(components == root)
        if not multilabel and np.any(labels[members].sum(axis=0) > 0.5 * class_counts):
            continue
        mask[members] = True
        if mask.sum() >= target:
            break
    return mask


def check_split(train_features: torch.Tensor, labels: np.ndarray, random_mask: np.ndarray,
                test_features: torch.Tensor | None, multilabel: bool,
                threshold: float | None = None) -> tuple[np.ndarray | None, SplitReport]:
    """(a grouped validation mask over the featured examples, or None to keep the random one; the report).

    `train_features` are the probe's features of the first n training examples (read order),
    `random_mask` their random validation mask, `test_features` the test set's; `threshold` fixes the
    similarity of near-duplicates (default: read off the data, see THRESHOLDS)."""
    n = len(train_features)
    if test_features is None or len(test_features) == 0 or random_mask.sum() < 2 or n < 20:
        return None, SplitReport(False, 0.0, 0.0, n_val=int(random_mask.sum()), reason="too little data to check")
    center = train_features.float().mean(dim=0, keepdim=True)
    unit = unit_features(train_features, center)
    test = test_features
    if len(test) > MAX_TEST_SAMPLE:
        test = test[np.random.default_rng(0).choice(len(test), MAX_TEST_SAMPLE, replace=False)]
    test_nearest = nearest_similarity(unit_features(test, center), unit)
    val = np.flatnonzero(random_mask)
    fit = np.flatnonzero(~random_mask)
    val_nearest = nearest_similarity(unit[val], unit[fit])
    candidates = THRESHOLDS if threshold is None else (threshold,)
    # the threshold at which held-out examples most exceed test examples in having a near-duplicate on
    # the training side (the highest of equal ones: fewer links): pedestrians seen by several cameras link
    # at 0.6, traffic-sign frames at 0.8 (docs/benchmarks.md)
    excess = [(float((val_nearest >= t).mean() - (test_nearest >= t).mean()), t) for t in candidates]
    _, threshold = max(excess)
    test_share, val_share = float((test_nearest >= threshold).mean()), float((val_nearest >= threshold).mean())
    report = SplitReport(False, test_share, val_share, threshold=threshold, n_val=len(val))
    if val_share < test_share + EXCESS_SHARE:
        return None, report
    components = near_duplicate_components(unit, threshold)
    if components is None:
        report.reason = "most examples are near-duplicates of many others: no cluster can be held out"
        return None, report
    mask = grouped_mask(components, labels[:n], random_mask, target=len(val), multilabel=multilabel)
    if mask.sum() < max(20, 0.5 * len(val)) or (~mask).sum() < 2:
        report.reason = "too few clusters to hold out"
        return None, report
    new_val, new_fit = np.flatnonzero(mask), np.flatnonzero(~mask)
    report.grouped = True
    report.val_share_after = float((nearest_similarity(unit[new_val], unit[new_fit]) >= threshold).mean())
    report.n_val = int(mask.sum())
    report.clusters = len(set(components[new_val].tolist()))
    return mask, report
