"""Meta-features: what the store matches datasets on, in three groups with different costs.

- metadata features (free, available in `Model.__init__`): train size, classes, rows/cols (or
  variable), channels. The zero-shot selector uses only these plus the hardware kind.
- data features (need a first chunk of examples, so only during a run or offline): label
  cardinality, class imbalance, pixel statistics, and landmarkers: the validation NAUC of a
  linear head on raw thumbnails and, optionally, on frozen pretrained features. Stored per
  dataset for a later, in-run second choice (see docs/metalearning.md); not used zero-shot.
- hardware features: device kind, CPU count, GPU name, optionally a measured backbone
  throughput. They stratify the runs (runs on a CPU say little about a GPU) rather than
  enter the distance.

`zero_shot_vector` turns metadata features into the numeric vector the selector compares: one small
function per zero-shot meta-feature, in one ordered registry (ZERO_SHOT_FEATURES, names ZERO_SHOT_NAMES).
"""
from __future__ import annotations

import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

# Used when the metadata gives no fixed size (rows or cols = -1): a typical working side.
VARIABLE_SIZE_SIDE = 64


# ---------------------------------------------------------------------- metadata (zero-shot)


def metadata_features(metadata) -> dict:
    """From the kit's AutoDLMetadata (or ours, same methods) of the training split."""
    rows, cols = (int(v) for v in metadata.get_matrix_size(0))
    channels = int(metadata.get_num_channels(0)) if hasattr(metadata, "get_num_channels") else -1
    return {"n_train": int(metadata.size()), "n_classes": int(metadata.get_output_size()),
            "rows": rows, "cols": cols, "channels": channels,
            "variable_size": bool(rows <= 0 or cols <= 0)}


@dataclass(frozen=True)
class ZeroShotMetadata:
    """The metadata features the zero-shot meta-features read, as numbers (`zero_shot_metadata` checks them)."""

    n_train: float
    n_classes: float
    rows: float
    cols: float
    channels: float

    @property
    def variable_size(self) -> bool:
        """No fixed image size: rows or cols unknown (<= 0) or not a number."""
        return self.rows <= 0 or self.cols <= 0 or not (math.isfinite(self.rows) and math.isfinite(self.cols))

    @property
    def side(self) -> float:
        """The shorter image side (VARIABLE_SIZE_SIDE for variable-size images)."""
        return VARIABLE_SIZE_SIDE if self.variable_size else min(self.rows, self.cols)


# The zero-shot meta-features, one small function each, in the order of the vector the selector compares
# (`zero_shot_vector`): the registration order, i.e. the order of definition below.
ZERO_SHOT_FEATURES: dict[str, Callable[[ZeroShotMetadata], float]] = {}


def zero_shot_feature(function: Callable[[ZeroShotMetadata], float]) -> Callable[[ZeroShotMetadata], float]:
    """Registers `function` as the zero-shot meta-feature named after it, after the ones registered before."""
    ZERO_SHOT_FEATURES[function.__name__] = function
    return function


@zero_shot_feature
def log_n_train(m: ZeroShotMetadata) -> float:
    return math.log10(m.n_train)


@zero_shot_feature
def log_n_classes(m: ZeroShotMetadata) -> float:
    return math.log10(m.n_classes)


@zero_shot_feature
def log_examples_per_class(m: ZeroShotMetadata) -> float:
    return math.log10(max(m.n_train / m.n_classes, 1e-3))


@zero_shot_feature
def log_side(m: ZeroShotMetadata) -> float:
    return math.log2(max(m.side, 1.0))


@zero_shot_feature
def log_aspect(m: ZeroShotMetadata) -> float:
    """|log2(rows / cols)|: 0 for square images, and for variable-size ones (no aspect known)."""
    return 0.0 if m.variable_size else abs(math.log2(m.rows / m.cols))


@zero_shot_feature
def color(m: ZeroShotMetadata) -> float:
    return 1.0 if m.channels >= 3 else 0.0


@zero_shot_feature
def variable_size(m: ZeroShotMetadata) -> float:
    return 1.0 if m.variable_size else 0.0


ZERO_SHOT_NAMES = tuple(ZERO_SHOT_FEATURES)


def zero_shot_metadata(features: dict) -> ZeroShotMetadata:
    """`metadata_features` as numbers; ValueError when one is missing or not a number, or when there is not
    at least one training example and one class."""
    try:
        n_train = float(features["n_train"])
        n_classes = float(features["n_classes"])
        rows, cols = float(features["rows"]), float(features["cols"])
        channels = float(features.get("channels", -1))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"incomplete metadata features {features!r}: {exc}") from None
    if not (n_train >= 1 and n_classes >= 1 and math.isfinite(n_train) and math.isfinite(n_classes)):
        raise ValueError(f"metadata features need n_train >= 1 and n_classes >= 1, got {features!r}")
    return ZeroShotMetadata(n_train, n_classes, rows, cols, channels)


