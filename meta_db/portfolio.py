"""The portfolio: a small set of named pipelines that differ in the choices that matter on a CPU.

Meta-training runs each of them on each dataset; the selector then picks among them. Names are
for people; the store keys pipelines by `PipelineConfig.pipeline_id()`, a hash of the fields, so
changing a pipeline's fields makes it a new pipeline (old runs stay attached to the old id).
Keep the set small (each member costs one run per dataset and budget).
"""
from __future__ import annotations

from autodl_core.config import ID_BASELINE, SINGLE_STAGE, PipelineConfig


def measured(**changes) -> PipelineConfig:
    """A member measured before some defaults changed: it keeps their old values (ID_BASELINE), so its
    id, and the runs stored under it, stay its own whatever today's defaults are."""
    return PipelineConfig(**{**ID_BASELINE, **changes})


def single_stage(**changes) -> PipelineConfig:
    """A member measured as one fine-tuning stage, before the any-time steps: today's defaults otherwise.
    The shipped store's choice among these sets the first step of a run (PipelineConfig.as_steps)."""
    return PipelineConfig(**{**SINGLE_STAGE, **changes})


PORTFOLIO: dict[str, PipelineConfig] = {
    # the solver's defaults: any-time steps after the first probe (autodl_core/stages/steps.py): probes and
    # fine-tuning at sizes from the data and the budget, MobileNetV2 then EfficientNet-Lite0 and Lite2;
    # not yet measured through the kit on the store's families
    "anytime": PipelineConfig(),
    # the single-stage default measured in the store: MobileNetV2, resolutions from the data, strategy
    # "auto" (finetune_top on a CPU: the top blocks tuned on cached trunk activations; finetune on a GPU),
    # top learning rate 0.016, first prediction after 0.5 s of reading
    "default": single_stage(),
    # the default of 0.1.9-0.1.10 (first chunk 1.5 s; measured as "mnv2-top-lr16" in 0.1.8);
    # retired from the shipped store's choice in 0.1.19, like r96 (`tools meta-train --retire-pipeline`)
    "mnv2-top-lr16": measured(top_lr=0.016),
    # the first default, top learning rate 0.002
    "mnv2-top-lr2": measured(),
    # frozen features + linear head only: no fine-tuning cost, best when data is tiny or time short
    "mnv2-probe": measured(strategy="probe"),
    # partial fine-tuning at fixed working resolutions: small (glyphs, 8-28 px sources), larger (100+ px photos)
    "mnv2-top-r32": measured(strategy="finetune_top", probe_resolution=32, finetune_resolution=32),
    "mnv2-top-r96": single_stage(strategy="finetune_top", probe_resolution=96, finetune_resolution=96,
                                   batch_size=32),
    # the probe at the default (cheap, early) size, the top fine-tuned at 96 px: r96's better final
    # NAUC on photos without its later first probe prediction
    "mnv2-top-f96": single_stage(strategy="finetune_top", finetune_resolution=96, batch_size=32),
    # the same probe, the top fine-tuned at 128 px: for photos of 100 px and more, where f96 still gained
    # most over the default (flowers17 +0.038, wbc +0.061 in 0.1.17); switchable with both after the probe
    "mnv2-top-f128": single_stage(strategy="finetune_top", finetune_resolution=128, batch_size=32),
    # the same at 160 px (storage at 160 px): measured on the three photo families where f128 won most
    # (0.1.20); never ahead of f128 there
    "mnv2-top-f160": single_stage(strategy="finetune_top", finetune_resolution=160, batch_size=32,
                                    max_resolution=160),
    # EfficientNet-Lite0 in f128's place: a better frozen probe (earlier, higher first predictions),
    # slower fine-tuning steps on a CPU (0.1.20)
    "lite0-top-f128": single_stage(backbone="efficientnet_lite0", strategy="finetune_top",
                                     finetune_resolution=128, batch_size=32),
    # between the first default and the current one, and twice the current one (peta and cifar10
    # still gained from 0.008 to 0.016)
    "mnv2-top-lr8": measured(top_lr=0.008),
    "mnv2-top-lr32": measured(top_lr=0.032),
    # schedule: shorter first slice and slower growth -> earlier, more frequent predictions
    "mnv2-top-quick": measured(strategy="finetune_top", first_slice_seconds=4.0, slice_growth=1.4),
    # full fine-tuning on images with augmentation (the GPU default; on a CPU only for small sets)
    "mnv2-finetune": measured(strategy="finetune"),
    # EfficientNet-Lite0: slower on a CPU, often better features
    "lite0-top": measured(backbone="efficientnet_lite0", strategy="finetune_top"),
    "lite0-finetune-r96": single_stage(backbone="efficientnet_lite0", strategy="finetune", probe_resolution=96,
                                         finetune_resolution=96, lr=0.005, batch_size=32),
}

