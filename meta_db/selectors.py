"""The ranking selectors: from a dataset's zero-shot meta-features to pipelines best first, given the
store's knowledge (`meta_db.knowledge.Knowledge`).

Each dataset's ALC becomes its gap to the best pipeline of that dataset (0 for the best, negative
otherwise); a selector estimates the query's expected gap per pipeline and the smallest wins. Gaps, not
[0, 1]-rescaled rows: the goal is mean ALC, and rescaling would let a 0.0005 difference on a saturated
dataset (noise) outvote a 0.05 one elsewhere.
- `NearestNeighbourSelector` ("knn", the default): the k nearest datasets (z-scored meta-features,
  distance-weighted; the neighbours of one family share one family's vote) vote with their gaps.
- `RidgeGapSelector` ("ridge"): a ridge regression of each pipeline's gap on the meta-features.
Far from every stored dataset (distance beyond what the store's own datasets show), both answer with
the best fixed pipeline (`meta_db.knowledge.best_fixed`).
"""
from __future__ import annotations

import math
import os

import numpy as np

from meta_db.knowledge import Knowledge, best_fixed

ENV_SELECTOR = "AUTODL_SELECTOR"  # "knn" or "ridge": which selector ranks the pipelines
DEFAULT_K = 5
Z_CLIP = 5.0  # standardised features are clipped here: absurd metadata cannot produce inf/nan distances
MIN_FEATURE_STD = 0.25  # a feature (e.g. a flag) constant across the store must not blow up distances
MIN_COVERAGE = 0.5  # a pipeline must have runs on this share of the (weighted) neighbours to be ranked


def gap_rows(alc: np.ndarray) -> np.ndarray:
    """Per dataset: ALC minus the best ALC measured on it (0 for the best pipeline, NaN where not measured)."""
    out = np.full_like(alc, np.nan, dtype=np.float64)
    for i, row in enumerate(alc):
        seen = ~np.isnan(row)
        if seen.any():
            out[i, seen] = row[seen] - row[seen].max()
    return out


def comparative_rows(alc: np.ndarray) -> np.ndarray:
    """The datasets that can teach a choice: those with two or more measured pipelines.

    A dataset with one measured pipeline gives it a gap of 0, "the best", whatever it is: as a
    neighbour it voted for that pipeline with nothing to compare (the kit's two sample datasets,
    measured with one old pipeline, made peta pick it at k = 1-2 and cost 0.033 there). Only when no
    dataset has two are all measured datasets kept, so the fallback still knows what was run.
    """
    measured = (~np.isnan(alc)).sum(axis=1)
    return measured >= 2 if np.any(measured >= 2) else measured >= 1


def best_first(scores: dict, tiebreak: dict) -> list[tuple[str, float]]:
    """(pipeline, expected gap) best first; equal gaps go to the better `tiebreak` (a mean gap), then the id."""
    return sorted(scores.items(), key=lambda kv: (-kv[1], -tiebreak.get(kv[0], 0.0), kv[0]))


