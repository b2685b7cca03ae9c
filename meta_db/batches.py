"""Measuring batches side by side: do one batch's runs sit above or below the others' on the same cells?

A batch is the runs one code version recorded on one machine instance (`code_version@instance`;
runs recorded before 0.1.21 name no instance: their code version alone), i.e. one run after another on one machine.
Run-to-run noise is random from run to run; a batch effect is not: a slower machine instance, a
busy host or a solver detail lowers every run of the batch, and its cells then look like losses
of whichever pipelines happened to run there. Version 0.1.21 found one: the ten runs of batch
`5227448` (0.1.17, 2026-12-04 23:24-00:13 UTC, another AMD EPYC instance) sat 0.03-0.11 below the
same cells' later runs on every cell replicated since, which made `mnv2-top-f128` look 0.025-0.036
ahead of f96 on two photo sets where the two tie.

This module only measures; what to do with a suspect batch is the store keeper's call
(`tools meta-train --retire-code VERSION --reason ...` keeps its runs but stops learning from them).
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from meta_db.store import Store

MIN_PAIRED = 3  # fewer paired runs than this: no verdict
SUSPECT_SE = 3.0  # an offset beyond this many standard errors (and beyond one run's noise) is flagged


@dataclass(frozen=True)
class BatchOffset:
    """One batch against the others. `offset`: its effect in the additive fit (ALC points; the typical
    batch is 0); `paired`: its runs on cells two or more batches in use measured; `se`: the standard
    error of the offset from those runs' residuals."""

    code_version: str
    first: str
    last: str
    runs: int
    paired: int
    offset: float
    se: float
    retired: bool

    def suspect(self, run_sd: float) -> bool:
        """Far from the other batches: beyond SUSPECT_SE standard errors of its own paired differences
        and beyond one run's typical noise `run_sd`, on at least MIN_PAIRED paired runs."""
        return (self.paired >= MIN_PAIRED and math.isfinite(self.se) and abs(self.offset) > SUSPECT_SE * self.se
                and abs(self.offset) > run_sd)


def batch_offsets(store_path, time_budget: float, hardware: str, iterations: int = 100) -> list[BatchOffset]:
    """Every batch of one stratum, oldest first, from an additive fit: run ALC = cell + batch + noise.

    Why a fit, not "each batch against the others' mean": with one slow batch among three, every other
    batch would look high against a reference that contains the slow one. The fit uses the cells that
    two or more batches in use measured; the batch effects are centred on their median (weighted by
    paired runs), so the typical batch sits at 0 and one odd batch stands out. A retired batch gets
    its offset against every cell the batches in use measured, never shaping them.
    """
    with Store(store_path, readonly=True) as store:  # retirement: the store's own rule
        rows = store.batch_runs(time_budget, hardware)
    retired_batches = {r.batch for r in rows if r.retired}  # a batch is one code version: all or none

    def is_retired(batch: str) -> bool:
        return batch in retired_batches

    times: dict[str, list[str]] = defaultdict(list)
    in_cell: dict[tuple, set] = defaultdict(set)
    for r in rows:
        times[r.batch].append(r.finished)
        if not is_retired(r.batch):
            in_cell[(r.dataset_id, r.pipeline_id)].add(r.batch)
    shared = {cell for cell, batches in in_cell.items() if len(batches) >= 2}
    runs = [(r.batch, (r.dataset_id, r.pipeline_id), float(r.alc)) for r in rows
            if (r.dataset_id, r.pipeline_id) in shared]
    fitting = [run for run in runs if not is_retired(run[0])]
    effect = defaultdict(float)
    cell = {}
    for _ in range(iterations):  # alternating least squares; a few dozen rounds settle on this size
        sums = defaultdict(list)
        for batch, key, alc in fitting:
            sums[key].append(alc - effect[batch])
        cell = {key: float(np.mean(values)) for key, values in sums.items()}
        by_batch = defaultdict(list)
        for batch, key, alc in runs:
            by_batch[batch].append(alc - cell[key])
        effect = defaultdict(float, {batch: float(np.mean(values)) for batch, values in by_batch.items()})
        used = [b for b in effect if not is_retired(b)]
        if used:
            centre = _weighted_median([effect[b] for b in used], [len(by_batch[b]) for b in used])
            effect = defaultdict(float, {b: e - centre for b, e in effect.items()})
    residuals = defaultdict(list)
    for batch, key, alc in runs:
        if not is_retired(batch):
            residuals[batch].append(alc - cell[key] - effect[batch])
    # A retired batch against every cell the batches in use measured (one in-use batch is enough:
    # the cell's value then comes from that batch's runs, corrected by its effect).
    in_use_values = defaultdict(list)
    for r in rows:
        if not is_retired(r.batch):
            in_use_values[(r.dataset_id, r.pipeline_id)].append(float(r.alc) - effect[r.batch])
    retired_differences = defaultdict(list)
    for r in rows:
        key = (r.dataset_id, r.pipeline_id)
        if is_retired(r.batch) and key in in_use_values:
            retired_differences[r.batch].append(float(r.alc) - float(np.mean(in_use_values[key])))
    for batch, differences in retired_differences.items():
        effect[batch] = float(np.mean(differences))
        residuals[batch] = [d - effect[batch] for d in differences]
    offsets = []
    for batch, finished in times.items():
        n = len(residuals.get(batch, []))
        se = float(np.std(residuals[batch], ddof=1) / math.sqrt(n)) if n >= 2 else math.nan
        stamps = sorted(t for t in finished if t)
        offsets.append(BatchOffset(batch or "(none)", stamps[0] if stamps else "", stamps[-1] if stamps else "",
                                   len(finished), n, effect[batch] if n else math.nan, se, is_retired(batch)))
    return sorted(offsets, key=lambda o: (o.first, o.code_version))


def _weighted_median(values: list[float], weights: list[int]) -> float:
    order = np.argsort(values)
    cumulative = np.cumsum(np.asarray(weights, dtype=float)[order])
    return float(np.asarray(values)[order][np.searchsorted(cumulative, cumulative[-1] / 2.0)])


def markdown_batches(offsets: list[BatchOffset], run_sd: float) -> str:
    """The report's table: one row a batch, suspects in bold."""
    lines = ["| batch (code version) | runs | recorded (UTC) | paired runs | offset | SE | verdict |",
             "|---|---|---|---|---|---|---|"]
    for o in offsets:
        suspect = o.suspect(run_sd)
        verdict = ("retired (would be suspect)" if suspect else "retired") if o.retired else \
            ("**suspect**" if suspect else "")
        span = f"{o.first[:16]} - {o.last[:16]}" if o.first else "-"
        offset = f"{o.offset:+.4f}" if math.isfinite(o.offset) else "-"
        se = f"{o.se:.4f}" if math.isfinite(o.se) else "-"
        lines.append(f"| {o.code_version} | {o.runs} | {span} | {o.paired} | {offset} | {se} | {verdict} |")
    return "\n".join(lines)
