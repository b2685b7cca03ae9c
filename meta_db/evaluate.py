"""Leave-one-dataset-out (LODO) evaluation of the selector: would it have chosen well on a dataset it never saw?

For each dataset with runs, the selector is fitted without that dataset's whole family (the
corpus dataset and every variant derived from it: a variant of the held-out set would leak its
answer), then asked for the held-out dataset's pipeline from its metadata features alone.
Compared with the single best fixed pipeline (best mean ALC on the other families) and the
oracle (best pipeline measured on the held-out dataset). Regret = oracle ALC - chosen ALC.
Candidates are limited to the pipelines measured on the held-out dataset, so every choice has
a known ALC; datasets with fewer than two measured pipelines offer no choice and are left out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from meta_db.knowledge import Knowledge, best_fixed, load_knowledge
from meta_db.selectors import DEFAULT_K, DEFAULT_SELECTOR, make_selector


@dataclass
class LodoRow:
    dataset_id: str
    family_id: str
    selected: str | None
    selected_alc: float
    fixed: str | None
    fixed_alc: float
    oracle: str
    oracle_alc: float
    default_alc: float | None
    mode: str

    @property
    def is_original(self) -> bool:
        """A corpus dataset, not a variant derived from one."""
        return self.dataset_id == self.family_id

    @property
    def regret_selected(self) -> float:
        return self.oracle_alc - self.selected_alc

    @property
    def regret_fixed(self) -> float:
        return self.oracle_alc - self.fixed_alc


def leave_one_dataset_out(knowledge: Knowledge, k: int = DEFAULT_K, default_id: str | None = None,
                          method: str = DEFAULT_SELECTOR) -> list[LodoRow]:
    """One row per dataset with a choice; `method` names the selector (meta_db.selectors.SELECTORS)."""
    rows = []
    for i, dataset_id in enumerate(knowledge.dataset_ids):
        measured = ~np.isnan(knowledge.alc[i])
        if measured.sum() < 2:  # one measured pipeline: no choice to evaluate
            continue
        alc = {p: float(knowledge.alc[i, j]) for j, p in enumerate(knowledge.pipeline_ids) if measured[j]}
        candidates = set(alc)
        train = knowledge.without_family(knowledge.families[i])
        oracle = max(alc, key=lambda p: (alc[p], p))
        selector = make_selector(train, method, k=k)
        selected, mode = None, "none"
        if not selector.empty:
            ranking, info = selector.rank(knowledge.features[i], candidates)
            if ranking:
                selected, mode = ranking[0][0], info["mode"]
        fixed = best_fixed(train, candidates) if len(train.dataset_ids) else None
        rows.append(LodoRow(
            dataset_id=dataset_id, family_id=knowledge.families[i], selected=selected,
            selected_alc=alc[selected] if selected else math.nan, fixed=fixed,
            fixed_alc=alc[fixed] if fixed else math.nan, oracle=oracle, oracle_alc=alc[oracle],
            default_alc=alc.get(default_id) if default_id else None, mode=mode))
    return rows


def _f(value, fmt=".4f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def _mean_line(title: str, rows: list[LodoRow]) -> str:
    mean = lambda values: _f(float(np.nanmean(values)) if not np.all(np.isnan(values)) else math.nan)  # noqa
    sel = np.array([r.selected_alc for r in rows])
    fix = np.array([r.fixed_alc for r in rows])
    orc = np.array([r.oracle_alc for r in rows])
    dfl = np.array([math.nan if r.default_alc is None else r.default_alc for r in rows])
    return (f"| **{title}** ({len(rows)}) | | {mean(sel)} | | {mean(fix)} | | {mean(orc)} | {mean(dfl)} | "
            f"{mean(orc - sel)} | {mean(orc - fix)} |")


class Noise:
    """Run-to-run noise beside the LOFO table: how many runs each cell averages and how much one run's
    ALC varies on each dataset, so a reader can tell a selection gain from a lucky run.

    A dataset's SD is its own replicates' (any pipeline), shrunk toward the store's typical SD
    (`Knowledge.noise_sd_by_dataset`, the selector's own noise model); a cell of n runs has SD sd/sqrt(n).
    """

    def __init__(self, knowledge: Knowledge):
        self.typical = knowledge.noise_sd()
        self.by_dataset = dict(zip(knowledge.dataset_ids, knowledge.noise_sd_by_dataset(self.typical)))
        counts = knowledge.run_counts()
        self.counts = {(d, p): int(counts[i, j]) for i, d in enumerate(knowledge.dataset_ids)
                       for j, p in enumerate(knowledge.pipeline_ids) if not np.isnan(knowledge.alc[i, j])}

    def sd(self, dataset_id: str) -> float:
        return float(self.by_dataset.get(dataset_id, math.nan))

    def runs(self, dataset_id: str, pipeline_id: str | None) -> str:
        return str(self.counts.get((dataset_id, pipeline_id), "-")) if pipeline_id else "-"

    def difference_se(self, rows: list[LodoRow]) -> float:
        """Standard error, from run-to-run noise alone, of mean(selected ALC - fixed ALC) over `rows`."""
        variance = 0.0
        for r in rows:
            if r.selected is None or r.fixed is None or r.selected == r.fixed:
                continue  # the same cell on both sides: no noise in the difference
            sd = self.sd(r.dataset_id)
            n_sel = self.counts.get((r.dataset_id, r.selected), 1)
            n_fix = self.counts.get((r.dataset_id, r.fixed), 1)
            variance += sd * sd * (1.0 / n_sel + 1.0 / n_fix)
        return math.sqrt(variance) / max(len(rows), 1)

    def summary(self, rows: list[LodoRow]) -> str:
        diff = float(np.nanmean([r.selected_alc - r.fixed_alc for r in rows])) if rows else math.nan
        return (f"Noise: one run's ALC varies by SD {_f(self.typical)} on a typical dataset (median over the "
                f"datasets with replicates; noise SD column: each dataset's own, shrunk toward it); selected - "
                f"best fixed = {diff:+.4f} over {len(rows)} datasets, standard error from run-to-run noise "
                f"{_f(self.difference_se(rows))}.")


def markdown_report(rows: list[LodoRow], knowledge: Knowledge, k: int = DEFAULT_K,
                    method: str = DEFAULT_SELECTOR, scope: str = "") -> str:
    """The LODO table with means and noise; `scope` (e.g. which machine's runs) joins the stratum line."""
    label = knowledge.label
    lines = ["# Leave-one-dataset-out evaluation of the selector",
             "",
             f"Stratum: T = {_f(knowledge.time_budget, 'g')} s, hardware {knowledge.hardware or '-'}; "
             f"{len(knowledge.dataset_ids)} datasets ({len(set(knowledge.families))} families), "
             f"{len(knowledge.pipeline_ids)} pipelines; selector {method}"
             f"{f' (k = {k})' if method == 'knn' else ''}. Each row: selector and best fixed pipeline "
             f"fitted without the dataset's family.{' ' + scope if scope else ''}",
             "",
             "| dataset | selected | ALC | best fixed | ALC | oracle | ALC | default ALC | regret sel. "
             "| regret fixed | runs sel./fixed | noise SD |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    noise = Noise(knowledge)
    for r in rows:
        sel = (label(r.selected) if r.selected else "-") + (" (global)" if r.mode == "global" else "")
        lines.append(f"| {r.dataset_id} | {sel} | {_f(r.selected_alc)} | {label(r.fixed) if r.fixed else '-'} | "
                     f"{_f(r.fixed_alc)} | {label(r.oracle)} | {_f(r.oracle_alc)} | {_f(r.default_alc)} | "
                     f"{_f(r.regret_selected)} | {_f(r.regret_fixed)} | {noise.runs(r.dataset_id, r.selected)}/"
                     f"{noise.runs(r.dataset_id, r.fixed)} | {_f(noise.sd(r.dataset_id))} |")
    originals = [r for r in rows if r.is_original]
    derived = [r for r in rows if not r.is_original]
    # The headline is over original datasets: variants are extra training tasks, and averaging them in
    # would weigh a family by how many variants it was given.
    for title, group in (("mean", originals), ("mean, variants", derived)):
        if group:
            lines.append(_mean_line(title, group))
    if originals:
        wins = sum(1 for r in originals if r.selected_alc > r.fixed_alc + 1e-9)
        losses = sum(1 for r in originals if r.selected_alc < r.fixed_alc - 1e-9)
        lines += ["", f"Selector vs best fixed on the {len(originals)} original datasets: {wins} wins, {losses} losses, "
                      f"{len(originals) - wins - losses} ties."
                  + (f" Variant rows ({len(derived)}) are listed but not in the headline mean." if derived else ""),
                  "", noise.summary(originals)]
    elif derived:
        lines += ["", "Only variant datasets have a choice in this stratum."]
    else:
        lines += ["", "No dataset with runs in this stratum."]
    return "\n".join(lines) + "\n"


def batches_section(store_path, knowledge: Knowledge) -> str:
    """How each measuring batch sits against the others on shared cells (meta_db/batches.py)."""
    from meta_db.batches import SUSPECT_SE, batch_offsets, markdown_batches

    run_sd = knowledge.noise_sd()
    offsets = batch_offsets(store_path, knowledge.time_budget, knowledge.hardware)
    return ("\n## Measuring batches\n\nEach batch (the runs of one code version on one machine instance, made "
            "one after another) against the other batches in use, from an additive fit run ALC = cell + batch over the cells "
            "two or more batches measured; offset: the batch's effect, the typical batch at 0. Suspect: beyond "
            f"{SUSPECT_SE:g} standard errors and beyond one run's noise (SD {_f(run_sd)}). A suspect batch can be "
            "kept out of learning with `tools meta-train --retire-code VERSION --reason ...`.\n\n"
            + markdown_batches(offsets, run_sd) + "\n")


def evaluate_store(store_path, time_budget: float | None = None, hardware: str | None = None, k: int = DEFAULT_K,
                   out: str | Path | None = None, method: str = DEFAULT_SELECTOR,
                   machine_instance: str | None = None) -> tuple[list[LodoRow], str]:
    """LODO over one stratum of a store file; writes the markdown to `out` when given.
    `machine_instance`: only the runs of that machine (see `load_knowledge`)."""
    from autodl_core.config import PipelineConfig
    from meta_db.second_choice import gate, with_landmarks

    knowledge = load_knowledge(store_path, time_budget=time_budget, hardware=hardware,
                               machine_instance=machine_instance)
    rows = leave_one_dataset_out(knowledge, k=k, default_id=PipelineConfig().pipeline_id(), method=method)
    scope = f"Runs of machine instance {machine_instance} only." if machine_instance else ""
    text = markdown_report(rows, knowledge, k, method, scope)
    if rows:  # the in-run second look (meta_db/second_choice.py), judged the same way
        landmarks = with_landmarks(knowledge, PipelineConfig().backbone)
        summary = gate(knowledge, landmarks, method, k).summary()
        text += f"\n{summary[0].upper()}{summary[1:]}.\n"
    if knowledge.hardware is not None:
        text += batches_section(store_path, knowledge)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    return rows, text


def write_lodo_stores(store_path, out_dir, k: int = DEFAULT_K,
                      method: str | None = None) -> list[tuple[str, Path, str]]:
    """One store per corpus family with that family left out, and what the selector then picks for it.

    Run the solver on a held-out dataset with AUTODL_META_STORE=<its store> to measure, end to end,
    the selection that the leave-one-dataset-out table only looks up. Returns (family, path, choice).
    """
    from meta_db.metafeatures import zero_shot_vector
    from meta_db.store import Store

    with Store(store_path, readonly=True) as store:
        datasets = {d.dataset_id: d for d in store.datasets()}
        stratum = load_knowledge(store_path)
        families = sorted({datasets[d].family_id for d in stratum.dataset_ids})
        written = []
        for family in families:
            path = store.copy_without_family(family, Path(out_dir) / f"{family}.sqlite")
            held_out = datasets.get(family)
            choice = "-"
            if held_out is not None:
                knowledge = load_knowledge(path, time_budget=stratum.time_budget, hardware=stratum.hardware)
                pipeline_id, reason = make_selector(knowledge, method, k=k).choose(
                    zero_shot_vector(held_out.metadata_features))
                choice = reason if pipeline_id else "default pipeline (nothing measured)"
            written.append((family, path, choice))
    return written