class GapSelector:
    """What both selectors share: ALC gaps, standardised meta-features, the out-of-range fallback.

    Subclasses say how a query's expected gap per pipeline is estimated (`_scores`).
    """

    def __init__(self, knowledge: Knowledge):
        self.knowledge = knowledge.subset(comparative_rows(knowledge.alc))
        kn = self.knowledge
        self.empty = len(kn.dataset_ids) == 0 or len(kn.pipeline_ids) == 0
        if self.empty:
            return
        self.gaps = gap_rows(kn.alc)
        self.mean = kn.features.mean(axis=0)
        self.std = np.maximum(kn.features.std(axis=0), MIN_FEATURE_STD)
        self.z = self._standardise(kn.features)
        # How far a dataset's nearest neighbour usually is, inside the store: beyond a few times that
        # (and at least 3 z-units), a query is out of the seen range and the store means little.
        if len(self.z) > 1:
            d = np.linalg.norm(self.z[:, None, :] - self.z[None, :, :], axis=-1)
            np.fill_diagonal(d, np.inf)
            nn = d.min(axis=1)
            self.max_distance = max(3.0, 2.0 * float(nn.max()))
        else:
            self.max_distance = 3.0
        self.global_scores = self._aggregate(np.ones(len(self.z)), np.arange(len(self.z)), by_family=True)

    def _standardise(self, x: np.ndarray) -> np.ndarray:
        return np.clip((x - self.mean) / self.std, -Z_CLIP, Z_CLIP)

    def _aggregate(self, weights: np.ndarray, rows: np.ndarray, candidates=None, by_family: bool = False) -> dict:
        """{pipeline_id: weighted mean ALC gap to the best} for pipelines covering enough of `rows`' weight;
        `by_family`: the datasets of one family that a pipeline was measured on share one family's weight."""
        scores = {}
        total = float(weights.sum())
        for j, pipeline_id in enumerate(self.knowledge.pipeline_ids):
            if candidates is not None and pipeline_id not in candidates:
                continue
            values = self.gaps[rows, j]
            seen = ~np.isnan(values)
            covered = float(weights[seen].sum())
            if not seen.any() or covered < MIN_COVERAGE * total - 1e-12:
                continue
            w = weights[seen] * (self.knowledge.family_weights(rows[seen]) if by_family else 1.0)
            scores[pipeline_id] = float((w * values[seen]).sum() / w.sum())
        return scores

    def rank(self, vector: np.ndarray, candidates=None) -> tuple[list[tuple[str, float]], dict]:
        """Pipelines best first with their expected gaps, and how the ranking was made."""
        if self.empty:
            return [], {"mode": "empty"}
        vector = np.asarray(vector, dtype=np.float64)
        if vector.shape != self.mean.shape or not np.all(np.isfinite(vector)):
            return self._fallback(candidates, "unusable meta-features")
        distances = np.linalg.norm(self.z - self._standardise(vector), axis=1)
        nearest = float(distances.min())
        if nearest > self.max_distance:
            return self._fallback(candidates, f"nearest stored dataset at distance {nearest:.2f} > "
                                              f"{self.max_distance:.2f}")
        scores, info = self._scores(vector, distances, candidates)
        if not scores:
            return self._fallback(candidates, "no pipeline measured on enough of the stored datasets")
        return best_first(scores, self.global_scores), info

    def _scores(self, vector: np.ndarray, distances: np.ndarray, candidates) -> tuple[dict, dict]:
        """({pipeline_id: expected gap}, info with at least "mode") for a query inside the stored range."""
        raise NotImplementedError

    def _explain(self, score: float, info: dict) -> str:
        """Why the top pipeline won, for the log (after "<name>: ")."""
        raise NotImplementedError

    def _fallback(self, candidates, why: str):
        scores = {p: s for p, s in self.global_scores.items() if candidates is None or p in candidates}
        if not scores:  # coverage too thin everywhere: any measured pipeline, by mean over what exists
            scores = {p: float(np.nanmean(self.gaps[:, j])) for j, p in enumerate(self.knowledge.pipeline_ids)
                      if (candidates is None or p in candidates) and not np.all(np.isnan(self.gaps[:, j]))}
        ranking = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))
        fixed = best_fixed(self.knowledge, set(scores))  # "best on average": the one definition the guard uses
        if fixed is not None:
            ranking = [(fixed, scores[fixed])] + [r for r in ranking if r[0] != fixed]
        return ranking, {"mode": "global", "why": why}

    def choose(self, vector: np.ndarray, candidates=None) -> tuple[str | None, str]:
        ranking, info = self.rank(vector, candidates)
        if not ranking:
            return None, "no measured pipeline"
        pipeline_id, score = ranking[0]
        label = self.knowledge.label(pipeline_id)
        if info["mode"] == "global":
            return pipeline_id, f"{label}: best on average over {len(self.knowledge.dataset_ids)} datasets " \
                                f"(gap {score:+.4f}; {info['why']})"
        return pipeline_id, f"{label}: {self._explain(score, info)}"


