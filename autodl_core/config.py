"""The pipeline a run follows: every choice the meta-knowledge store can make, with CPU-sane defaults.

A PipelineConfig is a plain record (JSON round-trip, stable id) so that meta_db can store
pipelines, rank them per dataset and hand the chosen one to the solver.
"""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace


# What pipeline ids are measured against, for fields whose default has changed since the first store:
# the old default. Changing a default must neither change the ids of stored pipelines nor hand the new
# default the id of the old one (the store would then count the old default's runs as the new one's).
# The fields of the any-time steps as every pipeline measured before them ran them: one fine-tuning stage.
SINGLE_STAGE = {"anytime_steps": False, "step_backbones": "", "max_step_side": 0, "group_validation": False}
ID_BASELINE = {"top_lr": 0.002, "first_chunk_seconds": 1.5, **SINGLE_STAGE}


# Every field belongs to the stage of the run that reads it, so that a member reads as what it changes
# (`PipelineConfig.changes`):
#   data      what is read, stored and held out before the first prediction (sizes, chunks, validation split)
#   probe     the backbone, the frozen probe and the strategy that follows it
#   device    what a GPU run does differently (batch, probe examples)
#   ensemble  the candidates the prediction may combine
#   steps     the any-time steps: on or off, their backbones, sizes and validation grouping
#   finetune  the fine-tuning itself: resolution, optimiser, augmentation, test-time flips, growth
#   schedule  when fine-tuning checks validation, predicts and stops
STAGES = ("data", "probe", "device", "ensemble", "steps", "finetune", "schedule")


