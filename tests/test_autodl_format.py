"""Tests of the AutoDL format reader (and writer round trips): metadata parsing, task checks, kit semantics."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from autodl_data.autodl_format import (AutoDLDataset, AutoDLMetadata, find_task, parse_metadata, parse_metadata_text,
                                 read_solution)
from tools.errors import UserInputError
from tools.shared_paths import kit_samples_dir

SAMPLES = kit_samples_dir()
REPO = Path(__file__).resolve().parents[1]

MINICIAO_META = """\
is_sequence: false
sample_count: 18
sequence_size: 1
output_dim: 10
matrix_spec {
  col_count: 32
  row_count: 32
  num_channels: 3
  is_sequence_col: false
  has_locality_col: true
  format: COMPRESSED
}
label_to_index_map {
  key: 'cat'
  value: 3
}
label_to_index_map { key: "it's \\"x\\"" value: 0 }  # a comment
"""


def read_all(dataset):
    """Iterate a dataset in eager mode into a list of numpy pairs."""
    return list(dataset.get_dataset().as_numpy_iterator())


# ---------------------------------------------------------------- metadata


def test_parse_metadata_text_scalars_blocks_and_maps():
    meta = parse_metadata_text(MINICIAO_META)
    assert meta["is_sequence"] is False
    assert meta["sample_count"] == 18 and meta["output_dim"] == 10 and meta["sequence_size"] == 1
    assert meta["matrix_spec"] == [{"col_count": 32, "row_count": 32, "num_channels": 3, "is_sequence_col": False,
                                    "has_locality_col": True, "format": "COMPRESSED"}]
    assert meta["label_to_index_map"] == {"cat": 3, 'it\'s "x"': 0}
    assert meta["feature_to_index_map"] == {} and meta["channel_to_index_map"] == {}


def test_parse_metadata_text_colon_before_block_and_two_bundles():
    meta = parse_metadata_text("matrix_spec: { row_count: -1 format: DENSE }\nmatrix_spec < col_count: 5 >\n")
    assert meta["matrix_spec"] == [{"row_count": -1, "format": "DENSE"}, {"col_count": 5}]


@pytest.mark.parametrize("text", ["output_dim: 3 }", "matrix_spec { row_count: 2", "output_dim", "a: @"])
def test_parse_metadata_text_rejects_broken_text(text):
    with pytest.raises(UserInputError):
        parse_metadata_text(text)


def test_parse_metadata_file_and_missing_file(tmp_path):
    (tmp_path / "metadata.textproto").write_text(MINICIAO_META)
    assert parse_metadata(tmp_path / "metadata.textproto")["output_dim"] == 10
    with pytest.raises(UserInputError, match="not found"):
        parse_metadata(tmp_path / "nope.textproto")
    (tmp_path / "metadata.textproto").write_text("output_dim: {")
    with pytest.raises(UserInputError, match="metadata.textproto"):
        parse_metadata(tmp_path / "metadata.textproto")


def write_meta(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metadata.textproto").write_text(textwrap.dedent(text))
    return folder


def test_metadata_methods_follow_the_kit(tmp_path):
    meta = AutoDLMetadata(write_meta(tmp_path / "train", MINICIAO_META))
    assert meta.get_dataset_name() == str(tmp_path / "train")
    assert meta.size() == 18 and meta.get_output_size() == 10 and meta.get_sequence_size() == 1
    assert meta.get_matrix_size() == (32, 32) and meta.get_num_channels() == 3
    assert meta.get_tensor_size() == (32, 32, 3) and meta.get_tensor_shape() == (1, 32, 32, 3)
    assert meta.get_bundle_size() == 1 and meta.is_compressed() and not meta.is_sparse()
    assert meta.get_label_to_index_map()["cat"] == 3
    assert meta.get_channel_to_index_map() == {} and meta.get_feature_to_index_map() == {}
    with pytest.raises(IndexError):
        meta.get_matrix_size(1)


def test_metadata_defaults_unknown_channels_and_sequence(tmp_path):
    compressed = AutoDLMetadata(write_meta(tmp_path / "a", "output_dim: 2\nmatrix_spec { row_count: -1 col_count: -1 "
                                                         "format: COMPRESSED }\n"))
    assert compressed.get_num_channels() == 3  # unknown channels of compressed images: RGB
    assert compressed.get_tensor_shape() == (1, -1, -1, 3)  # sequence_size defaults to 1
    dense = AutoDLMetadata(write_meta(tmp_path / "b", "matrix_spec { row_count: 4 col_count: 4 }\n"))
    assert dense.get_num_channels() == 1 and not dense.is_compressed()  # format defaults to DENSE
    assert dense.size() == 0


# ---------------------------------------------------------------- task folder and solution


def make_task(root: Path, name="toy", solution="1 0\n0 1\n", test_count=2, output_dim=2) -> Path:
    for split, count in (("train", 3), ("test", test_count)):
        folder = write_meta(root / f"{name}.data" / split,
                            f"sample_count: {count}\noutput_dim: {output_dim}\nmatrix_spec {{ format: COMPRESSED }}\n")
        (folder / f"sample-{name}-{split}.tfrecord").write_bytes(b"")
    (root / f"{name}.solution").write_text(solution)
    return root


def test_find_task_ok(tmp_path):
    task = find_task(make_task(tmp_path))
    assert task.name == "toy" and task.data_dir == tmp_path / "toy.data"
    assert task.train_dir == tmp_path / "toy.data" / "train" and task.test_dir == tmp_path / "toy.data" / "test"
    assert task.solution_path == tmp_path / "toy.solution"


def _then(root, *actions):
    """Apply side-effect actions, then return root (for the table below)."""
    return root


@pytest.mark.parametrize("breakage, message", [
    (lambda r: r / "nope", "not found"),
    (lambda r: _then(r, (r / "toy.solution").unlink()), "no toy.solution"),
    (lambda r: _then(r, (r / "other.data").mkdir()), "several .data"),
    (lambda r: _then(r, (r / "toy.solution").rename(r / "other.solution")), "mismatch"),
    (lambda r: _then(r, (r / "toy.data" / "test" / "metadata.textproto").unlink()), "metadata.textproto"),
    (lambda r: _then(r, (r / "toy.data" / "train" / "sample-toy-train.tfrecord").unlink()), "no sample"),
    (lambda r: _then(r, (r / "toy.solution").write_text("1 0 0\n0 0 1\n")), "output_dim is 2"),
    (lambda r: _then(r, (r / "toy.solution").write_text("1 0\n")), "sample_count: 2"),
])
def test_find_task_clear_errors(tmp_path, breakage, message):
    root = breakage(make_task(tmp_path / "ds"))
    with pytest.raises(UserInputError, match=message):
        find_task(root)


def test_find_task_without_data_folder(tmp_path):
    with pytest.raises(UserInputError, match="no <name>.data"):
        find_task(tmp_path)


def test_read_solution(tmp_path):
    path = tmp_path / "x.solution"
    path.write_text("1 0 0\n0 1 1\n\n")
    np.testing.assert_array_equal(read_solution(path), [[1, 0, 0], [0, 1, 1]])
    path.write_text("1 0 0\n0 1\n")
    with pytest.raises(UserInputError, match="ragged"):
        read_solution(path)
    path.write_text("1 0 a\n")
    with pytest.raises(UserInputError, match="non-numeric"):
        read_solution(path)
    path.write_text("")
    with pytest.raises(UserInputError, match="empty"):
        read_solution(path)


# ---------------------------------------------------------------- dataset semantics on hand-made records


def write_records(path: Path, examples):
    """Write SequenceExamples given as (context dict, feature_lists dict) with TF's own protos."""
    import tensorflow as tf

    def feature(value):
        if isinstance(value[0], bytes):
            return tf.train.Feature(bytes_list=tf.train.BytesList(value=value))
        if isinstance(value[0], float):
            return tf.train.Feature(float_list=tf.train.FloatList(value=value))
        return tf.train.Feature(int64_list=tf.train.Int64List(value=value))

    with tf.io.TFRecordWriter(str(path)) as writer:
        for context, lists in examples:
            example = tf.train.SequenceExample()
            for key, values in context.items():
                if values:
                    example.context.feature[key].CopyFrom(feature(values))
                elif key == "label_score":  # empty lists keep their type, as in the kit's test files
                    example.context.feature[key].CopyFrom(tf.train.Feature(float_list=tf.train.FloatList()))
                else:
                    example.context.feature[key].CopyFrom(tf.train.Feature(int64_list=tf.train.Int64List()))
            for key, frames in lists.items():
                example.feature_lists.feature_list[key].feature.extend([feature(f) for f in frames])
            writer.write(example.SerializeToString())