class NearestNeighbourSelector(GapSelector):
    """The k nearest stored datasets (distance-weighted; several of one family share its vote) vote with
    their ALC gaps.

    Noise guard: the pipeline best on average over the store (the incumbent: `best_fixed`, the same
    pipeline leave-one-dataset-out compares with) is displaced only when
    the neighbours' paired advantage of the challenger exceeds one standard error of run-to-run noise
    (each neighbour's own replicate SD, shrunk toward the store's typical one:
    `Knowledge.noise_sd_by_dataset`). Without it a difference of 0.0015 on one neighbour, below what
    reruns of one pipeline differ by, picks a pipeline that then loses.
    """

    def __init__(self, knowledge: Knowledge, k: int = DEFAULT_K):
        self.k = max(1, int(k))
        super().__init__(knowledge)
        if not self.empty:
            self.noise = self.knowledge.noise_sd()
            self.noise_by_row = self.knowledge.noise_sd_by_dataset(self.noise)
            self.counts = self.knowledge.run_counts()

    def _scores(self, vector, distances, candidates):
        order = np.argsort(distances, kind="stable")[: self.k]
        weights = 1.0 / (distances[order] + 0.25)
        neighbours = [(self.knowledge.dataset_ids[i], round(float(distances[i]), 3)) for i in order]
        scores = self._aggregate(weights, order, candidates, by_family=True)
        return scores, {"mode": "neighbours", "neighbours": neighbours, "rows": order, "weights": weights}

    def rank(self, vector, candidates=None):
        ranking, info = super().rank(vector, candidates)
        if info.get("mode") != "neighbours" or len(ranking) < 2:
            return ranking, info
        scores = dict(ranking)
        incumbent, challenger = best_fixed(self.knowledge, set(scores)), ranking[0][0]
        if incumbent is None:
            return ranking, info
        if challenger == incumbent:
            return ranking, info
        advantage, se = self.paired_advantage(challenger, incumbent, info["rows"], info["weights"])
        if advantage > se:
            return ranking, info
        info["kept"] = {"challenger": challenger, "advantage": advantage, "se": se}
        return [(incumbent, scores[incumbent])] + [r for r in ranking if r[0] != incumbent], info

    def paired_advantage(self, challenger: str, incumbent: str, rows, weights) -> tuple[float, float]:
        """(weighted mean ALC advantage of `challenger` over `incumbent` on the neighbours that measured
        both, its standard error from run-to-run noise); no common neighbour: (0, noise of one pair)."""
        column = {p: j for j, p in enumerate(self.knowledge.pipeline_ids)}
        c, i = column[challenger], column[incumbent]
        rows, weights = np.asarray(rows), np.asarray(weights, dtype=np.float64)
        both = ~np.isnan(self.gaps[rows, c]) & ~np.isnan(self.gaps[rows, i])
        if not both.any():
            return 0.0, self.noise * math.sqrt(2.0)
        r, w = rows[both], weights[both] * self.knowledge.family_weights(rows[both])  # a family votes once
        diff = self.gaps[r, c] - self.gaps[r, i]
        var_each = self.noise_by_row[r] ** 2 * (1.0 / self.counts[r, c] + 1.0 / self.counts[r, i])
        advantage = float((w * diff).sum() / w.sum())
        se = float(math.sqrt((w ** 2 * var_each).sum()) / w.sum())
        return advantage, se

    def _explain(self, score, info):
        near = ", ".join(f"{d} ({dist})" for d, dist in info["neighbours"])
        text = f"mean ALC gap to the best {score:+.4f} over nearest datasets {near}"
        kept = info.get("kept")
        if kept:
            text += (f"; kept as the best on average: {self.knowledge.label(kept['challenger'])} leads by "
                     f"{kept['advantage']:+.4f} there, within run-to-run noise (SE {kept['se']:.4f})")
        return text


