"""Zero-shot pipeline choice in Model.__init__: nearest neighbours (or a learned ridge ranking) over
metadata meta-features.

`select_pipeline(metadata) -> (PipelineConfig, reason)` always answers with a valid pipeline:
- AUTODL_PIPELINE_JSON set (a JSON PipelineConfig dict, or a path to a JSON file): that pipeline,
  no questions asked (meta-training forces each run's pipeline this way). An invalid value raises:
  measuring a different pipeline than the one recorded would poison the store.
- otherwise the store (meta_db/store.sqlite, or AUTODL_META_STORE) is read once per process; the
  runs in use (not of a retired code version) of one stratum (the hardware kind of this machine,
  the time budget closest to the expected one: AUTODL_TIME_BUDGET, default 1200 s) form a
  dataset x pipeline ALC matrix; each entry
  becomes its gap to the best pipeline of its dataset (0 for the best, negative otherwise); the
  k nearest datasets (z-scored `zero_shot_vector`, distance-weighted; the neighbours of one family
  share one family's vote) vote with their gaps; the
  smallest expected gap wins. Gaps, not [0, 1]-rescaled rows: the goal is mean ALC, and rescaling
  would let a 0.0005 difference on a saturated dataset (noise) outvote a 0.05 one elsewhere.
  AUTODL_SELECTOR=ridge (or DEFAULT_SELECTOR) predicts each gap with a ridge regression instead
  (`RidgeGapSelector`).
- far from every stored dataset (distance beyond what the store's own datasets show), the
  best fixed pipeline (`best_fixed`); no usable store: PipelineConfig() defaults.
Stored pipelines this code cannot run (unknown fields; when torch is loaded: a backbone not
registered or without local weights), and those the store retired (`tools meta-train
--retire-pipeline`), are left out.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from autodl_core.config import PipelineConfig
from meta_db.metafeatures import current_device_kind, metadata_features, zero_shot_vector
from meta_db.portfolio import portfolio_ids
from meta_db.store import DEFAULT_STORE_PATH, HARNESS_ERROR, IN_USE, MACHINE_INSTANCE, Store

ENV_PIPELINE = "AUTODL_PIPELINE_JSON"
ENV_STORE = "AUTODL_META_STORE"
ENV_BUDGET = "AUTODL_TIME_BUDGET"
ENV_SELECTOR = "AUTODL_SELECTOR"  # "knn" or "ridge": which selector ranks the pipelines
DEFAULT_TIME_BUDGET = 1200.0
DEFAULT_K = 5
Z_CLIP = 5.0  # standardised features are clipped here: absurd metadata cannot produce inf/nan distances
MIN_FEATURE_STD = 0.25  # a feature (e.g. a flag) constant across the store must not blow up distances
MIN_COVERAGE = 0.5  # a pipeline must have runs on this share of the (weighted) neighbours to be ranked
# Run-to-run standard deviation of one run's ALC, when the store holds too few replicate runs to measure
# it: 0.1.10's ten replicate pairs (T = 300 s, 2 CPUs) pooled to 0.0017; 0.1.13's store: median 0.0018.
NOISE_SD_PRIOR = 0.002
MIN_NOISE_DOF = 3  # replicate degrees of freedom needed before the store's own noise estimate is used
# How strongly a dataset's own replicate variance is pulled toward the store's typical one: as if the
# typical variance had been seen on this many extra replicate degrees of freedom of the dataset.
NOISE_PRIOR_DOF = 3.0

log = logging.getLogger("meta_db.selector")


# ---------------------------------------------------------------------- forced pipeline


def forced_pipeline(value: str) -> PipelineConfig:
    """AUTODL_PIPELINE_JSON's value: a JSON object or a path to a JSON file holding one."""
    text = value.strip()
    if not text.startswith("{"):
        path = Path(text)
        if not path.is_file():
            raise ValueError(f"{ENV_PIPELINE}={value!r} is neither a JSON object nor an existing JSON file")
        text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{ENV_PIPELINE}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{ENV_PIPELINE}: expected a JSON object of PipelineConfig fields, got {type(data).__name__}")
    try:
        return PipelineConfig.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{ENV_PIPELINE}: not a valid PipelineConfig ({exc})") from None


