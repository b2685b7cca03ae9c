"""The pipeline a run follows: every choice the meta-knowledge store can make, with CPU-sane defaults.

A PipelineConfig is a plain record (JSON round-trip, stable id) so that meta_db can store
pipelines, rank them per dataset and hand the chosen one to the solver.
"""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass, field, fields


# What pipeline ids are measured against, for fields whose default has changed since the first store:
# the old default. Changing a default must neither change the ids of stored pipelines nor hand the new
# default the id of the old one (the store would then count the old default's runs as the new one's).
ID_BASELINE = {"top_lr": 0.002, "first_chunk_seconds": 1.5}


# Fields read only once fine-tuning starts (autodl_core/stages/finetune.py, autodl_core/growth.py): a run
# at the end of its probe stage can still take any value of these. Every other field (backbone, probe
# resolution, strategy, trunk depth, validation split, first chunk...) has shaped the run by then.
FINETUNE_FIELDS = frozenset({
    "finetune_resolution", "lr", "top_lr", "top_dropout", "batch_size", "weight_decay", "ema_decay",
    "label_smoothing", "augment_flip", "augment_shift", "slice_growth", "first_slice_seconds",
    "patience_slices", "max_epochs_without_val", "flip_tta", "resolution_growth", "max_resolution_growths",
    "val_noise_z",
})


@dataclass(frozen=True)
class PipelineConfig:
    backbone: str = "mobilenetv2_100"
    # Resolutions (shorter side, pixels) for the frozen probe and fine-tuning; 0 = decided from the data
    # (fine-tuning: the probe's size in top mode). A top-mode finetune_resolution other than the probe's
    # rebuilds the trunk-activation caches at it once the probe has predicted.
    probe_resolution: int = 0
    finetune_resolution: int = 0
    max_resolution: int = 128
    # "probe": frozen features + linear head only; "finetune_top": the blocks after `trunk_blocks`
    # fine-tuned on cached trunk activations (CPU); "finetune": the whole network on images with
    # augmentation (GPU); "auto": finetune on a GPU, finetune_top on a CPU.
    strategy: str = "auto"
    trunk_blocks: int = 4
    freeze_fraction: float = 0.3  # share of backbone blocks kept frozen by "finetune"
    lr: float = 0.01
    top_lr: float = 0.016  # measured best on a CPU at T = 300 s (was 0.002 until stop 9: see ID_BASELINE)
    top_dropout: float = 0.2
    batch_size: int = 64
    # On a GPU (see autodl_core/device_plan.py): full fine-tuning's images per step (the learning rate
    # scaled by sqrt(batch / batch_size)) and how many examples the frozen probe may use (features
    # cost ~0.05 ms an image there, so all of a large set fits in the first seconds).
    gpu_batch_size: int = 256
    gpu_probe_max_examples: int = 100000
    weight_decay: float = 5e-5
    ema_decay: float = 0.98
    label_smoothing: float = 0.1
    augment_flip: bool = True
    augment_shift: float = 0.1
    probe_max_examples: int = 5000  # frozen-feature probe uses at most this many training examples
    # Data read before the very first (thumbnail) prediction. 0.5 s (was 1.5 until stop 10: see
    # ID_BASELINE): early on each second costs ~0.9% ALC, while 1,000 examples instead of 4,000 cost the
    # thumbnail head only 0.01-0.02 NAUC, and only until the probe's prediction a few seconds later.
    first_chunk_seconds: float = 0.5
    slice_growth: float = 1.6  # each fine-tuning slice is this much longer than the previous one
    first_slice_seconds: float = 8.0
    patience_slices: int = 4  # fine-tuning stops after this many slices without a validation gain
    max_epochs_without_val: int = 60  # tiny data without a validation split: stop after this many epochs
    # Any-time extras, each applied only when the validation split says it helps or time allows.
    ensemble_checkpoints: int = 3  # fine-tuned checkpoints kept as ensemble candidates
    flip_tta: bool = True  # try horizontal-flip test-time augmentation (kept only if validation gains)
    resolution_growth: float = 1.5  # when fine-tuning plateaus with time left, grow the resolution by this
    max_resolution_growths: int = 2
    # A checkpoint replaces the prediction only when its validation gain exceeds this many standard
    # errors of the paired gain (bootstrap over the validation examples): tiny splits cannot fool it.
    val_noise_z: float = 1.0
    val_fraction: float = 0.1
    val_max: int = 800
    memory_cap_gb: float = 4.0
    extra: dict = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PipelineConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown pipeline fields: {sorted(unknown)}")
        return cls(**data)

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


@functools.lru_cache(maxsize=1)
def _id_baseline() -> dict:
    """The defaults with ID_BASELINE's old values: computed once (ids are hashed in loops)."""
    return {**PipelineConfig().to_dict(), **ID_BASELINE}
