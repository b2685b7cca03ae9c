"""`tools convert`: image data (corpus npz, numpy npz, image folders, CSV lists) -> the AutoDL dataset format.

The output folder `<out>/<name>/` is what the official kit's ingestion and scoring read
(`<name>.data/{train,test}`, `<name>.solution`); see autodl_data/autodl_format.py and docs/convert.md.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import sys
import time
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

from autodl_data.autodl_format import BadImageError, WriteReport, write_autodl_dataset
from autodl_data.corpus_npz import corpus_origin
from tools.errors import UserInputError
from tools.tf_support import import_tensorflow, require_tensorflow

KINDS = ("corpus", "npz", "folder", "csv")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}


@dataclasses.dataclass
class Source:
    """Loaded input: lazily readable images with label vectors, split into train and test."""

    name: str
    class_names: list[str] | None
    output_dim: int
    train: list  # [(image, label_vector, item_id)], image = array / bytes / Path
    test: list
    description: str
    notes: list = dataclasses.field(default_factory=list)
    origin: dict | None = None  # a corpus dataset's provenance (info.json: name, repository, commit, license)


# ---------------------------------------------------------------- kind detection


def detect_kind(path: Path) -> str:
    """Guess the source kind; refuse when it is ambiguous or unknown."""
    if not path.exists():
        raise UserInputError(f"input not found: {path}")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".npz":
            return "corpus" if (path.parent / "info.json").is_file() and path.name == "data.npz" else "npz"
        if suffix in (".csv", ".tsv", ".txt"):
            return "csv"
        raise UserInputError(f"cannot tell the kind of {path} (expected .npz, .csv or a folder); pass --kind")
    if (path / "data.npz").is_file():
        return "corpus" if (path / "info.json").is_file() else "npz"
    if any(p.is_dir() for p in path.iterdir()):
        return "folder"
    csvs = sorted(path.glob("*.csv"))
    if len(csvs) == 1:
        return "csv"
    raise UserInputError(f"cannot tell the kind of {path}: no data.npz, no class sub-folders, "
                         f"{len(csvs)} CSV files; pass --kind and a file")


# ---------------------------------------------------------------- splitting and labels


def split_indices(labels: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """Seeded test mask: stratified per class for single-label data, plain random for multi-label data.

    Every class with at least two examples keeps at least one in train and one in test when the
    fraction allows it; order inside each split stays the input order.
    """
    if not 0 < test_fraction < 1:
        raise UserInputError(f"--test-fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.RandomState(seed)
    n = len(labels)
    is_test = np.zeros(n, dtype=bool)
    single_label = bool((labels.sum(axis=1) == 1).all())
    groups = [np.flatnonzero(labels[:, k]) for k in range(labels.shape[1])] if single_label else [np.arange(n)]
    for members in groups:
        if len(members) == 0:
            continue
        count = int(round(test_fraction * len(members)))
        if len(members) >= 2:
            count = min(max(count, 1), len(members) - 1)
        is_test[rng.permutation(members)[:count]] = True
    if is_test.all() or not is_test.any():
        raise UserInputError(f"a test fraction of {test_fraction} leaves an empty split for {n} examples")
    return is_test


def subsample(indices: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """At most `limit` of `indices`, seeded, in their original order."""
    if limit is None or len(indices) <= limit:
        return indices
    if limit < 1:
        raise UserInputError(f"--max-train/--max-test must be >= 1, got {limit}")
    chosen = np.random.RandomState(seed).choice(len(indices), size=limit, replace=False)
    return indices[np.sort(chosen)]


def labels_matrix(y: np.ndarray, where: str) -> np.ndarray:
    """(N,) integer class ids or (N, K) 0/1 multi-hot -> (N, K) uint8."""
    y = np.asarray(y)
    if y.ndim == 1:
        if not np.issubdtype(y.dtype, np.integer):
            raise UserInputError(f"{where}: 1-D labels must be integer class ids, got dtype {y.dtype}")
        if len(y) and y.min() < 0:
            raise UserInputError(f"{where}: negative class id {y.min()}")
        out = np.zeros((len(y), int(y.max()) + 1 if len(y) else 0), dtype=np.uint8)
        out[np.arange(len(y)), y] = 1
        return out
    if y.ndim == 2:
        if not np.isin(y, (0, 1)).all():
            raise UserInputError(f"{where}: 2-D labels must be 0/1 (one-hot or multi-hot)")
        return y.astype(np.uint8)
    raise UserInputError(f"{where}: labels must be (N,) class ids or (N, K) multi-hot, got shape {y.shape}")


def check_classes(labels: np.ndarray, class_names: list[str] | None, where: str) -> None:
    """Refuse classes without any example (a constant solution column is useless for NAUC)."""
    counts = labels.sum(axis=0)
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        shown = [class_names[i] if class_names else str(i) for i in empty[:10]]
        raise UserInputError(f"{where}: {len(empty)} class(es) without any example: {', '.join(shown)}")


# ---------------------------------------------------------------- sources


def load_npz(path: Path, kind: str, args) -> Source:
    """Corpus npz (data.npz + info.json, `is_test` split) or plain numpy npz (x, y [, is_test])."""
    npz_path = path / "data.npz" if path.is_dir() else path
    info = {}
    info_path = npz_path.parent / "info.json"
    if kind == "corpus":
        if not info_path.is_file():
            raise UserInputError(f"corpus dataset without info.json: {info_path}")
        info = json.loads(info_path.read_text())
    _check_npz_archive(npz_path)
    try:
        data = np.load(npz_path, allow_pickle=False)
    except Exception as exc:
        raise UserInputError(f"cannot read {npz_path} as a numpy .npz: {exc}") from None
    with data:
        try:
            return _npz_source(npz_path, data, info, kind, args)
        except UserInputError:
            raise
        except ValueError as exc:  # numpy refuses object arrays: allow_pickle=False
            if "allow_pickle" in str(exc):
                raise UserInputError(f"{npz_path} holds pickled Python objects (object arrays), refused: loading "
                                     "them can run code; save plain numeric arrays (np.savez of uint8 images)") from None
            raise UserInputError(f"{npz_path}: {exc}") from None
        except (OSError, EOFError, zipfile.BadZipFile) as exc:  # a truncated or corrupt member
            raise UserInputError(f"{npz_path}: cannot read ({exc})") from None


def _check_npz_archive(npz_path: Path) -> None:
    """A .npz is a zip archive of .npy arrays (np.savez): anything else is refused here, before numpy
    mistakes it for a pickle (its error then talks about allow_pickle)."""
    try:
        with open(npz_path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise UserInputError(f"{npz_path}: cannot read ({exc.strerror or exc})") from None
    if head[:2] != b"PK":
        what = "an empty file" if not head else ("a single .npy array" if head.startswith(b"\x93NUM")
                                                 else "not a zip archive")
        raise UserInputError(f"{npz_path}: not a numpy .npz archive ({what}; write one with np.savez or "
                             "np.savez_compressed)")


def _npz_source(npz_path: Path, data, info: dict, kind: str, args) -> Source:
    keys = set(data.files)
    if {"x_train", "y_train", "x_test", "y_test"} <= keys:
        images = _npz_images(data, "x_train") + _npz_images(data, "x_test")
        y_parts = [np.asarray(data["y_train"]), np.asarray(data["y_test"])]
        if y_parts[0].ndim != y_parts[1].ndim:
            raise UserInputError(f"{npz_path}: y_train and y_test have different label layouts")
        y = np.concatenate(y_parts) if y_parts[0].ndim == 1 else _concat_multihot(y_parts, npz_path)
        is_test = np.r_[np.zeros(len(y_parts[0]), bool), np.ones(len(y_parts[1]), bool)]
    else:
        if "y" not in keys or not ({"x"} <= keys or {"encoded", "offsets"} <= keys):
            raise UserInputError(f"{npz_path}: expected arrays x (or encoded + offsets) and y, found {sorted(keys)}")
        images = _npz_images(data, "x") if "x" in keys else _encoded_images(data, npz_path)
        y = data["y"]
        is_test = np.asarray(data["is_test"], dtype=bool) if "is_test" in keys else None
    labels = labels_matrix(y, str(npz_path))
    if len(labels) != len(images):
        raise UserInputError(f"{npz_path}: {len(images)} images but {len(labels)} label rows")
    class_names = _class_names(args, info, labels.shape[1], npz_path)
    if is_test is None or args.test_fraction is not None:
        if is_test is None and args.test_fraction is None:
            args.test_fraction = 0.2
        is_test = split_indices(labels, args.test_fraction, args.seed)
        split_note = f"seeded split, test fraction {args.test_fraction}, seed {args.seed}"
    else:
        if len(is_test) != len(labels):
            raise UserInputError(f"{npz_path}: is_test has {len(is_test)} entries for {len(labels)} examples")
        split_note = "the file's own is_test split"
    name = args.name or info.get("name") or (npz_path.parent.name if npz_path.name == "data.npz" else npz_path.stem)
    source = _make_source(name, images, labels, is_test, class_names, args,
                          f"{kind} {npz_path} ({len(labels)} examples; {split_note})")
    if kind == "corpus":
        source.origin = corpus_origin(info, npz_path.parent.name)
    return source


def _npz_images(data, key) -> list:
    x = data[key]
    if x.ndim not in (3, 4):
        raise UserInputError(f"'{key}' must be N x H x W or N x H x W x C, got shape {x.shape}")
    return list(x)


def _encoded_images(data, npz_path) -> list:
    encoded, offsets = data["encoded"], np.asarray(data["offsets"], dtype=np.int64)
    if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(encoded) \
            or (np.diff(offsets) < 0).any():
        raise UserInputError(f"{npz_path}: 'offsets' do not delimit the 'encoded' bytes")
    return [encoded[offsets[i]:offsets[i + 1]].tobytes() for i in range(len(offsets) - 1)]


def _concat_multihot(parts, npz_path):
    if parts[0].shape[1] != parts[1].shape[1]:
        raise UserInputError(f"{npz_path}: y_train has {parts[0].shape[1]} columns, y_test {parts[1].shape[1]}")
    return np.concatenate(parts)


def _class_names(args, info: dict, width: int, where) -> list[str] | None:
    names = None
    if getattr(args, "class_names", None):
        names = [line.strip() for line in Path(args.class_names).read_text().splitlines() if line.strip()]
        origin = args.class_names
    elif info.get("class_names"):
        names = [str(c) for c in info["class_names"]]
        origin = "info.json"
    if names is not None and len(names) != width:
        raise UserInputError(f"{where}: {len(names)} class names in {origin} but labels have {width} columns")
    return names


def load_folder(path: Path, args) -> Source:
    """One sub-folder per class (any depth below it), or train/ and test/ each holding class sub-folders."""
    _check_entries(path)
    subdirs = {p.name.lower(): p for p in path.iterdir() if p.is_dir()}
    presplit = {"train", "test"} <= set(subdirs)
    ignored: list[Path] = []
    if presplit:
        parts = {split: _scan_class_folders(subdirs[split], ignored) for split in ("train", "test")}
        class_names = sorted(set(parts["train"]) | set(parts["test"]), key=_natural_key)
        files, is_test, y = [], [], []
        for split in ("train", "test"):
            for cls in class_names:
                for f in parts[split].get(cls, []):
                    files.append(f)
                    is_test.append(split == "test")
                    y.append(class_names.index(cls))
        is_test = np.array(is_test)
        missing = [c for c in class_names if not parts["train"].get(c)]
        if args.test_fraction is not None:
            raise UserInputError(f"{path} already has train/ and test/; --test-fraction does not apply")
    else:
        classes = _scan_class_folders(path, ignored)
        class_names = sorted(classes, key=_natural_key)
        files = [f for c in class_names for f in classes[c]]
        y = [i for i, c in enumerate(class_names) for _ in classes[c]]
        is_test = None
        missing = []
    if len(class_names) == 1:
        raise UserInputError(f"{path}: only one class folder ({class_names[0]}); a classifier needs at least two "
                             "classes: one sub-folder per class, side by side (e.g. photos/cats/, photos/dogs/)")
    if not files:
        raise UserInputError(f"no image files found under {path} (extensions: {', '.join(sorted(IMAGE_SUFFIXES))})")
    present = {class_names[i] for i in y}
    empty = [c for c in class_names if c not in present]
    if empty:
        raise UserInputError(f"{path}: class folder(s) without images: {', '.join(empty)}")
    labels = labels_matrix(np.array(y), str(path))
    if is_test is None:
        is_test = split_indices(labels, 0.2 if args.test_fraction is None else args.test_fraction, args.seed)
    source = _make_source(args.name or _safe_name(path.name), files, labels, is_test, class_names, args,
                          f"image folder {path} ({len(files)} images, {len(class_names)} classes"
                          f"{', own train/test split' if presplit else ''})")
    if missing:
        source.notes.append(f"class(es) without train images: {', '.join(missing[:10])}")
    if ignored:
        source.notes.append(f"{len(ignored)} non-image file(s) ignored, e.g. {ignored[0]}")
    return source


def _files_below(folder: Path) -> list[Path]:
    """Every file under `folder`; a folder that cannot be listed is an error naming it (never skipped:
    a class folder silently missing its images would change the dataset without a word)."""
    def fail(error: OSError):
        raise UserInputError(f"{error.filename or folder}: cannot list this folder ({error.strerror or error})")

    files = []
    for here, _dirs, names in os.walk(folder, onerror=fail, followlinks=True):
        files += [Path(here) / n for n in names if (Path(here) / n).is_file()]
    return files


def _check_entries(root: Path) -> None:
    """Entries of `root` that cannot be read (a dangling or looping link, no permission): an error naming them."""
    try:
        entries = list(root.iterdir())
    except OSError as exc:
        raise UserInputError(f"{root}: cannot list this folder ({exc.strerror or exc})") from None
    for entry in entries:
        try:
            entry.stat()
        except OSError as exc:
            raise UserInputError(f"{entry}: cannot read ({exc.strerror or exc})") from None


def _scan_class_folders(root: Path, ignored: list) -> dict:
    _check_entries(root)
    classes = {}
    for class_dir in sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: _natural_key(p.name)):
        if class_dir.name.startswith("."):
            continue
        images = []
        for f in sorted(_files_below(class_dir), key=lambda p: _natural_key(str(p))):
            if f.name.startswith("."):
                continue
            (images if f.suffix.lower() in IMAGE_SUFFIXES else ignored).append(f)
        classes[class_dir.name] = images
    empty = [c for c, imgs in classes.items() if not imgs]
    if empty:
        raise UserInputError(f"{root}: class folder(s) without images: {', '.join(empty[:10])}")
    if not classes:
        raise UserInputError(f"{root}: no class sub-folders")
    return classes


def load_csv(path: Path, args) -> Source:
    """CSV with a header: `path` and `labels` (names separated by ';' or spaces) and an optional `split`."""
    if path.is_dir():
        csvs = sorted(path.glob("*.csv"))
        if len(csvs) != 1:
            raise UserInputError(f"{path}: expected exactly one .csv file, found {len(csvs)}")
        path = csvs[0]
    with open(path, newline="") as f:
        sample = f.read(4096)
        f.seek(0)
        try:
            dialect = csv.Sniffer().sniff(sample, delimiters=",\t")
        except csv.Error:
            dialect = csv.excel
        reader = csv.DictReader(f, dialect=dialect)
        fields = {(name or "").strip().lower(): name for name in reader.fieldnames or []}
        label_key = fields.get("labels") or fields.get("label")
        if "path" not in fields or label_key is None:
            raise UserInputError(f"{path}: the header must name columns 'path' and 'labels' (found {list(fields)})")
        split_key = fields.get("split")
        rows = list(reader)
    if not rows:
        raise UserInputError(f"{path}: no rows")
    files, tokens, splits = [], [], []
    for line_no, row in enumerate(rows, 2):
        rel = (row.get(fields["path"]) or "").strip()
        if not rel:
            raise UserInputError(f"{path}:{line_no}: empty path")
        files.append((path.parent / rel) if not Path(rel).is_absolute() else Path(rel))
        tokens.append([t for t in re.split(r"[;\s]+", row.get(label_key) or "") if t])
        if split_key:
            value = (row.get(split_key) or "").strip().lower()
            if value not in ("train", "test"):
                raise UserInputError(f"{path}:{line_no}: split must be 'train' or 'test', got {value!r}")
            splits.append(value == "test")
    class_names = sorted({t for ts in tokens for t in ts}, key=_natural_key)
    if not class_names:
        raise UserInputError(f"{path}: no labels in column '{label_key}'")
    index = {c: i for i, c in enumerate(class_names)}
    labels = np.zeros((len(files), len(class_names)), dtype=np.uint8)
    for i, ts in enumerate(tokens):
        labels[i, [index[t] for t in ts]] = 1
    if split_key and args.test_fraction is not None:
        raise UserInputError(f"{path} has a split column; --test-fraction does not apply")
    is_test = np.array(splits) if split_key else split_indices(
        labels, 0.2 if args.test_fraction is None else args.test_fraction, args.seed)
    source = _make_source(args.name or _safe_name(path.stem), files, labels, is_test, class_names, args,
                          f"CSV {path} ({len(files)} rows, {len(class_names)} labels)")
    unlabeled = int((labels.sum(axis=1) == 0).sum())
    if unlabeled:
        source.notes.append(f"{unlabeled} row(s) without any label")
    return source


def _make_source(name, images, labels, is_test, class_names, args, description) -> Source:
    is_test = np.asarray(is_test, dtype=bool)
    check_classes(labels, class_names, description)
    train_idx = subsample(np.flatnonzero(~is_test), args.max_train, args.seed)
    test_idx = subsample(np.flatnonzero(is_test), args.max_test, args.seed + 1)
    if len(train_idx) == 0 or len(test_idx) == 0:
        raise UserInputError(f"{description}: empty {'train' if len(train_idx) == 0 else 'test'} split")

    def items(indices):
        return [(images[i], labels[i], _item_id(images[i], i)) for i in indices]

    source = Source(name, class_names, labels.shape[1], items(train_idx), items(test_idx), description)
    for split, idx in (("train", train_idx), ("test", test_idx)):
        absent = np.flatnonzero(labels[idx].sum(axis=0) == 0)
        if len(absent):
            shown = [class_names[i] if class_names else str(i) for i in absent[:8]]
            source.notes.append(f"{len(absent)} class(es) absent from {split}: {', '.join(shown)}")
    return source


def _item_id(image, index):
    return str(image) if isinstance(image, Path) else index


def _natural_key(text: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text)]


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-]+", "_", text).strip("_-") or "dataset"


LOADERS: dict[str, Callable] = {
    "corpus": lambda path, args: load_npz(path, "corpus", args),
    "npz": lambda path, args: load_npz(path, "npz", args),
    "folder": load_folder,
    "csv": load_csv,
}


# ---------------------------------------------------------------- command


def convert(args) -> int:
    require_tensorflow("tools convert writes TFRecords with it")
    source_path = Path(args.source)
    kind = args.kind or detect_kind(source_path)
    if not source_path.exists():
        raise UserInputError(f"input not found: {source_path}")
    started = time.perf_counter()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow (imported to write) is chatty on stderr
    source = LOADERS[kind](source_path, args)
    final = Path(args.out) / source.name
    if final.exists() and not args.overwrite:
        raise UserInputError(f"{final} already exists (remove it or pass --overwrite)")
    import_tensorflow()  # here, quietly: write_autodl_dataset imports it too, and would print its start-up lines
    progress = _Progress(len(source.train), len(source.test)) if not args.quiet else None
    try:
        report = write_autodl_dataset(args.out, source.name, source.train, source.test, source.output_dim,
                                      class_names=source.class_names, shard_size=args.shard_size,
                                      overwrite=args.overwrite, progress=progress,
                                      skip_undecodable=getattr(args, "skip_bad_images", False),
                                      extra_info={"source": source.description, "kind": kind, "seed": args.seed,
                                                  "notes": source.notes,
                                                  **({"origin": source.origin} if source.origin else {})})
    except BadImageError as exc:
        raise UserInputError(f"{exc} (nothing written; --skip-bad-images converts the rest and lists the "
                             "images left out)") from None
    if progress:
        progress.done()
    print(summary_text(source, report, time.perf_counter() - started))
    return 0


def summary_text(source: Source, report: WriteReport, seconds: float) -> str:
    names = source.class_names or [str(i) for i in range(report.output_dim)]
    shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
    lines = [f"converted {source.description}",
             f"  -> {report.path}  ({report.total_bytes / 2 ** 20:.1f} MiB, {seconds:.1f} s)",
             f"  train {report.counts['train']}, test {report.counts['test']} examples; "
             f"{report.output_dim} classes ({shown})",
             f"  image shape {report.shape_text()}; {report.reencoded} images (re-)encoded to PNG, "
             f"{report.counts['train'] + report.counts['test'] - report.reencoded} kept as given"]
    for split in ("train", "test"):
        if report.skipped.get(split):
            lines.append(f"  SKIPPED {len(report.skipped[split])} unreadable {split} image(s):")
            lines += [f"    {item}: {reason}" for item, reason in report.skipped[split][:10]]
            if len(report.skipped[split]) > 10:
                lines.append(f"    ... and {len(report.skipped[split]) - 10} more (see {report.name}_conversion.json)")
        if report.no_label.get(split):
            lines.append(f"  note: {report.no_label[split]} {split} example(s) have no positive label")
    lines += [f"  note: {note}" for note in source.notes]
    return "\n".join(lines)


class _Progress:
    """A progress line on stderr every couple of seconds (only for long conversions)."""

    def __init__(self, n_train, n_test):
        self.totals = {"train": n_train, "test": n_test}
        self.last = None
        self.shown = False

    def __call__(self, split, written, skipped):
        now = time.monotonic()
        self.last = self.last or now
        if now - self.last >= 2:
            self.last = now
            self.shown = True
            print(f"\r  {split}: {written + skipped}/{self.totals[split]}", end="", file=sys.stderr, flush=True)

    def done(self):
        if self.shown:
            print(file=sys.stderr)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert", help="convert images (npz, folders, CSV) into the AutoDL dataset format",
        description="Convert image-classification data into an AutoDL dataset folder <out>/<name>/ "
                    "(<name>.data/{train,test} TFRecords + metadata, <name>.solution) that the official "
                    "starting kit reads. Sources: corpus folder (data.npz + info.json), numpy .npz "
                    "(x, y [, is_test] or x_train/y_train/x_test/y_test), an image folder with one "
                    "sub-folder per class (optionally under train/ and test/), or a CSV with columns "
                    "path,labels[,split].")
    parser.add_argument("source", help="input file or folder")
    parser.add_argument("--out", required=True, help="output folder; the dataset goes to OUT/NAME/")
    parser.add_argument("--name", help="dataset name (default: from the input); letters, digits, _ and - only")
    parser.add_argument("--kind", choices=KINDS, help="input kind (default: detected)")
    parser.add_argument("--test-fraction", type=float, default=None,
                        help="test share for inputs without a split (default 0.2; seeded, stratified per class "
                             "for single-label data); with a split in the input, re-splits npz inputs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and of subsampling (default 0)")
    parser.add_argument("--max-train", type=int, help="keep at most this many train examples (seeded subsample)")
    parser.add_argument("--max-test", type=int, help="keep at most this many test examples (seeded subsample)")
    parser.add_argument("--shard-size", type=int, help="train examples per TFRecord file (default: ~100 MB files); "
                                                       "the test split is always one file")
    parser.add_argument("--class-names", help="text file with one class name per line (overrides info.json)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT/NAME if it exists")
    parser.add_argument("--skip-bad-images", action="store_true",
                        help="leave undecodable images out (listed in the summary and <name>_conversion.json) "
                             "instead of stopping at the first one with an error naming it")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress line")
    parser.set_defaults(func=convert)
