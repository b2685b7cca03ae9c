"""The selector's knowledge: one stratum of the store (time budget, hardware) as arrays of ALC per dataset
and pipeline, with each dataset's zero-shot meta-features.

The stratum is the one the run is in: the hardware kind of this machine and the time budget closest to
the expected one (AUTODL_TIME_BUDGET, default 1200 s). Only runs in use count (not of a retired code
version, not a harness error); pipelines the store retired, and those this code cannot run, are left out.
`best_fixed` is the one definition of "best on average" the selectors and the evaluation share.
"""
from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass, field

import numpy as np

from autodl_core.config import PipelineConfig
from meta_db.metafeatures import current_device_kind, zero_shot_vector
from meta_db.portfolio import live_pipelines
from meta_db.store import Store

ENV_BUDGET = "AUTODL_TIME_BUDGET"
DEFAULT_TIME_BUDGET = 1200.0
# Run-to-run standard deviation of one run's ALC, when the store holds too few replicate runs to measure
# it: 0.1.10's ten replicate pairs (T = 300 s, 2 CPUs) pooled to 0.0017; 0.1.13's store: median 0.0018.
NOISE_SD_PRIOR = 0.002
MIN_NOISE_DOF = 3  # replicate degrees of freedom needed before the store's own noise estimate is used
# How strongly a dataset's own replicate variance is pulled toward the store's typical one: as if the
# typical variance had been seen on this many extra replicate degrees of freedom of the dataset.
NOISE_PRIOR_DOF = 3.0


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
    with Store(store_path, readonly=True) as store:
        rows = store.cell_means(machine_instance)
        datasets = {d.dataset_id: d for d in store.datasets()}
        live = live_pipelines(store.pipelines_in_use(), backbone_ok)
    strata: dict = {}
    for r in rows:
        strata[(r.time_budget, r.hardware)] = strata.get((r.time_budget, r.hardware), 0) + r.n
    if time_budget is not None and hardware is not None:
        stratum = (float(time_budget), hardware)
    else:
        target = time_budget if time_budget is not None else expected_time_budget()
        pool = {s: n for s, n in strata.items() if hardware is None or s[1] == hardware}
        stratum = choose_stratum(pool, device_kind or current_device_kind(), float(target))
    configs = {pipeline_id: config for pipeline_id, (_, config) in live.items()}
    names = {pipeline_id: name for pipeline_id, (name, _) in live.items()}
    cells = {}
    for r in rows:
        if stratum is not None and (r.time_budget, r.hardware) == stratum \
                and r.pipeline_id in configs and r.dataset_id in datasets:
            mean, n = float(r.alc), int(r.n)
            cells[(r.dataset_id, r.pipeline_id)] = (mean, n, max(0.0, (float(r.alc2) - mean * mean) * n))
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