# ---------------------------------------------------------------------- knowledge


@dataclass
class Knowledge:
    """What the selector learns from: one stratum of the store as arrays."""

    dataset_ids: list[str]
    families: list[str]
    features: np.ndarray  # datasets x ZERO_SHOT_NAMES
    pipeline_ids: list[str]
    configs: dict[str, PipelineConfig]
    alc: np.ndarray  # datasets x pipelines, NaN where not measured
    time_budget: float | None = None
    hardware: str | None = None
    names: dict = field(default_factory=dict)  # pipeline_id -> name
    runs: np.ndarray | None = None  # datasets x pipelines: runs averaged in each cell (None: one each)
    sq_dev: np.ndarray | None = None  # datasets x pipelines: sum of squared deviations of those runs' ALC
    # dataset_id -> the data meta-features meta-training stored (landmarkers...), for the in-run second look
    data_features: dict = field(default_factory=dict)

    def subset(self, keep: np.ndarray) -> "Knowledge":
        keep = np.asarray(keep, dtype=bool)
        return Knowledge([d for d, k in zip(self.dataset_ids, keep) if k],
                         [f for f, k in zip(self.families, keep) if k], self.features[keep],
                         self.pipeline_ids, self.configs, self.alc[keep], self.time_budget, self.hardware,
                         self.names, None if self.runs is None else self.runs[keep],
                         None if self.sq_dev is None else self.sq_dev[keep], self.data_features)

    def run_counts(self) -> np.ndarray:
        return np.ones_like(self.alc) if self.runs is None else np.maximum(self.runs, 1)

    def _replicate_variances(self) -> tuple[np.ndarray, np.ndarray]:
        """Per dataset: (its replicated cells' pooled variance of one run's ALC, NaN without replicates;
        the replicate degrees of freedom behind it)."""
        dof = np.maximum(self.runs - 1, 0).sum(axis=1).astype(np.float64)
        squares = np.nansum(self.sq_dev, axis=1)
        return np.where(dof > 0, squares / np.maximum(dof, 1.0), np.nan), dof

    def noise_sd(self) -> float:
        """Typical run-to-run SD of one run's ALC: the median over datasets with replicates of each one's
        replicate variance (NOISE_SD_PRIOR while the store holds under MIN_NOISE_DOF replicate degrees of
        freedom). The median, not a pooled mean: one noisy dataset must not set the quiet ones' noise."""
        if self.runs is None or self.sq_dev is None:
            return NOISE_SD_PRIOR
        variances, dof = self._replicate_variances()
        if dof.sum() < MIN_NOISE_DOF:
            return NOISE_SD_PRIOR
        return float(math.sqrt(statistics.median(variances[dof > 0].tolist())))  # numpy's median: 8 ms on first use

    def noise_sd_by_dataset(self, typical: float | None = None) -> np.ndarray:
        """Per dataset: its run-to-run SD, from its own replicates shrunk toward `typical` (default
        `noise_sd()`, pass it when already computed) with NOISE_PRIOR_DOF pseudo-degrees of freedom.

        Noise differs by dataset (0.1.12: one pipeline's runs on pneumoniamnist spread over 0.03, on
        the saturated sets by under 0.001); with one SD for all, a lead on a noisy neighbour counted
        as much as the same lead on a quiet one."""
        typical = self.noise_sd() if typical is None else typical
        if self.runs is None or self.sq_dev is None:
            return np.full(len(self.dataset_ids), typical)
        variances, dof = self._replicate_variances()
        own = np.where(dof > 0, variances, 0.0)
        return np.sqrt((dof * own + NOISE_PRIOR_DOF * typical ** 2) / (dof + NOISE_PRIOR_DOF))

    def family_weights(self, rows=None) -> np.ndarray:
        """For `rows` (default: all datasets), 1 / (datasets of the same family among those rows): each
        corpus family counts once in a mean over them, whatever the number of its variants measured.

        Variants are derived from one corpus dataset, not new evidence: without this, a family given
        four variants outvoted one given none in "best on average" (0.1.12: the photo families' variants
        made mnv2-top-f96 the incumbent, and the noise guard then kept it for pneumoniamnist).
        """
        families = np.asarray(self.families, dtype=object)
        if rows is not None:
            families = families[np.asarray(rows)]  # indices or a boolean mask
        _, index, counts = np.unique(families.astype(str), return_inverse=True, return_counts=True)
        return 1.0 / counts[index].astype(np.float64)

    def without_family(self, family: str) -> "Knowledge":
        return self.subset(np.array([f != family for f in self.families], dtype=bool))

    def label(self, pipeline_id: str) -> str:
        return self.names.get(pipeline_id) or pipeline_id


