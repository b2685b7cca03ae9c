"""The AutoDL dataset format (the official starting kit's layout), read and written without the kit.

Read side: `find_task` (locate `<name>.data/` and `<name>.solution`, checked against each other),
`parse_metadata` (metadata.textproto without protobuf), `AutoDLMetadata` (the kit's metadata API),
`AutoDLDataset` (a tf.data dataset with the kit's element semantics and order, usable in TF2 eager
mode and in TF1 graph mode) and `read_solution`.

Write side: `write_autodl_dataset` (images + label vectors -> TFRecords of SequenceExamples,
metadata, solution, label names), laid out so that the kit reads the test set in the given order.

TensorFlow is imported lazily: finding/validating a task and reading metadata stay cheap.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import io
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from autodl_core.errors import UserInputError

SPLITS = ("train", "test")
KIT_PARALLEL_READERS = 3  # the kit's num_parallel_readers: cycle length of its file interleave

# --------------------------------------------------------------------------------------------
# Task folder
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TaskPaths:
    """Where the parts of one AutoDL task live."""

    name: str
    data_dir: Path
    train_dir: Path
    test_dir: Path
    solution_path: Path


def find_task(dataset_dir: str | os.PathLike, check_solution: bool = True) -> TaskPaths:
    """Locate the single task in `dataset_dir` and check it is consistent, as ingestion and scoring expect.

    Ingestion takes the only `*.data` folder, scoring the only `*.solution` file; their names must
    agree and the solution must have one row per test example and `output_dim` columns.
    `check_solution=False` skips reading the solution (e.g. for a dataset given without one).
    """
    root = Path(dataset_dir)
    if not root.exists():
        raise UserInputError(f"dataset folder not found: {root}")
    if not root.is_dir():
        raise UserInputError(f"not a folder: {root} (expected a folder holding <name>.data/ and <name>.solution)")
    data_dirs = sorted(p for p in root.glob("*.data") if p.is_dir())
    if not data_dirs:
        raise UserInputError(f"no <name>.data folder in {root} (an AutoDL dataset folder holds exactly one)")
    if len(data_dirs) > 1:
        names = ", ".join(p.name for p in data_dirs)
        raise UserInputError(f"several .data folders in {root} ({names}); an AutoDL dataset folder holds exactly one")
    data_dir = data_dirs[0]
    name = data_dir.name[: -len(".data")]
    split_dirs = {}
    for split in SPLITS:
        split_dir = data_dir / split
        if not split_dir.is_dir():
            raise UserInputError(f"missing folder {split_dir}")
        if not (split_dir / "metadata.textproto").is_file():
            raise UserInputError(f"missing {split_dir / 'metadata.textproto'}")
        if not _sample_files(split_dir):
            raise UserInputError(f"no sample*.tfrecord files in {split_dir}")
        split_dirs[split] = split_dir
    solution_path = root / f"{name}.solution"
    if check_solution:
        solutions = sorted(root.glob("*.solution"))
        if not solutions:
            raise UserInputError(f"no {name}.solution in {root} (the test labels scoring needs)")
        if len(solutions) > 1:
            raise UserInputError(f"several .solution files in {root}: {', '.join(p.name for p in solutions)}")
        # Scoring names the task after the solution file name up to its first dot.
        solution_task = solutions[0].name.split(".")[0]
        if solution_task != name:
            raise UserInputError(
                f"task name mismatch in {root}: data folder '{data_dir.name}' but solution '{solutions[0].name}' "
                f"(scoring would look for predictions named {solution_task}.predict_*)")
        solution_path = solutions[0]
        solution = read_solution(solution_path)
        test_meta = parse_metadata(split_dirs["test"] / "metadata.textproto")
        output_dim = int(test_meta.get("output_dim", 0))
        if solution.shape[1] != output_dim:
            raise UserInputError(
                f"{solution_path.name}: rows have {solution.shape[1]} values but output_dim is {output_dim}")
        sample_count = int(test_meta.get("sample_count", 0))
        if solution.shape[0] != sample_count:
            raise UserInputError(
                f"{solution_path.name}: {solution.shape[0]} rows but the test metadata says sample_count: {sample_count}")
    return TaskPaths(name, data_dir, split_dirs["train"], split_dirs["test"], solution_path)


def check_tfrecord_framing(path: str | os.PathLike) -> int:
    """Walk a TFRecord file's framing (8-byte length, 4-byte CRC, data, 4-byte CRC per record) and
    return its record count; a file cut short or not a TFRecord is a UserInputError naming it.

    Why: TensorFlow reports a truncated file only when the reader reaches its end, minutes into a run,
    as a DataLossError inside the submission; checking the framing costs one seek per record
    (~0.2 s for cifar10's 60,000). Record contents and CRCs are not verified.
    """
    path = Path(path)
    size = path.stat().st_size
    count = offset = 0
    with open(path, "rb") as f:
        while offset < size:
            header = f.read(12)
            if len(header) < 12:
                raise UserInputError(f"{path}: truncated TFRecord file (record {count} at byte {offset}: "
                                     f"{len(header)} of 12 header bytes)")
            length = int.from_bytes(header[:8], "little")
            end = offset + 12 + length + 4
            if end > size:
                raise UserInputError(f"{path}: truncated or corrupt TFRecord file (record {count} at byte {offset} "
                                     f"declares {length} bytes; the file ends at byte {size})")
            f.seek(end)
            offset = end
            count += 1
    return count


def check_records(task: "TaskPaths") -> dict[str, int]:
    """Every TFRecord file of the task's two splits checked (`check_tfrecord_framing`): records per split."""
    counts = {}
    for split, split_dir in (("train", task.train_dir), ("test", task.test_dir)):
        counts[split] = sum(check_tfrecord_framing(p) for p in _sample_files(split_dir))
    return counts


def read_solution(path: str | os.PathLike) -> np.ndarray:
    """Read a `.solution` (or prediction) file: one row per example, space-separated numbers -> float (n, K)."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"solution file not found: {path}")
    rows = []
    width = None
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            try:
                values = [float(v) for v in fields]
            except ValueError:
                raise UserInputError(f"{path}:{line_no}: non-numeric value in {line.strip()[:80]!r}") from None
            if width is None:
                width = len(values)
            elif len(values) != width:
                raise UserInputError(
                    f"{path}:{line_no}: {len(values)} values but the first row has {width} (ragged rows)")
            rows.append(values)
    if not rows:
        raise UserInputError(f"solution file is empty: {path}")
    array = np.asarray(rows, dtype=np.float64)
    if not np.isfinite(array).all():
        raise UserInputError(f"{path}: contains NaN or infinite values")
    return array


# --------------------------------------------------------------------------------------------
# metadata.textproto
# --------------------------------------------------------------------------------------------

_MAP_FIELDS = ("label_to_index_map", "feature_to_index_map", "channel_to_index_map")
_REPEATED_MESSAGES = ("matrix_spec",)
_TOKEN = re.compile(r"""
    (?P<space>\s+|\#[^\n]*)
  | (?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
  | (?P<punct>[{}:<>;,\[\]])
  | (?P<word>[A-Za-z0-9_.+\-]+)
""", re.VERBOSE)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "'": "'", '"': '"', "a": "\a", "b": "\b", "f": "\f",
            "v": "\v", "?": "?"}


def parse_metadata(path: str | os.PathLike) -> dict:
    """Parse a metadata.textproto (protobuf text format of autodl.DataSpecification) into a dict.

    Scalars become int/float/bool/str (enum values such as COMPRESSED stay strings);
    `matrix_spec` blocks become a list of dicts; the three `*_to_index_map` fields become
    {key: value} dicts (always present, possibly empty). No defaults are filled in here.
    """
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"metadata file not found: {path}")
    try:
        return parse_metadata_text(path.read_text())
    except UserInputError as exc:
        raise UserInputError(f"{path}: {exc}") from None


def parse_metadata_text(text: str) -> dict:
    """Parse the text of a metadata.textproto; see `parse_metadata`."""
    tokens = _tokenize(text)
    pos, fields = _parse_fields(tokens, 0, closing=None)
    result: dict = {name: {} for name in _MAP_FIELDS}
    result["matrix_spec"] = []
    for name, value in fields:
        if name in _MAP_FIELDS:
            if not isinstance(value, dict) or "key" not in value:
                raise UserInputError(f"{name} entry without a key")
            result[name][str(value["key"])] = value.get("value", 0)
        elif name in _REPEATED_MESSAGES:
            if not isinstance(value, dict):
                raise UserInputError(f"{name} must be a {{ ... }} block")
            result[name].append(value)
        else:
            result[name] = value
    return result


def _tokenize(text: str) -> list[tuple[str, str]]:
    tokens = []
    pos = 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if not match:
            line = text.count("\n", 0, pos) + 1
            raise UserInputError(f"line {line}: cannot parse {text[pos:pos + 20]!r}")
        kind = match.lastgroup
        if kind != "space":
            tokens.append((kind, match.group()))
        pos = match.end()
    return tokens


def _parse_fields(tokens, pos, closing):
    """Parse `name: value` / `name { ... }` pairs until `closing` (or the end); return (pos, [(name, value)])."""
    fields = []
    while pos < len(tokens):
        kind, text = tokens[pos]
        if closing is not None and text == closing:
            return pos + 1, fields
        if kind != "word":
            raise UserInputError(f"expected a field name, got {text!r}")
        name = text
        pos += 1
        if pos < len(tokens) and tokens[pos][1] == ":":
            pos += 1
        if pos >= len(tokens):
            raise UserInputError(f"field {name} has no value")
        kind, text = tokens[pos]
        if text in ("{", "<"):
            pos, sub_fields = _parse_fields(tokens, pos + 1, closing="}" if text == "{" else ">")
            fields.append((name, dict(sub_fields)))
        elif kind == "string":
            value = _unquote(text)
            pos += 1
            while pos < len(tokens) and tokens[pos][0] == "string":  # adjacent strings concatenate
                value += _unquote(tokens[pos][1])
                pos += 1
            fields.append((name, value))
        elif kind == "word":
            fields.append((name, _scalar(text)))
            pos += 1
        else:
            raise UserInputError(f"unexpected {text!r} after field {name}")
        if pos < len(tokens) and tokens[pos][1] in (";", ","):
            pos += 1
    if closing is not None:
        raise UserInputError(f"missing closing {closing!r}")
    return pos, fields


def _unquote(token: str) -> str:
    body = token[1:-1]
    out = []
    i = 0
    while i < len(body):
        ch = body[i]
        if ch == "\\" and i + 1 < len(body):
            nxt = body[i + 1]
            if nxt in _ESCAPES:
                out.append(_ESCAPES[nxt])
                i += 2
                continue
            octal = re.match(r"[0-7]{1,3}", body[i + 1:])
            if octal:
                out.append(chr(int(octal.group(), 8)))
                i += 1 + len(octal.group())
                continue
            out.append(nxt)
            i += 2
            continue
        out.append(ch)
        i += 1
    text = "".join(out)
    try:  # protobuf text escapes are bytes; re-decode octal-escaped UTF-8
        return text.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return text


def _scalar(text: str):
    low = text.lower()
    if low in ("true", "t"):
        return True
    if low in ("false", "f"):
        return False
    try:
        return int(text, 0) if not re.fullmatch(r"-?0\d+", text) else int(text, 8)
    except ValueError:
        pass
    try:
        return float(text.rstrip("fF")) if re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?[fF]?", text) else text
    except ValueError:
        return text


# --------------------------------------------------------------------------------------------
# AutoDLMetadata
# --------------------------------------------------------------------------------------------

_MATRIX_DEFAULTS = {"row_count": 0, "col_count": 0, "num_channels": -1, "format": "DENSE",
                    "is_sequence_col": False, "is_sequence_row": False,
                    "has_locality_col": False, "has_locality_row": False}
_FORMAT_NUMBERS = {0: "DENSE", 1: "SPARSE", 2: "COMPRESSED"}


class AutoDLMetadata:
    """The metadata of one split, with the kit's AutoDLMetadata methods and semantics (proto defaults included)."""

    def __init__(self, dataset_name: str | os.PathLike):
        self.dataset_name_ = str(dataset_name)
        self.fields = parse_metadata(Path(dataset_name) / "metadata.textproto")
        specs = []
        for spec in self.fields["matrix_spec"]:
            full = {**_MATRIX_DEFAULTS, **spec}
            full["format"] = _FORMAT_NUMBERS.get(full["format"], full["format"])
            specs.append(full)
        self.matrix_specs = specs

    def _spec(self, bundle_index: int) -> dict:
        return self.matrix_specs[bundle_index]  # IndexError for a missing bundle, as the kit's protobuf

    def get_dataset_name(self) -> str:
        return self.dataset_name_

    def is_compressed(self, bundle_index: int = 0) -> bool:
        return self._spec(bundle_index)["format"] == "COMPRESSED"

    def is_sparse(self, bundle_index: int = 0) -> bool:
        return self._spec(bundle_index)["format"] == "SPARSE"

    def get_bundle_size(self) -> int:
        return len(self.matrix_specs)

    def get_matrix_size(self, bundle_index: int = 0) -> tuple[int, int]:
        spec = self._spec(bundle_index)
        return int(spec["row_count"]), int(spec["col_count"])

    def get_num_channels(self, bundle_index: int = 0) -> int:
        num_channels = int(self._spec(bundle_index)["num_channels"])
        if num_channels == -1:  # unknown: the kit assumes RGB for compressed images, 1 otherwise
            return 3 if self.is_compressed(bundle_index) else 1
        return num_channels

    def get_tensor_size(self, bundle_index: int = 0) -> tuple[int, int, int]:
        rows, cols = self.get_matrix_size(bundle_index)
        return rows, cols, self.get_num_channels(bundle_index)

    def get_tensor_shape(self, bundle_index: int = 0) -> tuple[int, int, int, int]:
        rows, cols = self.get_matrix_size(bundle_index)
        return self.get_sequence_size(), rows, cols, self.get_num_channels(bundle_index)

    def get_sequence_size(self) -> int:
        return int(self.fields.get("sequence_size", 1))

    def get_output_size(self) -> int:
        return int(self.fields.get("output_dim", 0))

    def size(self) -> int:
        return int(self.fields.get("sample_count", 0))

    def get_label_to_index_map(self) -> dict:
        return dict(self.fields["label_to_index_map"])

    def get_channel_to_index_map(self) -> dict:
        return dict(self.fields["channel_to_index_map"])

    def get_feature_to_index_map(self) -> dict:
        return dict(self.fields["feature_to_index_map"])

    def get_class_names(self) -> list[str | None]:
        """Class names by index (None where the label map has no entry); not a kit method."""
        names: list[str | None] = [None] * self.get_output_size()
        for label, index in self.get_label_to_index_map().items():
            if 0 <= int(index) < len(names):
                names[int(index)] = label
        return names

    def __repr__(self) -> str:
        return f"AutoDLMetadata({self.dataset_name_!r}, size={self.size()}, shape={self.get_tensor_shape()})"


# --------------------------------------------------------------------------------------------
# AutoDLDataset
# --------------------------------------------------------------------------------------------


def _sample_files(split_dir: str | os.PathLike) -> list[str]:
    """The split's TFRecord files in the order the kit reads them.

    The kit lists them with TF's glob, which is NOT sorted: it is the directory's listing order
    (readdir), like `os.listdir`. With several test files the kit's test order therefore depends on
    the file system; `write_autodl_dataset` always writes the test split as a single file.
    """
    return [os.path.join(str(split_dir), name) for name in os.listdir(split_dir)
            if fnmatch.fnmatchcase(name, "sample*")]


class AutoDLDataset:
    """A split as the kit's ingestion gives it to a model: an unbatched, unshuffled tf.data dataset of
    (example float32 [T, rows, cols, C], labels float32 [output_dim]) pairs, plus its metadata.

    Built with the tf.data API of the current mode: in TF1 graph mode (v2 behaviour disabled) the
    dataset is a TF1 dataset (read it with a one-shot iterator and a Session), in eager mode a TF2 one.
    Several files are interleaved exactly like the kit (cycle length 3, deterministic), so the element
    order is the kit's order, which is the row order of the `.solution` file.
    """

    def __init__(self, dataset_name: str | os.PathLike, num_parallel_readers: int = KIT_PARALLEL_READERS):
        self.dataset_name_ = str(dataset_name)
        self.metadata_ = AutoDLMetadata(dataset_name)
        self.files = _sample_files(dataset_name)
        if not self.files:
            raise UserInputError(f"no sample* TFRecord files in {dataset_name}")
        for bundle in range(self.metadata_.get_bundle_size()):
            if not self.metadata_.is_compressed(bundle) and not self.metadata_.is_sparse(bundle):
                rows, cols = self.metadata_.get_matrix_size(bundle)
                if rows <= 0 or cols <= 0 or self.metadata_.get_sequence_size() <= 0:
                    raise UserInputError(
                        f"{dataset_name}: DENSE data needs a fixed shape, got {self.metadata_.get_tensor_shape(bundle)}")
        if self.metadata_.get_bundle_size() == 0:
            raise UserInputError(f"{dataset_name}: metadata has no matrix_spec")
        self.num_parallel_readers = num_parallel_readers
        self.dataset_ = self._build()

    def get_dataset(self):
        return self.dataset_

    def get_metadata(self) -> AutoDLMetadata:
        return self.metadata_

    def _build(self):
        import tensorflow as tf

        data = tf.data if tf.executing_eagerly() else tf.compat.v1.data
        if len(self.files) > 1:
            files = data.Dataset.from_tensor_slices(self.files)
            records = files.interleave(data.TFRecordDataset, cycle_length=self.num_parallel_readers,
                                       num_parallel_calls=tf.data.AUTOTUNE)
        else:
            records = data.TFRecordDataset(self.files, num_parallel_reads=self.num_parallel_readers)
        return records.map(self._parse, num_parallel_calls=tf.data.AUTOTUNE)

    def _parse(self, serialized):
        import tensorflow as tf

        meta = self.metadata_
        sequence_features = {}
        for b in range(meta.get_bundle_size()):
            if meta.is_sparse(b):
                for key in ("sparse_col_index", "sparse_row_index", "sparse_channel_index"):
                    sequence_features[f"{b}_{key}"] = tf.io.VarLenFeature(tf.int64)
                sequence_features[f"{b}_sparse_value"] = tf.io.VarLenFeature(tf.float32)
            elif meta.is_compressed(b):
                sequence_features[f"{b}_compressed"] = tf.io.VarLenFeature(tf.string)
            else:
                sequence_features[f"{b}_dense_input"] = tf.io.FixedLenSequenceFeature(
                    meta.get_tensor_size(b), dtype=tf.float32)
        context, features = tf.io.parse_single_sequence_example(
            serialized,
            context_features={"label_index": tf.io.VarLenFeature(tf.int64),
                              "label_score": tf.io.VarLenFeature(tf.float32)},
            sequence_features=sequence_features)
        sample = []
        for b in range(meta.get_bundle_size()):
            sample.append(self._bundle_tensor(tf, features, b))
        label_index = tf.reshape(context["label_index"].values, [-1, 1])
        labels = tf.sparse.to_dense(
            tf.sparse.SparseTensor(indices=label_index, values=context["label_score"].values,
                                   dense_shape=[meta.get_output_size()]),
            validate_indices=False)
        sample.append(labels)
        return tuple(sample)

    def _bundle_tensor(self, tf, features, b):
        meta = self.metadata_
        rows, cols = meta.get_matrix_size(b)
        channels = meta.get_num_channels(b)
        seq = meta.get_sequence_size()
        if meta.is_sparse(b):
            col = tf.cast(features[f"{b}_sparse_col_index"].values, tf.float32)
            channel = tf.cast(features[f"{b}_sparse_channel_index"].values, tf.float32)
            value = features[f"{b}_sparse_value"].values
            if cols > channels:  # tabular: (column index, value) pairs
                pairs = tf.concat([tf.reshape(col, [-1, 1]), tf.reshape(value, [-1, 1])], 1)
                return tf.reshape(pairs, [1, -1, 2, 1])
            return tf.reshape(channel, [-1, 1, 1, 1])  # text: token ids
        if meta.is_compressed(b):
            frames = features[f"{b}_compressed"].values
            images = tf.map_fn(lambda x: _decode_frame(tf, x, channels), frames,
                               fn_output_signature=tf.TensorSpec([None, None, channels], tf.float32))
            images.set_shape([seq if seq > 0 else None, rows if rows > 0 else None,
                              cols if cols > 0 else None, channels])
            return images
        dense = features[f"{b}_dense_input"]
        return tf.reshape(dense, [seq, rows, cols, channels])


def _decode_frame(tf, encoded, channels):
    image = tf.image.decode_image(encoded, channels=channels, expand_animations=False)
    image = tf.image.convert_image_dtype(image, tf.float32)  # uint8 -> [0, 1] (uint16 PNG -> /65535)
    image.set_shape([None, None, channels])
    return image


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

DEFAULT_SHARD_BYTES = 100 * 2 ** 20
# Formats the kit's decode_image reads as they are; anything else is re-encoded to PNG.
_KEPT_FORMATS = ("PNG", "JPEG")
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
_VALID_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]*")


class UndecodableImage(Exception):
    """An input image that cannot be decoded (skipped and reported by the writer)."""


class BadImageError(UserInputError):
    """The writer was told not to skip undecodable images and met one (the message names it)."""


@dataclasses.dataclass
class PreparedImage:
    """An image ready to store: encoded bytes the kit can decode, and what the metadata needs."""

    encoded: bytes
    height: int
    width: int
    channels: int  # 1 (grayscale) or 3 (colour), as the kit should decode it
    reencoded: bool  # True when the stored bytes are not the input's own bytes


def prepare_image(image: Any) -> PreparedImage:
    """Turn one input image into bytes the kit decodes with `decode_image`.

    `image`: encoded file bytes (PNG/JPEG kept byte for byte after checking they decode; other formats
    such as BMP/GIF/TIFF/WebP are decoded and re-encoded to PNG), a path to such a file, or a uint8
    array H x W, H x W x 1 or H x W x 3 (PNG-encoded losslessly: pixel values are kept as they are,
    e.g. 0..16 stays 0..16). Raises UndecodableImage for unreadable files and UserInputError for
    arrays the format cannot hold.
    """
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        try:
            image = Path(image).read_bytes()
        except OSError as exc:
            raise UndecodableImage(f"cannot read file: {exc.strerror or exc}") from None
    if isinstance(image, np.ndarray):
        return _encode_array(image)
    if not isinstance(image, (bytes, bytearray, memoryview)):
        raise UserInputError(f"an image must be encoded bytes, a file path or a uint8 array, got {type(image).__name__}")
    data = bytes(image)
    if not data:
        raise UndecodableImage("empty file")
    try:
        with Image.open(io.BytesIO(data)) as pil:
            pil.load()  # full decode: catches truncated / corrupt files, not just a bad header
            fmt, mode, (width, height) = pil.format, pil.mode, pil.size
            channels = 1 if mode in _GRAY_MODES else 3
            if fmt in _KEPT_FORMATS and width > 0 and height > 0:
                return PreparedImage(data, height, width, channels, reencoded=False)
            if getattr(pil, "n_frames", 1) > 1:
                pil.seek(0)  # animations: keep the first frame (the kit's decoder needs a single image)
            converted = pil.convert("L" if channels == 1 else "RGB")
    except UserInputError:
        raise
    except Exception as exc:  # PIL raises many types for bad data (OSError, SyntaxError, ValueError...)
        reason = "not a known image format, or its header is damaged" if "cannot identify" in str(exc) else exc
        raise UndecodableImage(f"cannot decode image: {reason}") from None
    if width == 0 or height == 0:
        raise UndecodableImage("image has no pixels")
    return PreparedImage(_png_bytes(converted), height, width, channels, reencoded=True)


def _encode_array(array: np.ndarray) -> PreparedImage:
    from PIL import Image

    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] != 3):
        raise UserInputError(f"image arrays must be H x W, H x W x 1 or H x W x 3, got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise UserInputError(f"image array has no pixels (shape {array.shape})")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_:
            raise UserInputError(f"image arrays must hold uint8 pixel values, got dtype {array.dtype} "
                                 "(scale floats to 0..255 and convert to uint8 first)")
        if array.min() < 0 or array.max() > 255:
            raise UserInputError(f"image array values {array.min()}..{array.max()} do not fit in uint8")
        array = array.astype(np.uint8)
    pil = Image.fromarray(np.ascontiguousarray(array), mode="L" if array.ndim == 2 else "RGB")
    return PreparedImage(_png_bytes(pil), array.shape[0], array.shape[1], 1 if array.ndim == 2 else 3, reencoded=True)


def _png_bytes(pil) -> bytes:
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclasses.dataclass
class WriteReport:
    """What `write_autodl_dataset` wrote, and what it had to skip (never silently)."""

    path: Path
    name: str
    output_dim: int
    counts: dict = dataclasses.field(default_factory=dict)  # split -> examples written
    skipped: dict = dataclasses.field(default_factory=dict)  # split -> [(item id, reason)]
    reencoded: int = 0
    no_label: dict = dataclasses.field(default_factory=dict)  # split -> examples without any positive label
    row_count: int = 0
    col_count: int = 0
    num_channels: int = 0
    size_range: tuple = ()  # (min_h, max_h, min_w, max_w)
    files: list = dataclasses.field(default_factory=list)
    total_bytes: int = 0

    def shape_text(self) -> str:
        if self.row_count > 0 and self.col_count > 0:
            return f"{self.row_count}x{self.col_count}x{self.num_channels}"
        h0, h1, w0, w1 = self.size_range
        return f"variable (H {h0}-{h1}, W {w0}-{w1}) x{self.num_channels}"


def write_autodl_dataset(out_dir: str | os.PathLike, name: str, train: Iterable, test: Iterable, output_dim: int,
                         class_names: Sequence[str] | None = None, shard_size: int | None = None,
                         shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False,
                         progress=None, extra_info: dict | None = None, skip_undecodable: bool = True) -> WriteReport:
    """Write an AutoDL dataset folder `<out_dir>/<name>/` that the official kit reads.

    `train`, `test`: iterables of `(image, labels)`, `image` as accepted by `prepare_image`, an item id
    may be given as a third element for skip reports; `labels`: 0/1 vector of length `output_dim`
    (several ones = multi-label). Train labels go into the TFRecords; test labels only into
    `<name>.solution` (the test records carry empty label lists, like the kit's data). The test split
    is one file, in the given order: the kit lists several files in directory order, which would make
    the solution's row order depend on the file system. The train split is sharded every
    `shard_size` examples or `shard_bytes` bytes. Undecodable images are skipped and listed in the
    report, or, with `skip_undecodable=False`, the first one stops the write with a UserInputError
    naming it. The folder is built under a temporary name and renamed at the end (nothing
    half-written is left behind on any error).
    """
    import tensorflow as tf

    if not _VALID_NAME.fullmatch(name or ""):
        raise UserInputError(f"invalid dataset name {name!r}: use letters, digits, '_' or '-' (no dots: scoring "
                             "takes the task name up to the first dot)")
    output_dim = int(output_dim)
    if output_dim < 1:
        raise UserInputError(f"output_dim must be >= 1, got {output_dim}")
    if class_names is not None:
        class_names = [str(c) for c in class_names]
        if len(class_names) != output_dim:
            raise UserInputError(f"{len(class_names)} class names for output_dim {output_dim}")
        if len(set(class_names)) != len(class_names):
            raise UserInputError("class names are not unique")
        if any(not c or "\n" in c or "\r" in c for c in class_names):
            raise UserInputError("class names must be non-empty single-line strings")
    if shard_size is not None and shard_size < 1:
        raise UserInputError(f"shard size must be >= 1 example, got {shard_size}")
    out_dir = Path(out_dir)
    final = out_dir / name
    if final.exists() and not overwrite:
        raise UserInputError(f"{final} already exists (remove it or pass overwrite)")
    report = WriteReport(path=final, name=name, output_dim=output_dim)
    with dataset_under_construction(out_dir, name) as work:
        shapes = _ShapeStats()
        data_dir = work / f"{name}.data"
        test_labels = _write_split(tf, data_dir / "test", name, "test", test, output_dim, first_id=0,
                                   shard_size=None, shard_bytes=None, shapes=shapes, report=report,
                                   progress=progress, skip_undecodable=skip_undecodable)
        _write_split(tf, data_dir / "train", name, "train", train, output_dim, first_id=len(test_labels),
                     shard_size=shard_size, shard_bytes=shard_bytes, shapes=shapes, report=report,
                     progress=progress, skip_undecodable=skip_undecodable)
        for split in SPLITS:
            if report.counts[split] == 0:
                raise UserInputError(f"no {split} example could be written ({len(report.skipped[split])} skipped: "
                                     f"{_skip_summary(report.skipped[split])})")
        report.row_count, report.col_count, report.num_channels = shapes.spec()
        report.size_range = shapes.size_range()
        for split in SPLITS:
            (data_dir / split / "metadata.textproto").write_text(
                metadata_text(report.counts[split], output_dim, report.row_count, report.col_count,
                              report.num_channels, class_names))
        write_solution(work / f"{name}.solution", test_labels)
        if class_names is not None:
            (work / f"{name}_label.name").write_text("".join(c + "\n" for c in class_names))
        info = {"name": name, "output_dim": output_dim, "counts": report.counts,
                "shape": [report.row_count, report.col_count, report.num_channels],
                "skipped": {s: [[str(i), r] for i, r in v] for s, v in report.skipped.items()},
                "reencoded": report.reencoded, **(extra_info or {})}
        (work / f"{name}_conversion.json").write_text(_json_dumps(info))
    report.files = sorted(str(p.relative_to(final)) for p in final.rglob("*") if p.is_file())
    report.total_bytes = sum(p.stat().st_size for p in final.rglob("*") if p.is_file())
    return report


@contextlib.contextmanager
def dataset_under_construction(out_dir: str | os.PathLike, name: str):
    """A temporary folder `<out_dir>/.<name>.partial-*` to build a dataset in, renamed to `<out_dir>/<name>`
    (replacing it) when the block ends, removed when it raises: nothing half-written is ever left."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=out_dir))
    umask = os.umask(0)
    os.umask(umask)
    work.chmod(0o777 & ~umask)  # mkdtemp makes it private; the dataset folder should not be
    try:
        yield work
        final = out_dir / name
        if final.exists():
            shutil.rmtree(final)
        work.rename(final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def conversion_record(dataset_dir: str | os.PathLike) -> dict:
    """What `<name>_conversion.json` says of how the dataset was made ({} when there is none or it is
    unreadable): source description, kind, seed, counts, skipped images, a corpus origin, a variant's parent."""
    for path in sorted(Path(dataset_dir).glob("*_conversion.json")):
        try:
            info = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(info, dict):
            return info
    return {}


def write_solution(path: str | os.PathLike, rows) -> None:
    """`<name>.solution`: one line of 0/1 labels per test example, as the kit's scoring reads it."""
    with open(path, "w") as f:
        for row in rows:
            f.write(" ".join(str(int(v)) for v in row) + "\n")


def metadata_text(sample_count: int, output_dim: int, row_count: int, col_count: int, num_channels: int,
                  class_names: Sequence[str] | None = None) -> str:
    """metadata.textproto of one split of a compressed-image dataset, in the layout of the kit's files."""
    lines = ["is_sequence: false", f"sample_count: {sample_count}", "sequence_size: 1", f"output_dim: {output_dim}",
             "matrix_spec {", f"  col_count: {col_count}", f"  row_count: {row_count}",
             f"  num_channels: {num_channels}", "  is_sequence_col: false", "  is_sequence_row: false",
             "  has_locality_col: true", "  has_locality_row: true", "  format: COMPRESSED", "}"]
    for index, label in enumerate(class_names or []):
        lines += ["label_to_index_map {", f"  key: {_quote(label)}", f"  value: {index}", "}"]
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("'", "\\'").replace("\t", "\\t")
    return f"'{escaped}'"


def _json_dumps(data) -> str:
    import json

    return json.dumps(data, indent=1, default=str) + "\n"


class _ShapeStats:
    """Image sizes and channels seen over both splits -> the matrix_spec (-1 for a varying dimension)."""

    def __init__(self):
        self.heights: set[int] = set()
        self.widths: set[int] = set()
        self.channels: set[int] = set()

    def add(self, image: PreparedImage):
        self.heights.add(image.height)
        self.widths.add(image.width)
        self.channels.add(image.channels)

    def spec(self) -> tuple[int, int, int]:
        rows = next(iter(self.heights)) if len(self.heights) == 1 else -1
        cols = next(iter(self.widths)) if len(self.widths) == 1 else -1
        return rows, cols, 1 if self.channels == {1} else 3

    def size_range(self) -> tuple[int, int, int, int]:
        return min(self.heights), max(self.heights), min(self.widths), max(self.widths)


def _labels_row(labels, output_dim: int, item_id) -> np.ndarray:
    row = np.asarray(labels)
    if row.ndim != 1 or row.shape[0] != output_dim:
        raise UserInputError(f"example {item_id}: label vector of shape {row.shape}, expected ({output_dim},)")
    if not np.isin(row, (0, 1)).all():
        raise UserInputError(f"example {item_id}: labels must be 0/1, got {row[:10]}")
    return row.astype(np.uint8)


def _sequence_example(tf, encoded: bytes, example_id: int, label_row: np.ndarray | None) -> bytes:
    example = tf.train.SequenceExample()
    context = example.context.feature
    positives = [] if label_row is None else np.flatnonzero(label_row).tolist()
    context["label_index"].int64_list.value.extend(positives)
    context["label_score"].float_list.value.extend([1.0] * len(positives))
    context["id"].int64_list.value.append(example_id)
    example.feature_lists.feature_list["0_compressed"].feature.add().bytes_list.value.append(encoded)
    return example.SerializeToString()


def _write_split(tf, split_dir: Path, name: str, split: str, items: Iterable, output_dim: int, first_id: int,
                 shard_size, shard_bytes, shapes: _ShapeStats, report: WriteReport, progress,
                 skip_undecodable: bool = True) -> list:
    """Write one split's records; return its label rows (in written order)."""
    split_dir.mkdir(parents=True)
    report.skipped[split] = []
    report.no_label[split] = 0
    label_rows = []
    shards: list[Path] = []
    writer = None
    shard_count = shard_fill = 0
    try:
        for position, item in enumerate(items):
            image, labels = item[0], item[1]
            item_id = item[2] if len(item) > 2 else position
            row = _labels_row(labels, output_dim, item_id)
            try:
                prepared = prepare_image(image)
            except UndecodableImage as exc:
                if not skip_undecodable:
                    raise BadImageError(f"{item_id}: {exc}") from None
                report.skipped[split].append((item_id, str(exc)))
                continue
            record = _sequence_example(tf, prepared.encoded, first_id + len(label_rows),
                                       row if split == "train" else None)
            full = writer is not None and ((shard_size and shard_count >= shard_size)
                                           or (shard_bytes and shard_fill + len(record) > shard_bytes))
            if writer is None or full:
                if writer is not None:
                    writer.close()
                shards.append(split_dir / f".shard-{len(shards):05d}")
                writer = tf.io.TFRecordWriter(str(shards[-1]))
                shard_count = shard_fill = 0
            writer.write(record)
            shard_count += 1
            shard_fill += len(record) + 16  # TFRecord framing
            shapes.add(prepared)
            report.reencoded += prepared.reencoded
            report.no_label[split] += not row.any()
            label_rows.append(row)
            if progress is not None:
                progress(split, len(label_rows), len(report.skipped[split]))
    finally:
        if writer is not None:
            writer.close()
    for index, shard in enumerate(shards):
        suffix = "" if len(shards) == 1 else f"-{index:05d}-of-{len(shards):05d}"
        shard.rename(split_dir / f"sample-{name}-{split}{suffix}.tfrecord")
    report.counts[split] = len(label_rows)
    return label_rows


def _skip_summary(skipped: list, limit: int = 3) -> str:
    if not skipped:
        return "none"
    text = "; ".join(f"{item}: {reason}" for item, reason in skipped[:limit])
    return text + (f"; ... ({len(skipped) - limit} more)" if len(skipped) > limit else "")