def _in(stage: str, default, after_probe: bool | None = None):
    """A field of `stage`. `after_probe`: read only once fine-tuning starts (default: the finetune and
    schedule stages), so a run at the end of its probe can still take any value of it."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}")
    if after_probe is None:
        after_probe = stage in ("finetune", "schedule")
    return field(default=default, metadata={"stage": stage, "after_probe": after_probe})


@dataclass(frozen=True)
class PipelineConfig:
    backbone: str = _in("probe", "mobilenetv2_100")
    # Resolutions (shorter side, pixels) for the frozen probe and fine-tuning; 0 = decided from the data
    # (fine-tuning: the probe's size in top mode). A top-mode finetune_resolution other than the probe's
    # rebuilds the trunk-activation caches at it once the probe has predicted.
    probe_resolution: int = _in("probe", 0)
    finetune_resolution: int = _in("finetune", 0)
    max_resolution: int = _in("data", 128)
    # "probe": frozen features + linear head only; "finetune_top": the blocks after `trunk_blocks`
    # fine-tuned on cached trunk activations (CPU); "finetune": the whole network on images with
    # augmentation (GPU); "auto": finetune on a GPU, finetune_top on a CPU.
    strategy: str = _in("probe", "auto")
    trunk_blocks: int = _in("probe", 4)
    freeze_fraction: float = _in("probe", 0.3)  # share of backbone blocks kept frozen by "finetune"
    lr: float = _in("finetune", 0.01)
    top_lr: float = _in("finetune", 0.016)  # measured best on a CPU at T = 300 s (0.002 until 0.1.9: ID_BASELINE)
    top_dropout: float = _in("finetune", 0.2)
    batch_size: int = _in("finetune", 64)
    # On a GPU (see autodl_core/device_plan.py): full fine-tuning's images per step (the learning rate
    # scaled by sqrt(batch / batch_size)) and how many examples the frozen probe may use (features
    # cost ~0.05 ms an image there, so all of a large set fits in the first seconds).
    gpu_batch_size: int = _in("device", 256)
    gpu_probe_max_examples: int = _in("device", 100000)
    weight_decay: float = _in("finetune", 5e-5)
    ema_decay: float = _in("finetune", 0.98)
    label_smoothing: float = _in("finetune", 0.1)
    augment_flip: bool = _in("finetune", True)
    augment_shift: float = _in("finetune", 0.1)
    probe_max_examples: int = _in("data", 5000)  # frozen-feature probe uses at most this many training examples
    # Data read before the very first (thumbnail) prediction. 0.5 s (was 1.5 until 0.1.10: see
    # ID_BASELINE): early on each second costs ~0.9% ALC, while 1,000 examples instead of 4,000 cost the
    # thumbnail head only 0.01-0.02 NAUC, and only until the probe's prediction a few seconds later.
    first_chunk_seconds: float = _in("data", 0.5)
    slice_growth: float = _in("schedule", 1.6)  # each fine-tuning slice is this much longer than the previous one
    first_slice_seconds: float = _in("schedule", 8.0)
    patience_slices: int = _in("schedule", 4)  # fine-tuning stops after this many slices without a validation gain
    max_epochs_without_val: int = _in("schedule", 60)  # tiny data without a validation split: stop after these
    # Any-time extras, each applied only when the validation split says it helps or time allows.
    ensemble_checkpoints: int = _in("ensemble", 3)  # fine-tuned checkpoints kept as ensemble candidates
    flip_tta: bool = _in("finetune", True)  # try horizontal-flip test-time augmentation (kept if validation gains)
    resolution_growth: float = _in("finetune", 1.5)  # when fine-tuning plateaus with time left, grow by this
    max_resolution_growths: int = _in("finetune", 2)
    # A checkpoint replaces the prediction only when its validation gain exceeds this many standard
    # errors of the paired gain (bootstrap over the validation examples): tiny splits cannot fool it.
    val_noise_z: float = _in("schedule", 1.0)
    val_fraction: float = _in("data", 0.1)
    val_max: int = _in("data", 800)
    # What the solver may add to its process's memory (autodl_core/memory.py): the backbones with their
    # inference engines (solver._step_backbones), the stored images (run_data), the steps' activation
    # caches (steps._sides); the libraries loaded before the solver starts are outside it.
    memory_cap_gb: float = _in("data", 4.0)
    # The any-time steps (CPU top mode; autodl_core/stages/steps.py): after the first probe, steps of
    # growing strength, each started when the last one plateaus: a frozen probe of a backbone at the
    # largest size the budget affords (up to `max_step_side` px, from the data's own size), its top
    # fine-tuned where epochs fit, the `step_backbones` after `backbone`, larger sizes; the prediction is
    # the validation-best ensemble across steps. Images are stored at the size the steps may use (within
    # the memory cap) instead of `max_resolution`. Off: one fine-tuning stage at fixed sizes.
    anytime_steps: bool = _in("steps", True)
    # comma-separated, tried in this order (read once the steps start, after the first probe)
    step_backbones: str = _in("steps", "efficientnet_lite0,efficientnet_lite2", after_probe=True)
    max_step_side: int = _in("steps", 288, after_probe=True)
    # Rebuild the validation split from whole near-duplicate clusters when held-out examples have
    # near-duplicates on the training side far more often than test examples (autodl_core/validation.py).
    group_validation: bool = _in("steps", True, after_probe=True)
    extra: dict = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict:
        return asdict(self)

    def changes(self, base: "PipelineConfig | None" = None) -> dict[str, dict]:
        """What this pipeline changes against `base` (today's defaults), by stage: {stage: {field: value}},
        stages in run order, empty stages left out (a member reads as what it changes)."""
        base = base if base is not None else PipelineConfig()
        grouped: dict[str, dict] = {}
        for f in fields(self):
            if f.name != "extra" and getattr(self, f.name) != getattr(base, f.name):
                grouped.setdefault(f.metadata["stage"], {})[f.name] = getattr(self, f.name)
        return {stage: grouped[stage] for stage in STAGES if stage in grouped}

    def describe(self, base: "PipelineConfig | None" = None) -> str:
        """`changes` in one line: "probe: strategy=probe | finetune: top_lr=0.002" ("defaults" when none)."""
        parts = [f"{stage}: " + " ".join(f"{k}={v}" for k, v in values.items())
                 for stage, values in self.changes(base).items()]
        return " | ".join(parts) or "defaults"

    @classmethod
    def from_dict(cls, data: dict) -> "PipelineConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown pipeline fields: {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def from_record(cls, data: dict) -> "PipelineConfig":
        """A stored pipeline (the store, a benchmark's JSON): a field the record lacks was written before the
        field existed, so it takes the value that meant what the run did then (ID_BASELINE), not today's
        default (a pipeline measured as one fine-tuning stage stays one)."""
        known = {f.name for f in fields(cls)}
        filled = {k: v for k, v in ID_BASELINE.items() if k not in data and k in known}
        return cls.from_dict({**filled, **data})

    def as_steps(self) -> "PipelineConfig":
        """This pipeline as the first step of the any-time steps (the store measured its members as single
        stages; its choice sets the backbone and the first sizes, the steps go on from there)."""
        if self.anytime_steps:
            return self
        defaults = PipelineConfig()
        return replace(self, **{k: getattr(defaults, k) for k in SINGLE_STAGE})

    def resolved_strategy(self, device_type: str) -> str:
        """The strategy a run on `device_type` ("cuda" or "cpu") follows: "auto" resolved."""
        if self.strategy != "auto":
            return self.strategy
        return "finetune" if device_type == "cuda" else "finetune_top"

    def probe_phase(self, device_type: str) -> tuple:
        """The settings a run on `device_type` has acted on by the end of its probe stage (all but
        FINETUNE_FIELDS; the strategy as resolved there)."""
        settings = {k: v for k, v in self.to_dict().items() if k not in FINETUNE_FIELDS | {"extra"}}
        settings["strategy"] = self.resolved_strategy(device_type)
        return tuple(sorted((k, repr(v)) for k, v in settings.items()))

    def uses_steps(self, device_type: str) -> bool:
        """Whether a run on `device_type` goes through the any-time steps: CPU top mode (a GPU fine-tunes the
        whole network as before: the steps are not measured there yet)."""
        return self.anytime_steps and device_type == "cpu" and self.resolved_strategy(device_type) == "finetune_top"

    def step_backbone_names(self) -> list[str]:
        """The backbones the steps use, in order: the pipeline's own first."""
        names = [self.backbone] + [b.strip() for b in self.step_backbones.split(",") if b.strip()]
        return list(dict.fromkeys(names))

    def same_until_finetuning(self, other: "PipelineConfig", device_type: str) -> bool:
        """Whether a run of `self` on `device_type` can become a run of `other` at the end of its probe."""
        return self.probe_phase(device_type) == other.probe_phase(device_type)

    def pipeline_id(self) -> str:
        """Stable id: a hash of the fields that differ from the baseline (extra excluded).

        The baseline is the defaults, with ID_BASELINE's values for defaults that changed. Adding a
        new field with a default therefore keeps every stored pipeline's id, and so does changing a
        default (record the old value in ID_BASELINE).
        """
        baseline = _id_baseline()
        data = {k: v for k, v in self.to_dict().items() if k != "extra" and v != baseline[k]}
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha1(blob).hexdigest()[:12]


def fields_of(stage: str) -> tuple[str, ...]:
    """The fields of one stage, in declaration order."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}: one of {', '.join(STAGES)}")
    return tuple(f.name for f in fields(PipelineConfig) if f.metadata.get("stage") == stage)


# Fields read only once fine-tuning starts (autodl_core/stages/finetune.py, autodl_core/growth.py, the steps):
# a run at the end of its probe stage can still take any value of these. Every other field (backbone, probe
# resolution, strategy, trunk depth, validation split, first chunk...) has shaped the run by then.
FINETUNE_FIELDS = frozenset(f.name for f in fields(PipelineConfig) if f.metadata.get("after_probe"))


@functools.lru_cache(maxsize=1)
def _id_baseline() -> dict:
    """The defaults with ID_BASELINE's old values: computed once (ids are hashed in loops)."""
    return {**PipelineConfig().to_dict(), **ID_BASELINE}