def best_fixed(knowledge: "Knowledge", candidates: set[str] | None = None) -> str | None:
    """The pipeline with the best mean ALC, among those measured on at least half of the families;
    coverage and means weigh each family once (a corpus dataset and its variants share one weight).

    Means are taken over the datasets every such pipeline was measured on, so that a pipeline run
    only on easy datasets does not look better than one also run on hard ones (falls back to each
    pipeline's own mean when no dataset is common to all). Coverage counts families, not datasets
    (0.1.13): counted in datasets, the variants measured with two pipelines made every pipeline
    measured on the corpus sets alone ineligible, and "best on average" became a contest of the two.
    """
    family_share = knowledge.family_weights()  # sums to the number of families
    eligible = []
    for j, pipeline_id in enumerate(knowledge.pipeline_ids):
        if candidates is not None and pipeline_id not in candidates:
            continue
        seen = ~np.isnan(knowledge.alc[:, j])
        if seen.any() and family_share[seen].sum() >= 0.5 * family_share.sum() - 1e-9:
            eligible.append((j, pipeline_id))
    if not eligible:
        return None
    columns = knowledge.alc[:, [j for j, _ in eligible]]
    common = ~np.isnan(columns).any(axis=1)
    # each family counts once, whatever its number of variants; the common rows are shared by all pipelines
    common_weights = knowledge.family_weights(common) if common.any() else None
    best, best_score = None, -math.inf
    for k, (_, pipeline_id) in enumerate(eligible):
        column = columns[:, k]
        rows = common if common_weights is not None else ~np.isnan(column)
        weights = common_weights if common_weights is not None else knowledge.family_weights(rows)
        score = float((weights * column[rows]).sum() / weights.sum())
        if score > best_score + 1e-12:
            best, best_score = pipeline_id, score
    return best


def choose_stratum(strata: dict, device_kind: str, time_budget: float, cpu_count: int | None = None):
    """(time_budget, hardware) of the runs to learn from: the same device kind, nearest budget (log scale),
    then nearest CPU count, then most runs; None when nothing was measured on this kind of device.

    Why not fall back to another kind: rankings do not transfer between a 2-core CPU and a GPU (on
    an H200 the CPU-measured default fine-tuned only the top of the network at 64 px, the
    GPU's own default does far better); the solver's device default is the honest choice there.
    """
    same_kind = {s: n for s, n in strata.items() if s[1].startswith(device_kind)}
    if not same_kind:
        return None
    pool = same_kind
    cpus = cpu_count or os.cpu_count() or 1

    def cost(item):
        (budget, hardware), n = item
        cpu_gap = 0.0
        if hardware.startswith("cpu") and hardware[3:].isdigit():
            cpu_gap = abs(math.log(int(hardware[3:]) / cpus)) if int(hardware[3:]) > 0 else 9.0
        return (round(abs(math.log(budget / time_budget)), 6), cpu_gap, -n)

    return min(pool.items(), key=cost)[0]