def test_dense_format_is_reshaped(tmp_path):
    folder = write_meta(tmp_path / "train", "sample_count: 2\noutput_dim: 3\nsequence_size: 1\n"
                                            "matrix_spec { row_count: 2 col_count: 3 num_channels: 1 format: DENSE }\n")
    values = [np.arange(6, dtype=np.float32) + 10 * i for i in range(2)]
    write_records(folder / "sample-x.tfrecord",
                  [({"label_index": [i, 2], "label_score": [1.0, 0.5]}, {"0_dense_input": [[float(v) for v in val]]})
                   for i, val in enumerate(values)])
    items = read_all(AutoDLDataset(folder))
    assert len(items) == 2
    for i, (x, y) in enumerate(items):
        assert x.shape == (1, 2, 3, 1) and x.dtype == np.float32
        np.testing.assert_array_equal(x.ravel(), values[i])
    np.testing.assert_array_equal(items[0][1], [1, 0, 0.5])
    np.testing.assert_array_equal(items[1][1], [0, 1, 0.5])


def test_compressed_png_values_and_gray_channels(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (5, 7), dtype=np.uint8), np.full((5, 7), 16, np.uint8)]
    encoded = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    folder = write_meta(tmp_path / "test", "sample_count: 2\noutput_dim: 4\n"
                                           "matrix_spec { row_count: 5 col_count: 7 num_channels: 1 format: COMPRESSED }\n")
    write_records(folder / "sample-x.tfrecord",
                  [({"label_index": [], "label_score": []}, {"0_compressed": [[e]]}) for e in encoded])
    items = read_all(AutoDLDataset(folder))
    for (x, y), image in zip(items, images):
        assert x.shape == (1, 5, 7, 1)
        np.testing.assert_allclose(x[0, :, :, 0], image / 255.0, atol=1e-6)
        np.testing.assert_array_equal(y, np.zeros(4))  # test records carry no labels