def zero_shot_vector(features: dict) -> np.ndarray:
    """Numeric vector (ZERO_SHOT_NAMES order) from `metadata_features`; raises ValueError on nonsense."""
    metadata = zero_shot_metadata(features)
    vector = np.array([feature(metadata) for feature in ZERO_SHOT_FEATURES.values()], dtype=np.float64)
    if not np.all(np.isfinite(vector)):
        raise ValueError(f"metadata features give a non-finite vector: {features!r}")
    return vector


def zero_shot_of(metadata) -> np.ndarray:
    """The zero-shot vector of a run's metadata (the kit's AutoDLMetadata): what the selector and the
    in-run second choice compare with the store's datasets."""
    return zero_shot_vector(metadata_features(metadata))


# ---------------------------------------------------------------------- hardware


def cpu_model() -> str:
    """The processor's name ("AMD EPYC 7B13", "Intel(R) Xeon(R) ..."), "" when unknown.

    Recorded with every run: two machines of one stratum key (cpu2) differ by up to 0.05 ALC on one
    dataset for every pipeline (0.1.19: peta 0.49 on a Xeon, 0.44 on an EPYC), so comparisons
    between pipelines are only fair within one model.
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or ""


def machine_instance() -> str:
    """This boot of this machine (the first 8 hex digits of Linux's boot id), "" where unknown.

    Two instances of one CPU model can score apart too (0.1.21: ten runs on one AMD EPYC instance
    sat 0.03-0.11 below the same cells' runs on another), so runs record which instance measured them
    and `meta_db.batches` can tell measuring batches apart.
    """
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip().replace("-", "")[:8]
    except OSError:
        return ""


def hardware_profile(measure_backbone: str | None = None, resolution: int = 64, use_torch: bool = True) -> dict:
    """Device kind, CPU count, GPU name; `key` names the stratum runs are grouped by.

    The device kind is what torch sees (what the solver will use), so torch is imported unless
    `use_torch` is False (then 'cpu' unless torch is already loaded). With `measure_backbone`, also
    the backbone's measured feature throughput (images/s at `resolution`): costs a model build, so
    meta-training does it once, never the selector.
    """
    cpus = os.cpu_count() or 1
    kind, gpu = "cpu", None
    torch = sys.modules.get("torch")
    if torch is None and (use_torch or measure_backbone):
        import torch  # noqa: F811
    if torch is not None:
        try:
            if torch.cuda.is_available():
                kind, gpu = "cuda", torch.cuda.get_device_name(0)
        except Exception:  # a broken CUDA setup runs on the CPU
            pass
    info = {"kind": kind, "cpu_count": cpus, "gpu": gpu, "machine": platform.machine(), "cpu_model": cpu_model(),
            "machine_instance": machine_instance(), "key": hardware_key(kind, cpus, gpu)}
    if measure_backbone:
        info["throughput"] = {measure_backbone: measure_throughput(measure_backbone, resolution, device=kind)}
        info["throughput_resolution"] = resolution
    return info


def hardware_key(kind: str, cpu_count: int, gpu: str | None = None) -> str:
    if kind == "cuda":
        name = "".join(ch if ch.isalnum() else "-" for ch in (gpu or "gpu")).strip("-").lower()
        return f"cuda-{name}"
    return f"cpu{int(cpu_count)}"


def current_device_kind() -> str:
    """'cuda' or 'cpu' without importing torch when it is not loaded yet (model.py loads it first)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return "cpu"
    try:
        return "cuda" if torch.cuda.is_available() else "cpu"
    except Exception:
        return "cpu"


def measure_throughput(backbone: str, resolution: int = 64, batch: int = 32, device: str = "cpu") -> float:
    """Images/s of frozen feature extraction (after a warm-up call)."""
    import torch

    from pretrained import create_backbone

    model = create_backbone(backbone, pretrained=False, num_classes=0).to(device).eval()
    x = torch.randn(batch, 3, resolution, resolution, device=device)
    with torch.inference_mode():
        model(x)  # warm-up at the timed shape: first calls build kernels
        best = float("inf")
        for _ in range(3):  # best of three: other processes on the machine only slow it down
            started = time.perf_counter()
            model(x)
            if device == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - started)
        return batch / max(1e-6, best)


# ---------------------------------------------------------------------- data (first chunk)


def data_features(images: np.ndarray, labels: np.ndarray, landmark_backbone: str | None = None,
                  seed: int = 0) -> dict:
    """Data meta-features from a first chunk: `images` uint8 N x H x W x C (one size), `labels` N x K 0/1."""
    images = np.asarray(images)
    labels = np.asarray(labels, dtype=np.float32)
    if images.ndim != 4 or len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"need N x H x W x C images and N label rows, got {images.shape} and {labels.shape}")
    row_sums = labels.sum(axis=1)
    prior = labels.mean(axis=0)
    present = prior[prior > 0]
    p = present / present.sum() if present.sum() > 0 else present
    entropy = float(-(p * np.log(p)).sum() / math.log(len(labels[0]))) if len(labels[0]) > 1 and len(p) else 1.0
    pixels = images.astype(np.float32) / 255.0
    features = {
        "chunk_size": int(len(images)),
        "multilabel": bool(np.any(np.abs(row_sums - 1) > 1e-6)),
        "label_cardinality": float(row_sums.mean()),
        "classes_seen": int((prior > 0).sum()),
        "imbalance_ratio": float(present.max() / present.min()) if len(present) else 1.0,
        "class_entropy": entropy,
        "pixel_mean": float(pixels.mean()),
        "pixel_std": float(pixels.std()),
        "channel_spread": float(pixels.mean(axis=(0, 1, 2)).std()) if images.shape[-1] > 1 else 0.0,
        "chunk_height": int(images.shape[1]), "chunk_width": int(images.shape[2]),
    }
    features["landmark_thumbnail_nauc"] = landmark_nauc(_thumbnail_features(images), labels, seed)
    if landmark_backbone:
        feats = _frozen_features(images, landmark_backbone)
        features[f"landmark_probe_nauc_{landmark_backbone}"] = landmark_nauc(feats, labels, seed)
    return features