def load_knowledge(store_path: str | os.PathLike, time_budget: float | None = None, hardware: str | None = None,
                   device_kind: str | None = None, backbone_ok=None,
                   machine_instance: str | None = None) -> Knowledge:
    """Read one stratum of the store. `time_budget`/`hardware` given: exactly that stratum; else chosen
    by `choose_stratum` (device kind of this machine, budget nearest AUTODL_TIME_BUDGET or 1200 s).

    `machine_instance` (a boot id prefix, as runs record it) keeps only that machine's runs: two
    machines of one stratum key can score apart (an AMD EPYC and an Intel Xeon, both `cpu2`), so a
    comparison of members measured on different machines is checked against one machine's view.
    The selector in `Model.__init__` never passes it."""
    instance_filter, params = "", [HARNESS_ERROR]
    if machine_instance:  # a prefix match without LIKE: no character of the id acts as a wildcard
        instance_filter = f" AND instr({MACHINE_INSTANCE}, ?) = 1"
        params.append(machine_instance.strip().lower())
    with Store(store_path, readonly=True) as store:
        rows = store.conn.execute(
            "SELECT dataset_id, pipeline_id, time_budget, hardware, AVG(COALESCE(alc, 0.0)) AS alc, "
            "AVG(COALESCE(alc, 0.0) * COALESCE(alc, 0.0)) AS alc2, COUNT(*) AS n "
            f"FROM runs WHERE status != ? AND {IN_USE}{instance_filter} GROUP BY 1, 2, 3, 4", params).fetchall()
        datasets = {d.dataset_id: d for d in store.datasets()}
        pipelines = store.pipelines()
        retired = store.retired_pipelines()  # dropped from the portfolio in use: never chosen
    strata: dict = {}
    for r in rows:
        strata[(r["time_budget"], r["hardware"])] = strata.get((r["time_budget"], r["hardware"]), 0) + r["n"]
    if time_budget is not None and hardware is not None:
        stratum = (float(time_budget), hardware)
    else:
        target = time_budget if time_budget is not None else expected_time_budget()
        pool = {s: n for s, n in strata.items() if hardware is None or s[1] == hardware}
        stratum = choose_stratum(pool, device_kind or current_device_kind(), float(target))
    configs, names = {}, {}
    current_names = {pipeline_id: name for name, pipeline_id in portfolio_ids().items()}
    for pipeline_id, name, raw in pipelines:
        if pipeline_id in retired:
            continue
        try:
            config = PipelineConfig.from_record(raw)
        except (TypeError, ValueError):
            continue  # written by another code version: cannot be run by this one
        if backbone_ok is not None and not backbone_ok(config.backbone):
            continue
        configs[pipeline_id] = config
        names[pipeline_id] = current_names.get(pipeline_id, name)  # portfolio names outlive renames
    cells = {}
    for r in rows:
        if stratum is not None and (r["time_budget"], r["hardware"]) == stratum \
                and r["pipeline_id"] in configs and r["dataset_id"] in datasets:
            mean, n = float(r["alc"]), int(r["n"])
            cells[(r["dataset_id"], r["pipeline_id"])] = (mean, n, max(0.0, (float(r["alc2"]) - mean * mean) * n))
    dataset_ids, families, vectors = [], [], []
    for dataset_id in sorted({d for d, _ in cells}):
        try:
            vectors.append(zero_shot_vector(datasets[dataset_id].metadata_features))
        except ValueError:
            continue
        dataset_ids.append(dataset_id)
        families.append(datasets[dataset_id].family_id)
    pipeline_ids = sorted({p for _, p in cells})
    alc = np.full((len(dataset_ids), len(pipeline_ids)), np.nan)
    runs = np.zeros(alc.shape, dtype=np.int64)
    sq_dev = np.zeros(alc.shape)
    d_index = {d: i for i, d in enumerate(dataset_ids)}
    p_index = {p: j for j, p in enumerate(pipeline_ids)}
    for (d, p), (mean, n, dev) in cells.items():
        if d in d_index:
            alc[d_index[d], p_index[p]] = mean
            runs[d_index[d], p_index[p]] = n
            sq_dev[d_index[d], p_index[p]] = dev
    features = np.array(vectors).reshape(len(dataset_ids), -1) if vectors else np.zeros((0, 0))
    return Knowledge(dataset_ids, families, features, pipeline_ids, {p: configs[p] for p in pipeline_ids}, alc,
                     time_budget=None if stratum is None else stratum[0],
                     hardware=None if stratum is None else stratum[1], names=names, runs=runs, sq_dev=sq_dev,
                     data_features={d: datasets[d].data_features for d in dataset_ids if datasets[d].data_features})