class RidgeGapSelector(GapSelector):
    """A learned ranking: per pipeline, a ridge regression of its ALC gap on the standardised meta-features.

    Why: nearest neighbours weigh every meta-feature alike, so a preference that follows one feature
    (a faster learning rate paying off on colour photos, not on grey glyphs) is outvoted by datasets
    that are near on the others. The regression finds which features matter; its penalty `lambda`
    is chosen by leave-one-family-out inside the store itself (one-standard-error rule), and
    lambda -> infinity is the best fixed pipeline, so a store that shows no usable trend falls
    back to it. Only datasets with two or more measured pipelines teach (one run has no gap
    to learn); queries are clipped to the range of the stored meta-features (no extrapolation).
    """

    LAMBDAS = (math.inf, 30.0, 10.0, 3.0, 1.0)  # simplest first: ties go to the larger penalty

    def __init__(self, knowledge: Knowledge, k: int = DEFAULT_K, lam: float | None = None):
        """`k` is accepted for a common signature with the neighbours selector and not used."""
        super().__init__(knowledge)
        if self.empty:
            return
        kn = self.knowledge
        self.teach = (~np.isnan(kn.alc)).sum(axis=1) >= 2
        self.low, self.high = kn.features.min(axis=0), kn.features.max(axis=0)
        self.lam = float(lam) if lam is not None else self._tune_lambda()
        self.models = self._fit(np.flatnonzero(self.teach), self.lam)

    def _fit(self, rows: np.ndarray, lam: float) -> dict:
        """{pipeline_id: (intercept, centre, weights)} from the gaps on `rows` (pipelines covering enough)."""
        models = {}
        for j, pipeline_id in enumerate(self.knowledge.pipeline_ids):
            gaps = self.gaps[rows, j]
            seen = ~np.isnan(gaps)
            if not seen.any() or seen.sum() < MIN_COVERAGE * len(rows) - 1e-12:
                continue
            z, y = self.z[rows][seen], gaps[seen]
            w = self.knowledge.family_weights(rows[seen])  # each family's datasets share one family's weight
            w = w * (len(w) / w.sum())  # mean weight 1: lambda keeps its scale
            centre = (w[:, None] * z).sum(axis=0) / w.sum()
            mean = float((w * y).sum() / w.sum())
            if math.isinf(lam) or len(y) < 2:
                weights = np.zeros(z.shape[1])
            else:
                zc = z - centre
                weights = np.linalg.solve(zc.T @ (w[:, None] * zc) + lam * np.eye(z.shape[1]), zc.T @ (w * (y - mean)))
            models[pipeline_id] = (mean, centre, weights)
        return models

    @staticmethod
    def _predict(models: dict, z: np.ndarray, candidates=None) -> dict:
        """Predicted gaps, capped at 0: no pipeline beats the best one (ties then go to the global ranking)."""
        return {p: min(0.0, float(b + (z - c) @ w)) for p, (b, c, w) in models.items()
                if candidates is None or p in candidates}

    def _tune_lambda(self) -> float:
        """The penalty by leave-one-family-out inside the store, with a one-standard-error rule: the
        simplest model whose ALC loss exceeds the lowest by no more than the standard error of their
        paired difference (a penalty that wins by less than that has learned the noise)."""
        kn = self.knowledge
        rows = np.flatnonzero(self.teach)
        families = sorted({kn.families[i] for i in rows})
        if len(families) < 3:
            return math.inf
        column = {p: j for j, p in enumerate(kn.pipeline_ids)}
        measured = {i: {p for p, j in column.items() if not np.isnan(kn.alc[i, j])} for i in rows}
        folds = [(np.array([i for i in rows if kn.families[i] != family], dtype=int),
                  [i for i in rows if kn.families[i] == family]) for family in families]
        losses = {}  # lambda -> ALC lost on each held-out dataset
        for lam in self.LAMBDAS:
            lost = []
            for train_rows, held in folds:
                models = self._fit(train_rows, lam)
                intercepts = {p: b for p, (b, _, _) in models.items()}  # the fold's mean gaps: `rank`'s tie-break
                family_lost = []
                for i in held:
                    ranking = best_first(self._predict(models, self.z[i], measured[i]), intercepts)
                    family_lost.append(-self.gaps[i, column[ranking[0][0]]] if ranking else np.nan)
                # one number per family (its datasets' mean): a family's variants are not more folds
                lost.append(np.nan if np.all(np.isnan(family_lost)) else float(np.nanmean(family_lost)))
            losses[lam] = np.array(lost)
        if all(np.all(np.isnan(lost)) for lost in losses.values()):
            return math.inf  # no held-out dataset could be scored: nothing to tune on
        best = min(self.LAMBDAS, key=lambda lam: np.nanmean(losses[lam]))
        for lam in self.LAMBDAS:  # simplest first
            diff = losses[lam] - losses[best]
            diff = diff[~np.isnan(diff)]
            se = float(diff.std() / math.sqrt(len(diff))) if len(diff) > 1 else 0.0
            if len(diff) == 0 or diff.mean() <= se + 1e-12:
                return lam
        return best

    def _scores(self, vector, distances, candidates):
        z = self._standardise(np.clip(vector, self.low, self.high))
        info = {"mode": "ridge", "lambda": self.lam, "datasets": int(self.teach.sum())}
        return self._predict(self.models, z, candidates), info

    def _explain(self, score, info):
        return f"predicted ALC gap to the best {score:+.4f} (ridge over {info['datasets']} datasets, " \
               f"lambda {info['lambda']:g})"


SELECTORS = {"knn": NearestNeighbourSelector, "ridge": RidgeGapSelector}
DEFAULT_SELECTOR = "knn"


def make_selector(knowledge: Knowledge, method: str | None = None, k: int = DEFAULT_K) -> GapSelector:
    """The selector named `method` (AUTODL_SELECTOR, else DEFAULT_SELECTOR); ValueError names the known ones."""
    method = method or os.environ.get(ENV_SELECTOR) or DEFAULT_SELECTOR
    if method not in SELECTORS:
        raise ValueError(f"unknown selector {method!r}: use one of {', '.join(SELECTORS)}")
    return SELECTORS[method](knowledge, k=k)