# Members measured and retired outside the portfolio: `--pipelines portfolio` does not run them, but
# their names and ids stay on record (the store's runs of them are named; `--pipelines NAME` still runs one).
TRIED: dict[str, PipelineConfig] = {
    # EfficientNet-Lite2 in lite0's place (the strongest offline backbone of the three Lites): measured on
    # DTD in 0.1.22, 0.9081 against lite0's 0.9198; retired
    "lite2-top-f128": single_stage(backbone="efficientnet_lite2", strategy="finetune_top",
                                     finetune_resolution=128, batch_size=32),
    # full fine-tuning (the whole network but its first 30% of blocks, on augmented images at the
    # working size from the data) after the same thumbnails and probe: the most of the network tuned
    # on a CPU. Official kit on all 26 families in 0.1.22: ahead only on PneumoniaMNIST (0.9104 and
    # 0.9127 against f96's 0.8675 in the same measuring batch), behind on most; retired. Version 0.1.23's three medical
    # families (brain MRI, knee X-rays, RetinaMNIST): behind f96 on each, so the lead is one set's
    "mnv2-full-ft": single_stage(strategy="finetune"),
}

STRATEGIES = ("probe", "finetune_top", "finetune", "auto")


def known_members() -> dict[str, PipelineConfig]:
    """Every named pipeline: the portfolio, then the members tried and retired outside it."""
    return {**PORTFOLIO, **TRIED}


def live_pipelines(in_use: list[tuple[str, str | None, dict]], backbone_ok=None) -> dict[str, tuple[str, PipelineConfig]]:
    """The pipelines the selector may choose, {pipeline_id: (name, config)}: the one place that says which are live.

    A pipeline is live when
      1. the store holds it with runs in use (`Store.pipelines_in_use`: not retired with `tools meta-train
         --retire-pipeline`, measured by a code version in use): pass that list as `in_use`;
      2. this code can read its record (a record of another code version cannot be run by this one);
      3. its backbone runs here (`backbone_ok(name)`: registered, weights found; None: every backbone).
    PORTFOLIO and TRIED only say what meta-training measures; a member that was never measured is not live,
    and one measured and retired stays on record but is not. Names: today's portfolio name where the id is
    a member's (names outlive renames), else the name the store recorded."""
    current_names = {pipeline_id: name for name, pipeline_id in portfolio_ids().items()}
    live = {}
    for pipeline_id, name, raw in in_use:
        try:
            config = PipelineConfig.from_record(raw)
        except (TypeError, ValueError):
            continue
        if backbone_ok is not None and not backbone_ok(config.backbone):
            continue
        live[pipeline_id] = (current_names.get(pipeline_id, name), config)
    return live


def portfolio_ids() -> dict[str, str]:
    """{name: pipeline_id}."""
    return {name: config.pipeline_id() for name, config in PORTFOLIO.items()}


def name_of(pipeline_id: str) -> str | None:
    for name, config in known_members().items():
        if config.pipeline_id() == pipeline_id:
            return name
    return None


def resolve_pipelines(specs: list[str],
                      known: dict[str, PipelineConfig] | None = None) -> list[tuple[str, PipelineConfig]]:
    """'portfolio' -> every member; otherwise each spec is a member's name (portfolio or TRIED) or a pipeline id.

    `known` adds {pipeline_id: config} pairs (e.g. from the store) for ids outside the portfolio.
    Raises ValueError naming the unknown specs.
    """
    members = known_members()
    by_id = {config.pipeline_id(): (name, config) for name, config in members.items()}
    for pipeline_id, config in (known or {}).items():
        by_id.setdefault(pipeline_id, (pipeline_id, config))
    chosen: list[tuple[str, PipelineConfig]] = []
    unknown = []
    for spec in specs:
        spec = spec.strip()
        if spec == "portfolio":
            chosen.extend(PORTFOLIO.items())
        elif spec in members:
            chosen.append((spec, members[spec]))
        elif spec in by_id:
            chosen.append(by_id[spec])
        else:
            unknown.append(spec)
    if unknown:
        raise ValueError(f"unknown pipeline(s) {unknown}: use 'portfolio', a portfolio name "
                         f"({', '.join(PORTFOLIO)}) or a pipeline id from the store")
    seen, unique = set(), []
    for name, config in chosen:
        if config.pipeline_id() not in seen:
            seen.add(config.pipeline_id())
            unique.append((name, config))
    if not unique:
        raise ValueError("no pipeline given")
    return unique