def expected_time_budget() -> float:
    try:
        value = float(os.environ.get(ENV_BUDGET, DEFAULT_TIME_BUDGET))
    except ValueError:
        return DEFAULT_TIME_BUDGET
    return value if value > 0 and math.isfinite(value) else DEFAULT_TIME_BUDGET


# ---------------------------------------------------------------------- nearest neighbours


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


# ---------------------------------------------------------------------- entry point


_CACHE: dict = {}


def _backbone_ok():
    """A pipeline is runnable here when its backbone is registered and its weights are found locally.

    Checked only when cheap, i.e. torch is already loaded (model.py loads it first): importing
    `pretrained` then costs only what the solver pays right after anyway.
    """
    if "torch" not in sys.modules:
        return None
    try:
        from pretrained import list_backbones, weights_available

        names = set(list_backbones())
    except Exception:
        return None
    verdicts: dict = {}

    def ok(name: str) -> bool:
        if name not in verdicts:
            try:
                verdicts[name] = name in names and bool(weights_available(name))
            except Exception:
                verdicts[name] = False
        return verdicts[name]

    return ok


def selector_for(path: Path) -> GapSelector:
    """The selector of the store at `path`, built once per process (and per store file, device, budget)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, current_device_kind(), expected_time_budget(),
           os.environ.get(ENV_SELECTOR))
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = make_selector(load_knowledge(path, backbone_ok=_backbone_ok()))
    return _CACHE[key]


def store_path() -> Path:
    return Path(os.environ.get(ENV_STORE) or DEFAULT_STORE_PATH)


CHOICE_LOG_RE = re.compile(r"model INFO: pipeline ([0-9a-f]{12}) \((.*)\)\s*$", re.MULTILINE)


def choice_log_line(config: PipelineConfig, reason: str) -> str:
    """What model.py logs about its pipeline; `parse_choice_log` reads it back (bench, meta-train import)."""
    return f"pipeline {config.pipeline_id()} ({reason})"


def parse_choice_log(text: str) -> tuple[str, str] | None:
    """(pipeline_id, reason) of the first pipeline line model.py logged, or None."""
    match = CHOICE_LOG_RE.search(text)
    return (match.group(1), match.group(2)) if match else None


def select_pipeline(metadata, store: str | os.PathLike | None = None) -> tuple[PipelineConfig, str]:
    """Returns (pipeline, a short reason for the log); see the module docstring."""
    forced = os.environ.get(ENV_PIPELINE)
    if forced:
        config = forced_pipeline(forced)
        return config, f"forced by {ENV_PIPELINE}"
    path = Path(store) if store is not None else store_path()
    try:
        vector = zero_shot_vector(metadata_features(metadata))
    except Exception as exc:
        return PipelineConfig(), f"default pipeline (metadata unusable: {exc})"
    if not path.is_file():
        return PipelineConfig(), f"default pipeline (no meta-knowledge store at {path})"
    try:
        selector = selector_for(path)
        if selector.empty:
            return PipelineConfig(), (f"device default pipeline (store {path.name} holds no usable run "
                                      f"measured on this kind of hardware, {current_device_kind()})")
        pipeline_id, reason = selector.choose(vector)
    except Exception as exc:  # a broken store must never stop the solver
        log.warning("meta-knowledge store unusable (%s): default pipeline", exc)
        return PipelineConfig(), f"default pipeline (store unusable: {exc})"
    if pipeline_id is None:
        return PipelineConfig(), f"default pipeline ({reason})"
    knowledge = selector.knowledge
    return knowledge.configs[pipeline_id], f"{reason} [T={knowledge.time_budget:g}s, {knowledge.hardware}]"


def pipeline_for_run(metadata, store: str | os.PathLike | None = None) -> tuple[PipelineConfig, str]:
    """What model.py runs: `select_pipeline`'s answer, where the store chose it, as the first step of the
    any-time steps (the shipped store measured its members as single stages, before the steps; its choice
    sets the backbone and the first sizes, the steps go on from there). A forced pipeline runs as given."""
    config, reason = select_pipeline(metadata, store)
    if os.environ.get(ENV_PIPELINE) or config.anytime_steps:
        return config, reason
    return config.as_steps(), f"{reason}; {config.pipeline_id()} as the first of the any-time steps"
