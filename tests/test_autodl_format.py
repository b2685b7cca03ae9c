"""Tests of the AutoDL format reader (and writer round trips): metadata parsing, task checks, kit semantics."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tools.autodl_format import (AutoDLDataset, AutoDLMetadata, find_task, parse_metadata, parse_metadata_text,
                                 read_solution)
from tools.errors import UserInputError

SAMPLES = Path("/work/shared/datasets/autodl_samples")
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
from tools.autodl_format import AutoDLDataset
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


@needs_sample("miniciao")
def test_graph_mode_reads_the_kit_samples():
    task = find_task(SAMPLES / "miniciao")
    result = run_graph_mode(task.train_dir, task.test_dir)
    train, test = result[str(task.train_dir)], result[str(task.test_dir)]
    assert train["type"] == "DatasetV1Adapter" and train["eager"] is False
    assert (train["n"], test["n"]) == (82, 18)
    assert train["shapes"] == ["(1, 32, 32, 3)float32"] and train["label_sum"] == 82 and test["label_sum"] == 0
