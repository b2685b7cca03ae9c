"""Layouts: how a repository's files become labelled images. One small function per layout.

Each layout takes the source tree (`git_tree.GitTree`), the recipe's layout parameters and a way to
open other repositories, and returns `Labelled`: the images (encoded file bytes or uint8 arrays),
their label sets, the source's own split where it has one, and a group per image where images
belong together (one drawer, one traffic-sign track), so that a split can keep groups whole.

Patterns are shell-like paths with named parts: `{class}` (the label), `{split}` (the source's
split, mapped to train/test by `splits`), `{group}`, `{key}` (a label table's row name); `*` stays
inside one folder, `**` crosses folders (`**/` also matches no folder), `{class+}` spans one folder
or more. `archives` reads the pattern inside zip files of the repository instead of its tree.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import re
import zipfile
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from tools import convert
from tools.convert import _natural_key
from tools.errors import UserInputError

IMAGE_SUFFIXES = tuple(sorted(convert.IMAGE_SUFFIXES))  # what `tools convert` takes for an image file


@dataclass
class Labelled:
    images: list  # bytes (an image file) or uint8 array (H x W [x C])
    labels: list[tuple[int, ...]]  # class indices per image (one for single-label data)
    class_names: list[str]
    splits: list[str | None] = field(default_factory=list)  # "train" / "test" / None (no source split)
    groups: list[str | None] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)  # where each image came from (for notes and errors)
    notes: list[str] = field(default_factory=list)  # what the layout did that info.json should say

    def __post_init__(self):
        n = len(self.images)
        self.splits = self.splits or [None] * n
        self.groups = self.groups or [None] * n
        self.paths = self.paths or [""] * n
        if not (len(self.labels) == len(self.splits) == len(self.groups) == len(self.paths) == n):
            raise ValueError("Labelled: images, labels, splits, groups and paths differ in length")


def pattern_regex(pattern: str, needs: tuple[str, ...] = ()) -> re.Pattern:
    """'Images/{class}/*.tif' -> a regex with named groups. `needs`: the parts the layout reads."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "{":
            end = pattern.find("}", i)
            name = pattern[i + 1:end].rstrip("+") if end > 0 else ""
            if not name.isidentifier() or f"(?P<{name}>" in out:
                raise UserInputError(f"pattern {pattern!r}: bad or repeated part at {pattern[i:]!r}")
            part = r"[^/]+(?:/[^/]+)*" if pattern[end - 1] == "+" else "[^/]+"
            out, i = out + f"(?P<{name}>{part})", end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    regex = re.compile(out + r"\Z")
    missing = [name for name in needs if name not in regex.groupindex]
    if missing:
        raise UserInputError(f"pattern {pattern!r} lacks {', '.join('{' + n + '}' for n in missing)}")
    return regex


def _files(tree, params) -> tuple[list[str], list[str], Callable[[str], bytes]]:
    """(paths, paths the snapshot lacks, reader): of the tree, or of the members of its zip files
    `archives`; with several archives a member's path is `<archive>::<member>`."""
    archives = params.get("archives")
    if not archives:
        return list(tree.blobs), list(tree.missing), tree.read
    members = {}
    for archive in archives:
        try:
            opened = zipfile.ZipFile(io.BytesIO(tree.read(archive)))
        except zipfile.BadZipFile:
            raise UserInputError(f"{archive} is not a zip file") from None
        for member in opened.namelist():
            if not member.endswith("/"):
                members[member if len(archives) == 1 else f"{archive}::{member}"] = (opened, member)
    return list(members), [], lambda path: members[path][0].read(members[path][1])


def _matches(regex, paths: list[str], absent: list[str], suffixes) -> list[tuple[str, dict]]:
    """(path, named parts) of the files the pattern takes; a matching file the snapshot lacks is an
    error (a partial snapshot must not quietly give a smaller dataset than a full clone)."""
    def taken(path):
        return (regex.match(path) and path.lower().endswith(suffixes)
                and not any(part.startswith(".") for part in re.split(r"/|::", path)))

    lacking = [p for p in absent if taken(p)]
    if lacking:
        raise UserInputError(f"{len(lacking)} matching file(s) absent from the snapshot (large files and LFS "
                             f"content are left out of some), e.g. {lacking[0]}")
    return [(p, regex.match(p).groupdict()) for p in sorted(paths, key=_natural_key) if taken(p)]


def class_folders(tree, params, open_tree=None) -> Labelled:
    """Images whose path names their class (and maybe their split and group): `pattern` with {class}.

    `splits` maps the source's split names to train/test (null leaves one out); `suffixes`: the
    file endings taken (default: image suffixes; [""] takes any file, for files without one);
    `group_per_class`: a group name is unique only within its class (a sign's track number);
    `class_names` renames classes; `exclude_classes` drops some; `drop_duplicates`: a file whose
    bytes equal an earlier one's (the same image in two archives) is taken once.
    """
    regex = pattern_regex(params["pattern"], needs=("class",))
    split_map, rename = params.get("splits", {}), params.get("class_names", {})
    exclude = set(params.get("exclude_classes", []))
    paths, absent, read = _files(tree, params)
    found = []
    for path, parts in _matches(regex, paths, absent, tuple(params.get("suffixes", IMAGE_SUFFIXES))):
        if parts["class"] in exclude:
            continue
        split = None
        if "split" in parts:
            if parts["split"] not in split_map:
                raise UserInputError(f"{path}: source split {parts['split']!r} not in the recipe's splits {split_map}")
            split = split_map[parts["split"]]
            if split is None:
                continue  # a source split the recipe leaves out
        group = parts.get("group")
        if group is not None and params.get("group_per_class"):
            group = f"{parts['class']}/{group}"
        found.append((path, rename.get(parts["class"], parts["class"]), split, group))
    if not found:
        raise UserInputError(f"no image file matches {params['pattern']!r}")
    images, notes = [read(p) for p, _, _, _ in found], []
    if params.get("drop_duplicates"):
        seen, keep = set(), []
        for i, image in enumerate(images):
            digest = hashlib.sha256(image).digest()
            keep.append(digest not in seen)
            seen.add(digest)
        notes.append(f"{keep.count(False)} files identical to an earlier one dropped (drop_duplicates).")
        found, images = [f for f, k in zip(found, keep) if k], [im for im, k in zip(images, keep) if k]
    names = sorted({cls for _, cls, _, _ in found}, key=_natural_key)
    index = {name: i for i, name in enumerate(names)}
    return Labelled(images=images, labels=[(index[c],) for _, c, _, _ in found], class_names=names,
                    splits=[s for _, _, s, _ in found], groups=[g for _, _, _, g in found],
                    paths=[p for p, _, _, _ in found], notes=notes)


def label_table(tree, params, open_tree=None) -> Labelled:
    """Images listed in a 0/1 label table (multi-label): `pattern` with `{key}` (the image's row name)
    finds the images; `table` {path [, repo, commit]} is a tab- or comma-separated file, a header
    (key column, then one column per label) and a row per image, in this repository or another one
    (`open_tree(repo, commit)`). An image without a row, or a row given twice, is an error."""
    regex = pattern_regex(params["pattern"], needs=("key",))
    table = params["table"]
    if table.get("repo") and open_tree is None:
        raise UserInputError(f"the label table lives in {table['repo']}, but no other repository can be opened here")
    source = open_tree(table["repo"], table["commit"]) if table.get("repo") else tree
    lines = [line for line in source.read(table["path"]).decode("utf-8-sig").splitlines() if line.strip()]
    rows = [[cell.strip() for cell in re.split(r"[\t,]", line.rstrip("\t,"))] for line in lines]
    if len(rows) < 2:
        raise UserInputError(f"{table['path']}: a header and at least one row expected")
    names, table_rows = rows[0][1:], {}
    for row in rows[1:]:
        values = row[1:]
        if len(values) != len(names) or any(v not in ("0", "1") for v in values):
            raise UserInputError(f"{table['path']}: row {row[0]!r} is not {len(names)} 0/1 values")
        if row[0] in table_rows:
            raise UserInputError(f"{table['path']}: row {row[0]!r} appears twice")
        table_rows[row[0]] = tuple(k for k, v in enumerate(values) if v == "1")
    found = []
    for path, parts in _matches(regex, list(tree.blobs), list(tree.missing), tuple(params.get("suffixes", IMAGE_SUFFIXES))):
        if parts["key"] not in table_rows:
            raise UserInputError(f"{path}: no row {parts['key']!r} in {table['path']}")
        found.append((path, table_rows[parts["key"]], parts.get("group")))
    if not found:
        raise UserInputError(f"no image file matches {params['pattern']!r}")
    return Labelled(images=[tree.read(p) for p, _, _ in found], labels=[ls for _, ls, _ in found], class_names=names,
                    groups=[g for _, _, g in found], paths=[p for p, _, _ in found])


def npz_arrays(tree, params, open_tree=None) -> Labelled:
    """Arrays in .npz files: `files` maps each file to its splits, each split to [image key, label key]
    (MedMNIST: one file, keys train_images/train_labels, ...). `split_map` renames source splits
    (MedMNIST's val -> train); `grayscale` keeps the first channel of images whose channels are all
    equal (grey data saved as RGB); `multilabel`: label rows are 0/1 vectors (else class ids, or
    one-hot rows)."""
    images, labels, splits, paths = [], [], [], []
    for path, file_splits in params["files"].items():
        with np.load(io.BytesIO(tree.read(path)), allow_pickle=False) as data:
            for source_split, (x_key, y_key) in file_splits.items():
                missing = [k for k in (x_key, y_key) if k not in data.files]
                if missing:
                    raise UserInputError(f"{path} has no array {missing[0]!r} (it has {', '.join(data.files)})")
                x, y = np.asarray(data[x_key]), np.asarray(data[y_key])
                y = y.reshape(len(y), -1)
                if x.dtype != np.uint8 or len(x) != len(y):
                    raise UserInputError(f"{path}: {x_key} must be uint8 images, one per row of {y_key}; "
                                         f"got {x.dtype} {x.shape}, labels {y.shape}")
                if params.get("grayscale") and x.ndim == 4:
                    if not (x == x[..., :1]).all():
                        raise UserInputError(f"{path}:{x_key}: grayscale asked, but the channels differ")
                    x = x[..., 0]
                images += list(x)
                labels += _label_rows(y, params.get("multilabel", False), f"{path}:{y_key}")
                splits += [params.get("split_map", {}).get(source_split, source_split)] * len(x)
                paths += [f"{path}:{x_key}[{i}]" for i in range(len(x))]
    return Labelled(images=images, labels=labels, class_names=_class_names(params, labels), splits=splits,
                    paths=paths)


def _label_rows(y: np.ndarray, multilabel: bool, where: str) -> list[tuple[int, ...]]:
    if multilabel or y.shape[1] > 1:
        if not np.isin(y, (0, 1)).all() or (not multilabel and (y.sum(axis=1) != 1).any()):
            raise UserInputError(f"{where}: label rows must be one-hot (or 0/1 with multilabel)")
        return [tuple(int(k) for k in np.flatnonzero(row)) for row in y]
    return [(int(v),) for v in y[:, 0]]


def idx_files(tree, params, open_tree=None) -> Labelled:
    """MNIST-style IDX files (gzipped or not): `splits` maps a source split to [images, labels]."""
    images, labels, splits, paths = [], [], [], []
    for split, (x_path, y_path) in params["splits"].items():
        x, y = _idx(tree.read(x_path), x_path), _idx(tree.read(y_path), y_path)
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise UserInputError(f"{x_path}, {y_path}: expected N x H x W images and N labels, got {x.shape}, {y.shape}")
        images += list(x)
        labels += [(int(v),) for v in y]
        splits += [split] * len(y)
        paths += [f"{x_path}[{i}]" for i in range(len(y))]
    return Labelled(images=images, labels=labels, class_names=_class_names(params, labels), splits=splits,
                    paths=paths)


def _idx(raw: bytes, where: str) -> np.ndarray:
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise UserInputError(f"{where}: not an unsigned-byte IDX file")
    dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * k:8 + 4 * k], "big") for k in range(dims))
    if len(raw) != 4 + 4 * dims + int(np.prod(shape)):
        raise UserInputError(f"{where}: {len(raw)} bytes, but its header says {shape} (truncated?)")
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def csv_pixels(tree, params, open_tree=None) -> Labelled:
    """Pixels as CSV rows (one image a row) with labels in a second CSV, per source split, maybe inside
    a zip `archive`. `shape` [H, W] of the images; `transpose` when a row holds the image column by
    column; `label_offset` is added to the labels (1-based ids: -1)."""
    read = tree.read
    if params.get("archive"):
        opened = zipfile.ZipFile(io.BytesIO(tree.read(params["archive"])))
        read = opened.read
    height, width = params["shape"]
    images, labels, splits, paths = [], [], [], []
    for split, (x_path, y_path) in params["splits"].items():
        x = np.loadtxt(io.BytesIO(read(x_path)), delimiter=",", dtype=np.float64, ndmin=2)
        y = np.loadtxt(io.BytesIO(read(y_path)), delimiter=",", dtype=np.int64, ndmin=1).reshape(-1)
        if x.shape != (len(y), height * width) or x.min() < 0 or x.max() > 255:
            raise UserInputError(f"{x_path}: expected {len(y)} rows of {height * width} values in 0..255, "
                                 f"got {x.shape}, {x.min()}..{x.max()}")
        x = x.astype(np.uint8)
        x = x.reshape(-1, width, height).transpose(0, 2, 1) if params.get("transpose") else x.reshape(-1, height, width)
        images += list(np.ascontiguousarray(x))
        labels += [(int(v) + int(params.get("label_offset", 0)),) for v in y]
        splits += [split] * len(y)
        paths += [f"{x_path}[{i}]" for i in range(len(y))]
    return Labelled(images=images, labels=labels, class_names=_class_names(params, labels), splits=splits,
                    paths=paths)