# ---------------------------------------------------------------- the kit's own sample data


def needs_sample(name):
    path = SAMPLES / name
    return pytest.mark.skipif(not path.is_dir(), reason=f"kit sample {path} absent")


@needs_sample("miniciao")
def test_miniciao_counts_shapes_and_labels():
    task = find_task(SAMPLES / "miniciao")
    assert task.name == "miniciao"
    train, test = AutoDLDataset(task.train_dir), AutoDLDataset(task.test_dir)
    assert train.get_metadata().get_tensor_shape() == (1, 32, 32, 3)
    assert train.get_metadata().get_label_to_index_map()["cat"] == 3
    train_items, test_items = read_all(train), read_all(test)
    assert (len(train_items), len(test_items)) == (82, 18) == (train.get_metadata().size(), test.get_metadata().size())
    labels = np.array([y for _, y in train_items])
    assert labels.shape == (82, 10)
    np.testing.assert_array_equal(labels.sum(axis=1), np.ones(82))  # one-hot rows decoded from label_index
    assert set(np.unique(labels)) == {0.0, 1.0}
    assert all(x.shape == (1, 32, 32, 3) and 0 <= x.min() and x.max() <= 1 for x, _ in train_items)
    assert not np.array([y for _, y in test_items]).any()
    assert read_solution(task.solution_path).shape == (18, 10)


