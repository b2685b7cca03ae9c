"""Dataset augmentation for meta-training: derive more tasks from the corpus.

A handful of corpus datasets is too few to learn a selector from; ZAP (Ozturk et al. 2022)
multiplied its 35 datasets by deriving variants. A variant keeps a random subset of classes,
a stratified share of the training examples, optionally resizes (shorter side) and turns
colour into grayscale. It is written as an ordinary AutoDL dataset whose
`<name>_conversion.json` records `meta_parent` and `meta_derivation`: meta-training stores the
parent, and leave-one-dataset-out drops a held-out dataset's variants with it.

Sources: a corpus folder (data.npz + info.json, see shared/datasets/README.md), a plain npz
(x or encoded+offsets, y, is_test), or an AutoDL dataset folder (read with TensorFlow).
"""
from __future__ import annotations

import io
import json
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from autodl_core.errors import UserInputError

PARENT_KEY = "meta_parent"
DERIVATION_KEY = "meta_derivation"
MIN_TRAIN_PER_CLASS = 5


@dataclass(frozen=True)
class VariantSpec:
    classes: int | None = None  # keep this many classes (random subset); None = all
    train_fraction: float = 1.0  # stratified share of the training examples kept (test split kept whole)
    side: int | None = None  # resize so the shorter side is this many pixels; None = native
    grayscale: bool = False
    seed: int = 0

    def __post_init__(self):
        """What a spec can get wrong without looking at a source (class counts above K are checked there)."""
        if not 0 < self.train_fraction <= 1:
            raise UserInputError(f"train fraction must be in (0, 1], got {self.train_fraction}")
        if self.side is not None and self.side < 1:
            raise UserInputError(f"need side >= 1, got {self.side}")
        if self.classes is not None and self.classes < 2:
            raise UserInputError(f"need classes >= 2, got {self.classes}")

    def tag(self) -> str:
        parts = []
        if self.classes:
            parts.append(f"c{self.classes}")
        if self.train_fraction < 1.0:
            parts.append(f"f{round(self.train_fraction * 100):d}")
        if self.side:
            parts.append(f"s{self.side}")
        if self.grayscale:
            parts.append("g")
        parts.append(f"r{self.seed}")
        return "-".join(parts)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Source:
    """A dataset in memory: `image(i)` gives encoded bytes or a uint8 array, decoded lazily."""

    name: str
    labels: np.ndarray  # N x K, 0/1
    is_test: np.ndarray  # N bool
    images: object  # sequence of bytes or uint8 arrays
    channels: int
    family: str | None = None  # the root corpus dataset when the source is itself a variant

    def image(self, i: int):
        return self.images[i]


def load_source(path: str | Path) -> Source:
    path = Path(path)
    npz = path / "data.npz" if path.is_dir() else path
    if npz.suffix == ".npz" and npz.is_file():
        return _load_npz(npz)
    if path.is_dir() and any(path.glob("*.data")):
        return _load_autodl(path)
    raise UserInputError(f"{path}: neither a corpus folder (data.npz) nor an AutoDL dataset folder (<name>.data/)")


def _load_npz(npz: Path) -> Source:
    info_path = npz.parent / "info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    data = np.load(npz, allow_pickle=False)
    if "y" not in data.files:
        raise UserInputError(f"{npz}: no 'y' array (found {data.files})")
    labels = np.asarray(data["y"])
    if labels.ndim == 1:
        labels = np.eye(int(labels.max()) + 1, dtype=np.uint8)[labels.astype(int)]
    if "x" in data.files:
        x = data["x"]
        images = list(x)
        channels = 1 if x.ndim == 3 or x.shape[-1] == 1 else 3
    elif {"encoded", "offsets"} <= set(data.files):
        encoded, offsets = data["encoded"], data["offsets"]
        images = [encoded[offsets[i]:offsets[i + 1]].tobytes() for i in range(len(offsets) - 1)]
        channels = int(info.get("channels") or 3)
    else:
        raise UserInputError(f"{npz}: expected 'x' or 'encoded' + 'offsets' (found {data.files})")
    if "is_test" in data.files:
        is_test = np.asarray(data["is_test"], dtype=bool)
    else:  # a seeded 20% split
        is_test = np.random.default_rng(0).random(len(labels)) < 0.2
    if not (len(images) == len(labels) == len(is_test)):
        raise UserInputError(f"{npz}: {len(images)} images, {len(labels)} label rows, {len(is_test)} split flags")
    name = info.get("name") or (npz.parent.name if npz.name == "data.npz" else npz.stem)
    return Source(name=name, labels=(labels > 0).astype(np.uint8), is_test=is_test, images=images,
                  channels=channels, family=info.get(PARENT_KEY))