def _class_names(params, labels) -> list[str]:
    width = 1 + max(max(ls) for ls in labels if ls)
    names = params.get("class_names") or [str(k) for k in range(width)]
    if len(names) < width or min(min(ls) for ls in labels if ls) < 0:
        raise UserInputError(f"{len(names)} class names for labels 0..{width - 1} (after label_offset)")
    return list(names)


LAYOUTS: dict[str, Callable] = {"class_folders": class_folders, "npz_arrays": npz_arrays, "idx_files": idx_files,
                                "csv_pixels": csv_pixels, "label_table": label_table}
PARAMETERS = {  # required, optional: a typo in a recipe is an error, not an ignored key
    "class_folders": ({"pattern"}, {"archives", "splits", "suffixes", "group_per_class", "class_names",
                                    "exclude_classes", "drop_duplicates"}),
    "label_table": ({"pattern", "table"}, {"suffixes"}),
    "npz_arrays": ({"files"}, {"split_map", "grayscale", "multilabel", "class_names"}),
    "idx_files": ({"splits"}, {"class_names"}),
    "csv_pixels": ({"shape", "splits"}, {"archive", "transpose", "label_offset", "class_names"}),
}


def check_layout(layout: dict) -> None:
    kind = layout.get("kind")
    if kind not in LAYOUTS:
        raise UserInputError(f"unknown layout {kind!r}; known: {', '.join(LAYOUTS)}")
    required, optional = PARAMETERS[kind]
    given = set(layout) - {"kind"}
    if required - given or given - required - optional:
        raise UserInputError(f"layout {kind}: needs {sorted(required)}, may have {sorted(optional)}; "
                             f"got {sorted(given)}")


def read_layout(tree, layout: dict, open_tree: Callable | None = None) -> Labelled:
    """`open_tree(repo, commit)`: another repository's tree, for layouts that read files there.
    What a layout trips over in the data (a missing key, a malformed file) is a UserInputError."""
    check_layout(layout)
    try:
        return LAYOUTS[layout["kind"]](tree, {k: v for k, v in layout.items() if k != "kind"}, open_tree)
    except UserInputError:
        raise
    except (KeyError, ValueError, IndexError, TypeError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise UserInputError(f"layout {layout['kind']}: cannot read the data ({type(exc).__name__}: {exc})") from None