@needs_sample("miniciao")
def test_miniciao_pixels_match_the_png_in_the_record():
    import tensorflow as tf
    from PIL import Image

    task = find_task(SAMPLES / "miniciao")
    record = next(iter(tf.data.TFRecordDataset(str(next(task.train_dir.glob("sample*"))))))
    example = tf.train.SequenceExample.FromString(record.numpy())
    png = example.feature_lists.feature_list["0_compressed"].feature[0].bytes_list.value[0]
    expected = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")) / 255.0
    x, y = read_all(AutoDLDataset(task.train_dir))[0]
    np.testing.assert_allclose(x[0], expected, atol=1e-6)
    assert y[list(example.context.feature["label_index"].int64_list.value)].all()


@needs_sample("Monkeys")
def test_monkeys_variable_size():
    task = find_task(SAMPLES / "Monkeys")
    train = AutoDLDataset(task.train_dir)
    assert train.get_metadata().get_tensor_shape() == (1, -1, -1, 3)
    assert tuple(train.get_dataset().element_spec[0].shape) == (1, None, None, 3)
    items = read_all(train)
    assert len(items) == 26 and len(read_all(AutoDLDataset(task.test_dir))) == 4
    assert len({x.shape for x, _ in items}) > 1
    np.testing.assert_array_equal(np.array([y for _, y in items]).sum(axis=1), np.ones(26))


GRAPH_SCRIPT = """
import json, sys
import numpy as np
import tensorflow as tf
tf.compat.v1.disable_v2_behavior()
from autodl_data.autodl_format import AutoDLDataset
result = {}
for split_dir in sys.argv[1:]:
    dataset = AutoDLDataset(split_dir).get_dataset()
    element = tf.compat.v1.data.make_one_shot_iterator(dataset).get_next()
    shapes, label_sums = set(), []
    with tf.compat.v1.Session() as session:
        while True:
            try:
                x, y = session.run(element)
            except tf.errors.OutOfRangeError:
                break
            shapes.add(str(x.shape) + str(x.dtype))
            label_sums.append(float(y.sum()))
    result[split_dir] = {"type": type(dataset).__name__, "eager": tf.executing_eagerly(),
                         "n": len(label_sums), "shapes": sorted(shapes), "label_sum": sum(label_sums)}
print("RESULT" + json.dumps(result))
"""