def landmark_nauc(features: np.ndarray, labels: np.ndarray, seed: int = 0, val_fraction: float = 0.3) -> float | None:
    """Validation NAUC of the solver's own linear head on `features` (None when no usable split)."""
    from autodl_core.heads import LinearHead
    from autodl_core.metrics import nauc

    n = len(labels)
    if n < 10:
        return None
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(2, int(round(val_fraction * n)))
    val, fit = order[:n_val], order[n_val:]
    multilabel = bool(np.any(np.abs(labels.sum(axis=1) - 1) > 1e-6))
    head = LinearHead(multilabel, l2=1e-2).fit(features[fit], labels[fit], max_iter=60)
    score = nauc(labels[val], head.predict_proba(features[val]))
    return None if not math.isfinite(score) else float(score)


def _thumbnail_features(images: np.ndarray) -> np.ndarray:
    from autodl_core.heads import thumbnails

    return thumbnails(images)


def _frozen_features(images: np.ndarray, backbone: str, resolution: int = 64, batch: int = 128) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    from pretrained import create_backbone, get_spec

    spec = get_spec(backbone)
    model = create_backbone(backbone, pretrained=True, num_classes=0).eval()
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch):
            x = torch.from_numpy(np.ascontiguousarray(images[start:start + batch])).permute(0, 3, 1, 2).float() / 255
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
            out.append(model((x - mean) / std).numpy())
    return np.concatenate(out)


def read_first_chunk(dataset_dir, max_examples: int = 1000, side: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """The first training examples of an AutoDL dataset (kit order), resized to one size, as uint8.

    Imports TensorFlow (eager): callers that also use torch must have imported torch (and
    torch._dynamo) first, see the notes on triton.
    """
    from PIL import Image

    from autodl_data.autodl_format import AutoDLDataset, find_task

    task = find_task(dataset_dir, check_solution=False)
    dataset = AutoDLDataset(str(task.train_dir)).get_dataset().take(max_examples)
    images, labels = [], []
    for example, label in dataset.as_numpy_iterator():
        frame = np.asarray(example, dtype=np.float32)[0]  # [T, H, W, C] -> first frame
        if frame.max() <= 1.0:  # decoded images come as floats in [0, 1]
            frame = frame * 255.0
        frame = np.clip(np.round(frame), 0, 255).astype(np.uint8)
        pil = Image.fromarray(frame[..., 0] if frame.shape[-1] == 1 else frame[..., :3])
        if pil.size != (side, side):  # one size for the chunk; the aspect ratio does not matter here
            pil = pil.resize((side, side), Image.BILINEAR)
        arr = np.asarray(pil)
        images.append(arr[..., None] if arr.ndim == 2 else arr)
        labels.append(np.asarray(label, dtype=np.float32))
    if not images:
        raise ValueError(f"{dataset_dir}: the training split yielded no example")
    return np.stack(images), np.stack(labels)