def _load_autodl(path: Path) -> Source:
    from autodl_data.autodl_format import AutoDLDataset, find_task, read_solution

    task = find_task(path)
    conversion = path / f"{task.name}_conversion.json"
    family = None
    if conversion.is_file():
        info = json.loads(conversion.read_text())
        family = info.get("meta_family") or info.get(PARENT_KEY)
    images, labels, flags = [], [], []
    solution = read_solution(task.solution_path)
    channels = 1
    for split, split_dir in (("train", task.train_dir), ("test", task.test_dir)):
        dataset = AutoDLDataset(str(split_dir)).get_dataset()
        for index, (example, label) in enumerate(dataset.as_numpy_iterator()):
            frame = np.asarray(example, dtype=np.float32)[0]
            frame = np.clip(np.round(frame * 255.0 if frame.max() <= 1.0 else frame), 0, 255).astype(np.uint8)
            channels = max(channels, frame.shape[-1])
            images.append(frame)
            labels.append(label if split == "train" else solution[index])
            flags.append(split == "test")
    return Source(name=task.name, labels=(np.asarray(labels) > 0).astype(np.uint8), is_test=np.asarray(flags),
                  images=images, channels=channels, family=family)


# ---------------------------------------------------------------------- deriving


def _select(source: Source, spec: VariantSpec) -> tuple[np.ndarray, np.ndarray]:
    """(example indices, kept class columns) for a spec, deterministic in spec.seed."""
    rng = np.random.default_rng(spec.seed)
    k = source.labels.shape[1]
    columns = np.arange(k)
    if spec.classes is not None:
        if not 2 <= spec.classes <= k:
            raise UserInputError(f"{source.name}: cannot keep {spec.classes} of {k} classes (need 2..{k})")
        columns = np.sort(rng.choice(k, size=spec.classes, replace=False))
    labels = source.labels[:, columns]
    multilabel = bool(np.any(source.labels.sum(axis=1) != 1))
    keep = np.ones(len(labels), bool) if multilabel else labels.sum(axis=1) > 0
    train = np.flatnonzero(keep & ~source.is_test)
    if spec.train_fraction < 1.0:
        chosen = []
        primary = labels[train].argmax(axis=1)  # stratify by the first positive class
        for c in np.unique(primary):
            members = train[primary == c]
            n = max(MIN_TRAIN_PER_CLASS, int(round(spec.train_fraction * len(members))))
            chosen.append(rng.choice(members, size=min(n, len(members)), replace=False))
        train = np.sort(np.concatenate(chosen))
    test = np.flatnonzero(keep & source.is_test)
    return np.concatenate([train, test]), columns


def _transform(image, spec: VariantSpec):
    """Encoded bytes kept as they are when nothing changes pixels; else a uint8 array."""
    if not spec.side and not spec.grayscale:
        return image
    from PIL import Image

    pil = Image.open(io.BytesIO(image)) if isinstance(image, (bytes, bytearray)) else \
        Image.fromarray(np.asarray(image)[..., 0] if np.asarray(image).ndim == 3 and np.asarray(image).shape[-1] == 1
                        else np.asarray(image))
    pil = pil.convert("L" if spec.grayscale or pil.mode in ("L", "I", "I;16", "F", "1") else "RGB")
    if spec.side:
        w, h = pil.size
        scale = spec.side / min(w, h)
        pil = pil.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
    return np.asarray(pil)


def derive_variant(source: Source, spec: VariantSpec, out_dir: str | Path, name: str | None = None,
                   overwrite: bool = False):
    """Write one variant of `source` as an AutoDL dataset under `out_dir`; returns the WriteReport."""
    from autodl_data.autodl_format import write_autodl_dataset

    indices, columns = _select(source, spec)
    name = name or f"{source.name}__{spec.tag()}"
    items = {"train": [], "test": []}
    for i in indices:
        split = "test" if source.is_test[i] else "train"
        items[split].append((_transform(source.image(int(i)), spec), source.labels[i, columns], int(i)))
    family = source.family or source.name
    extra = {PARENT_KEY: source.name, "meta_family": family, DERIVATION_KEY: spec.to_dict(),
             "meta_classes_kept": [int(c) for c in columns]}
    return write_autodl_dataset(out_dir, name, items["train"], items["test"], output_dim=len(columns),
                                overwrite=overwrite, extra_info=extra)