def run_graph_mode(*split_dirs) -> dict:
    proc = subprocess.run([sys.executable, "-c", GRAPH_SCRIPT, *map(str, split_dirs)], capture_output=True,
                          text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


# ---------------------------------------------------------------- writing, read back with the kit semantics

from autodl_data.autodl_format import WriteReport, metadata_text, prepare_image, write_autodl_dataset  # noqa: E402


def encode(array, fmt="PNG", **kwargs) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def odd_images(rng, n, channels, sizes):
    """uint8 images with odd value ranges (0..16, 250..255, full) and the given sizes."""
    images = []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        high = (17, 256, 6)[i % 3]
        image = rng.integers(0, high, (h, w) if channels == 1 else (h, w, channels), dtype=np.uint8)
        images.append(image + (250 if high == 6 else 0))
    return images


def split_dirs(report: WriteReport):
    return (report.path / f"{report.name}.data" / "train", report.path / f"{report.name}.data" / "test")


def test_round_trip_arrays_gray_and_rgb_variable_size_multilabel(tmp_path):
    rng = np.random.default_rng(1)
    gray = odd_images(rng, 6, 1, [(5, 7), (9, 4)])
    rgb = odd_images(rng, 6, 3, [(6, 6), (3, 8)])
    images = gray[:3] + rgb[:3] + gray[3:] + rgb[3:]
    labels = (rng.random((12, 4)) < 0.4).astype(np.uint8)
    labels[:, 0] = 1 - labels[:, 1]  # some rows multi-label, none empty
    train = [(images[i], labels[i]) for i in range(7)]
    test = [(images[i], labels[i]) for i in range(7, 12)]
    names = ["a b", "it's", "c", "d"]
    report = write_autodl_dataset(tmp_path, "toy", train, test, 4, class_names=names)
    assert report.counts == {"train": 7, "test": 5} and report.skipped == {"train": [], "test": []}
    assert (report.row_count, report.col_count, report.num_channels) == (-1, -1, 3)
    task = find_task(report.path)
    meta = AutoDLMetadata(task.train_dir)
    assert meta.get_tensor_shape() == (1, -1, -1, 3) and meta.size() == 7 and meta.get_output_size() == 4
    assert meta.get_label_to_index_map() == {n: i for i, n in enumerate(names)}
    assert (report.path / "toy_label.name").read_text().splitlines() == names
    np.testing.assert_array_equal(read_solution(task.solution_path), labels[7:])
    train_items = read_all(AutoDLDataset(task.train_dir))
    test_items = read_all(AutoDLDataset(task.test_dir))
    for (x, y), image, label in zip(train_items + test_items, images, labels):
        as_rgb = np.repeat(image[:, :, None], 3, axis=2) if image.ndim == 2 else image
        assert x.shape == (1, *as_rgb.shape)
        np.testing.assert_allclose(x[0], as_rgb / 255.0, atol=1e-6)  # same pixels, in the given order
    np.testing.assert_array_equal([y for _, y in train_items], labels[:7])
    assert not np.array([y for _, y in test_items]).any()  # test labels only in the solution


def test_round_trip_grayscale_fixed_size_keeps_small_values(tmp_path):
    images = [np.arange(64, dtype=np.uint8).reshape(8, 8) % 17 for _ in range(3)]
    report = write_autodl_dataset(tmp_path, "digits", [(images[0], [1, 0]), (images[1], [0, 1])],
                                  [(images[2], [0, 1])], 2)
    assert (report.row_count, report.col_count, report.num_channels) == (8, 8, 1)
    train_dir, test_dir = split_dirs(report)
    x, _ = read_all(AutoDLDataset(test_dir))[0]
    assert x.shape == (1, 8, 8, 1)
    np.testing.assert_array_equal(np.rint(x[0, :, :, 0] * 255).astype(int), images[2])  # 0..16 stays 0..16
    assert not (report.path / "digits_label.name").exists()
    assert AutoDLMetadata(train_dir).get_label_to_index_map() == {}


def test_encoded_bytes_kept_converted_or_skipped(tmp_path):
    import tensorflow as tf

    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
    jpeg, png, bmp = encode(image, "JPEG", quality=90), encode(image), encode(image, "BMP")
    good = (tmp_path / "good.png")
    good.write_bytes(png)
    train = [(jpeg, [1, 0], "jpeg"), (b"not an image", [1, 0], "junk"), (png[: len(png) // 2], [0, 1], "truncated"),
             (good, [0, 1], "path"), (tmp_path / "missing.png", [0, 1], "missing")]
    test = [(bmp, [1, 0], "bmp"), (png, [0, 1], "png")]
    report = write_autodl_dataset(tmp_path / "out", "mixed", train, test, 2)
    assert report.counts == {"train": 2, "test": 2}
    assert [item for item, _ in report.skipped["train"]] == ["junk", "truncated", "missing"]
    assert report.reencoded == 1  # only the BMP
    train_dir, test_dir = split_dirs(report)
    records = [tf.train.SequenceExample.FromString(r.numpy())
               for r in tf.data.TFRecordDataset(str(next(train_dir.glob("sample*"))))]
    stored = [r.feature_lists.feature_list["0_compressed"].feature[0].bytes_list.value[0] for r in records]
    assert stored == [jpeg, png]  # kept byte for byte
    test_x = [x for x, _ in read_all(AutoDLDataset(test_dir))]
    np.testing.assert_allclose(test_x[0][0], image / 255.0, atol=1e-6)  # BMP re-encoded losslessly
    info = json.loads((report.path / "mixed_conversion.json").read_text())
    assert len(info["skipped"]["train"]) == 3


def test_train_shards_and_single_test_file(tmp_path):
    images = [np.full((4, 4), i, np.uint8) for i in range(11)]
    eye = np.eye(3, dtype=np.uint8)
    report = write_autodl_dataset(tmp_path, "sh", [(images[i], eye[i % 3]) for i in range(8)],
                                  [(images[i], eye[i % 3]) for i in range(8, 11)], 3, shard_size=3)
    train_dir, test_dir = split_dirs(report)
    assert sorted(p.name for p in train_dir.glob("sample*")) == [f"sample-sh-train-0000{i}-of-00003.tfrecord"
                                                                  for i in range(3)]
    assert [p.name for p in test_dir.glob("sample*")] == ["sample-sh-test.tfrecord"]
    values = sorted(int(round(x.max() * 255)) for x, _ in read_all(AutoDLDataset(train_dir)))
    assert values == list(range(8))
    assert [int(round(x.max() * 255)) for x, _ in read_all(AutoDLDataset(test_dir))] == [8, 9, 10]


def test_write_rejects_bad_input(tmp_path):
    image = np.zeros((4, 4), np.uint8)
    ok = [(image, [1, 0])]
    with pytest.raises(UserInputError, match="label vector"):
        write_autodl_dataset(tmp_path, "x", [(image, [1, 0, 0])], ok, 2)
    with pytest.raises(UserInputError, match="0/1"):
        write_autodl_dataset(tmp_path, "x", [(image, [0.5, 1])], ok, 2)
    with pytest.raises(UserInputError, match="invalid dataset name"):
        write_autodl_dataset(tmp_path, "a.b", ok, ok, 2)
    with pytest.raises(UserInputError, match="uint8"):
        write_autodl_dataset(tmp_path, "x", [(image.astype(np.float32), [1, 0])], ok, 2)
    with pytest.raises(UserInputError, match="shape"):
        write_autodl_dataset(tmp_path, "x", [(np.zeros((4, 4, 2), np.uint8), [1, 0])], ok, 2)
    with pytest.raises(UserInputError, match="no test example"):
        write_autodl_dataset(tmp_path, "x", ok, [(b"junk", [1, 0])], 2)
    assert not list(tmp_path.iterdir())  # nothing half-written is left behind
    write_autodl_dataset(tmp_path, "x", ok, ok, 2)
    with pytest.raises(UserInputError, match="already exists"):
        write_autodl_dataset(tmp_path, "x", ok, ok, 2)
    write_autodl_dataset(tmp_path, "x", ok, ok + ok, 2, overwrite=True)
    assert read_solution(tmp_path / "x" / "x.solution").shape == (2, 2)


def test_metadata_text_round_trips_through_the_parser():
    names = ["cat", "it's", "back\\slash", "été"]
    meta = parse_metadata_text(metadata_text(5, 4, -1, 32, 3, names))
    assert meta["label_to_index_map"] == {n: i for i, n in enumerate(names)}
    assert meta["matrix_spec"][0]["row_count"] == -1 and meta["matrix_spec"][0]["format"] == "COMPRESSED"


def test_metadata_text_parses_with_protobuf_text_format():
    """The kit merges metadata with protobuf's text_format; check ours is valid protobuf text."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format

    fd = descriptor_pb2.FileDescriptorProto(name="autodl_test_meta.proto", package="t", syntax="proto2")
    spec = fd.message_type.add(name="MatrixSpec")
    F = descriptor_pb2.FieldDescriptorProto
    for number, (field, ftype) in enumerate([("col_count", F.TYPE_INT32), ("row_count", F.TYPE_INT32),
                                             ("num_channels", F.TYPE_INT32), ("is_sequence_col", F.TYPE_BOOL),
                                             ("is_sequence_row", F.TYPE_BOOL), ("has_locality_col", F.TYPE_BOOL),
                                             ("has_locality_row", F.TYPE_BOOL)], 1):
        spec.field.add(name=field, number=number, type=ftype, label=F.LABEL_OPTIONAL)
    enum = spec.enum_type.add(name="Format")
    for number, value in enumerate(["DENSE", "SPARSE", "COMPRESSED"]):
        enum.value.add(name=value, number=number)
    spec.field.add(name="format", number=8, type=F.TYPE_ENUM, type_name=".t.MatrixSpec.Format",
                   label=F.LABEL_OPTIONAL)
    data = fd.message_type.add(name="Spec")
    entry = data.nested_type.add(name="LabelToIndexMapEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    entry.field.add(name="value", number=2, type=F.TYPE_INT32, label=F.LABEL_OPTIONAL)
    data.field.add(name="matrix_spec", number=1, type=F.TYPE_MESSAGE, type_name=".t.MatrixSpec",
                   label=F.LABEL_REPEATED)
    for number, field in [(2, "is_sequence")]:
        data.field.add(name=field, number=number, type=F.TYPE_BOOL, label=F.LABEL_OPTIONAL)
    for number, field in [(3, "output_dim"), (7, "sequence_size"), (8, "sample_count")]:
        data.field.add(name=field, number=number, type=F.TYPE_INT32, label=F.LABEL_OPTIONAL)
    data.field.add(name="label_to_index_map", number=4, type=F.TYPE_MESSAGE,
                   type_name=".t.Spec.LabelToIndexMapEntry", label=F.LABEL_REPEATED)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    message = message_factory.GetMessageClass(pool.FindMessageTypeByName("t.Spec"))()
    names = ["cat", "it's", "back\\slash", "été"]
    text_format.Merge(metadata_text(5, 4, -1, 32, 1, names), message)
    assert dict(message.label_to_index_map) == {n: i for i, n in enumerate(names)}
    assert message.sample_count == 5 and message.matrix_spec[0].row_count == -1
    assert message.matrix_spec[0].format == 2


def test_graph_mode_reads_written_data_and_kit_samples(tmp_path):
    """One TF1 graph-mode process (it cannot be switched on in this eager one) reads all split dirs."""
    images = [np.full((3, 5, 3), 10 * i, np.uint8) for i in range(5)]
    eye = np.eye(2, dtype=np.uint8)
    report = write_autodl_dataset(tmp_path, "g", [(images[i], eye[i % 2]) for i in range(3)],
                                  [(images[i], eye[i % 2]) for i in range(3, 5)], 2, shard_size=2)
    train_dir, test_dir = split_dirs(report)
    kit = find_task(SAMPLES / "miniciao") if (SAMPLES / "miniciao").is_dir() else None
    result = run_graph_mode(train_dir, test_dir, *([kit.train_dir, kit.test_dir] if kit else []))
    assert result[str(train_dir)] == {"type": "DatasetV1Adapter", "eager": False, "n": 3,
                                      "shapes": ["(1, 3, 5, 3)float32"], "label_sum": 3.0}
    assert result[str(test_dir)]["n"] == 2 and result[str(test_dir)]["label_sum"] == 0.0
    if kit:
        train, test = result[str(kit.train_dir)], result[str(kit.test_dir)]
        assert train["type"] == "DatasetV1Adapter" and (train["n"], test["n"]) == (82, 18)
        assert train["shapes"] == ["(1, 32, 32, 3)float32"] and train["label_sum"] == 82 and test["label_sum"] == 0


def test_prepare_image_reports_channels():
    gray = prepare_image(encode(np.zeros((3, 4), np.uint8)))
    assert (gray.height, gray.width, gray.channels, gray.reencoded) == (3, 4, 1, False)
    rgba = prepare_image(encode(np.zeros((3, 4, 4), np.uint8)))
    assert rgba.channels == 3 and not rgba.reencoded