def random_specs(source: Source, count: int, seed: int = 0) -> list[VariantSpec]:
    """`count` distinct variant specs suited to the source (class subsets only when > 2 classes, etc.)."""
    rng = np.random.default_rng(seed)
    k = source.labels.shape[1]
    n_train = int((~source.is_test).sum())
    specs, seen, attempts = [], set(), 0
    while len(specs) < count and attempts < 50 * max(1, count):
        attempts += 1
        classes = None
        if k > 2 and rng.random() < 0.6:
            classes = int(rng.integers(2, k))  # 2..k-1
        fraction = float(rng.choice([1.0, 0.5, 0.2, 0.1]))
        if fraction * n_train < MIN_TRAIN_PER_CLASS * (classes or k):
            fraction = 1.0
        side = None
        if rng.random() < 0.4:
            side = int(rng.choice([16, 24, 32, 48, 64]))
        grayscale = bool(source.channels >= 3 and rng.random() < 0.3)
        spec = VariantSpec(classes=classes, train_fraction=fraction, side=side, grayscale=grayscale,
                           seed=int(rng.integers(0, 1000)))
        key = spec.tag().rsplit("-r", 1)[0]
        if key in seen or key == "":  # an identical derivation (up to the seed) or no change at all
            continue
        if classes is None and fraction == 1.0 and side is None and not grayscale:
            continue
        seen.add(key)
        specs.append(spec)
    return specs


def _flag(value: str) -> bool:
    flags = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
    if value.lower() not in flags:
        raise ValueError(value)
    return flags[value.lower()]


def parse_spec(text: str) -> VariantSpec:
    """'side=8,train_fraction=0.2,classes=5,grayscale=1,seed=3' -> VariantSpec; raises UserInputError."""
    casts = {"classes": int, "train_fraction": float, "side": int, "seed": int, "grayscale": _flag}
    values = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in casts:
            raise UserInputError(f"bad variant spec {text!r}: expected key=value pairs with keys "
                                 f"{', '.join(casts)}, got {part!r}")
        try:
            values[key] = casts[key](value.strip())
        except ValueError:
            raise UserInputError(f"bad variant spec {text!r}: {key} cannot be {value.strip()!r}") from None
    try:
        spec = VariantSpec(**values)
    except UserInputError as exc:
        raise UserInputError(f"bad variant spec {text!r}: {exc}") from None
    if spec.tag() == f"r{spec.seed}":
        raise UserInputError(f"bad variant spec {text!r}: it changes nothing")
    return spec


def make_variants(sources: list[str | Path], out_dir: str | Path, per_dataset: int, seed: int = 0,
                  log=print, specs: list[VariantSpec] | None = None) -> list[Path]:
    """Variants of each source under `out_dir`: the given `specs`, else `per_dataset` random ones.

    Existing ones are kept (resumable).
    """
    written = []
    for path in sources:
        source = load_source(path)
        # the dataset's name enters the seed: each source gets its own draw of variants
        chosen = specs if specs else random_specs(source, per_dataset, seed + zlib.crc32(source.name.encode()))
        for spec in chosen:
            name = f"{source.name}__{spec.tag()}"
            target = Path(out_dir) / name
            if target.exists():
                log(f"[variants] keep {name} (exists)")
            else:
                report = derive_variant(source, spec, out_dir, name=name)
                log(f"[variants] {name}: {report.counts.get('train')} train / {report.counts.get('test')} test, "
                    f"{report.output_dim} classes, {report.shape_text()}")
            written.append(target)
    return written


def parent_of(dataset_dir: str | Path) -> tuple[str | None, str | None, dict | None]:
    """(parent, family, derivation) recorded in an AutoDL dataset's conversion JSON; Nones for an original."""
    from autodl_data.autodl_format import conversion_record

    info = conversion_record(dataset_dir)
    if info.get(PARENT_KEY):
        return info[PARENT_KEY], info.get("meta_family") or info[PARENT_KEY], info.get(DERIVATION_KEY)
    return None, None, None
