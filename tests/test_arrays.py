"""autodl_core.arrays (in-memory datasets) against autodl_core.tfreader, and the readers dispatch; corpus
folders read into them (autodl_data.corpus_npz).

The equivalence tests build the kit's view of the same images (tf.data, eager, (1, H, W, C) float32
in [0, 1]) and check that both readers give the same uint8 arrays: exactly at the native size,
within one grey level where TF's and torch's antialiased resizes round differently.
"""
import importlib.util
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from autodl_core import arrays, readers, tfreader
from autodl_data import corpus_npz
from tools.tf_support import import_tensorflow

REPO = Path(__file__).resolve().parents[1]


def _labels(n, k=3, seed=0):
    return np.eye(k, dtype=np.float32)[np.random.default_rng(seed).integers(0, k, n)]


def _tf():
    """TensorFlow in eager mode, imported after torch and triton as the project requires (the reverse order
    segfaults when a later test of the same pytest run loads triton)."""
    if importlib.util.find_spec("tensorflow") is None:
        pytest.skip("TensorFlow is not installed")
    tf = import_tensorflow(mode="eager", quiet=False)
    if not tf.executing_eagerly():
        pytest.skip("TensorFlow runs in graph mode in this process")
    return tf


def _kit_dataset(images, labels):
    """What the kit hands a model: (1, H, W, C) float32 examples, float32 label vectors."""
    tf = _tf()
    if isinstance(images, np.ndarray):
        return tf.data.Dataset.from_tensor_slices((images[:, None].astype(np.float32), labels))
    channels = images[0].shape[2]

    def generate():
        for image, label in zip(images, labels):
            yield image[None].astype(np.float32), label

    signature = (tf.TensorSpec((1, None, None, channels), tf.float32), tf.TensorSpec((labels.shape[1],), tf.float32))
    return tf.data.Dataset.from_generator(generate, output_signature=signature)


def _read_all(dataset, storage_hw, max_examples=None):
    """Peek, derive the value mapping, read in chunks; the chunk sizes and exhausted flags are compared too."""
    peek = readers.peek(dataset)
    reader = readers.ChunkReader(dataset, storage_hw, *readers.value_transform(peek.value_min, peek.value_max))
    xs, ys, trace = [], [], []
    while True:
        chunk = reader.read(max_examples=max_examples)
        trace.append((0 if chunk is None else len(chunk[0]), reader.exhausted, reader.n_read))
        if chunk is None:
            break
        xs.append(chunk[0])
        ys.append(chunk[1])
    return peek, np.concatenate(xs), np.concatenate(ys), trace


# ---------------------------------------------------------------- ArrayDataset / ArrayMetadata


@pytest.mark.parametrize("images, labels, message", [
    (np.zeros((4, 8, 8, 1)), np.zeros((3, 2)), "4 images but 3 label rows"),
    (np.zeros((4, 8)), np.zeros((4, 2)), "N x H x W x C"),
    (np.zeros((4, 8, 8, 1, 1)), np.zeros((4, 2)), "N x H x W x C"),
    ([np.zeros((8, 8, 1, 1))], np.zeros((1, 2)), "image 0 must be"),
    (np.zeros((4, 8, 8, 1)), np.zeros(4), "N x K"),
    (np.zeros((4, 8, 8, 1)), np.zeros((4, 0)), "K >= 1"),
    (np.zeros((0, 8, 8, 1)), np.zeros((0, 2)), "no example"),
    ([], np.zeros((0, 2)), "no example"),
    ([np.zeros((8, 8, 1)), np.zeros((9, 9, 3))], np.zeros((2, 2)), "channel counts"),
    (np.array([[["a"]]]), np.zeros((1, 2)), "dtype"),
    (np.zeros((2, 0, 8, 1)), np.zeros((2, 2)), "no pixels"),
])
def test_array_dataset_refuses_bad_input(images, labels, message):
    with pytest.raises(ValueError, match=message):
        arrays.ArrayDataset(images, labels)


def test_array_dataset_layouts_and_metadata():
    grey = arrays.ArrayDataset(np.zeros((5, 6, 7), np.uint8), _labels(5, 4))
    assert grey.fixed_size and grey.images.shape == (5, 6, 7, 1) and len(grey) == 5
    stacked = arrays.ArrayDataset([np.zeros((6, 7)) for _ in range(3)], _labels(3))
    assert stacked.fixed_size and stacked.images.shape == (3, 6, 7, 1)
    variable = arrays.ArrayDataset([np.zeros((6, 7, 3)), np.zeros((6, 9, 3))], _labels(2))
    assert not variable.fixed_size

    meta = arrays.ArrayMetadata(grey, name="toy")
    assert (meta.size(), meta.get_output_size(), meta.get_matrix_size(0), meta.get_num_channels(0)) == (5, 4, (6, 7), 1)
    assert meta.get_tensor_size(0) == (6, 7, 1) and meta.get_tensor_shape(0) == (1, 6, 7, 1)
    assert meta.get_sequence_size() == 1
    assert not Path(meta.get_dataset_name()).exists() and "toy" in meta.get_dataset_name()
    var_meta = arrays.ArrayMetadata(variable)
    assert var_meta.get_matrix_size(0) == (6, -1) and var_meta.get_tensor_shape(0) == (1, 6, -1, 3)


def test_selector_reads_array_metadata():
    from meta_db.metafeatures import metadata_features
    from meta_db.selector import select_pipeline

    meta = arrays.ArrayMetadata(arrays.ArrayDataset([np.zeros((20, 30, 3)), np.zeros((25, 30, 3))], _labels(2)))
    assert metadata_features(meta) == {"n_train": 2, "n_classes": 3, "rows": -1, "cols": 30, "channels": 3,
                                       "variable_size": True}
    config, reason = select_pipeline(meta)
    assert config is not None and "unusable" not in reason


# ---------------------------------------------------------------- equivalence with tfreader


@pytest.mark.parametrize("kind", ["uint8", "unit_float", "wide_range", "digits_0_16"])
@pytest.mark.parametrize("storage_hw", [(12, 10), (7, 5), (20, 24)])
def test_chunk_reader_matches_tfreader(kind, storage_hw):
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, (150, 12, 10, 3)).astype(np.uint8)
    labels = _labels(150)
    if kind == "uint8":  # the kit decodes these to [0, 1]; we keep them as they are
        ours, kit = raw, raw / 255.0
    elif kind == "unit_float":
        ours = kit = rng.random((150, 12, 10, 3)).astype(np.float32)
    elif kind == "wide_range":  # dense data in any range
        ours = kit = rng.normal(3.0, 4.0, (150, 12, 10, 3)).astype(np.float32)
    else:  # 0..16 grey levels, as in uci_optdigits
        ours = (raw[..., :1] % 17).astype(np.uint8)
        kit = ours / 255.0
    peek_a, xa, ya, trace_a = _read_all(arrays.ArrayDataset(ours, labels), storage_hw, max_examples=70)
    peek_k, xk, yk, trace_k = _read_all(_kit_dataset(kit, labels), storage_hw, max_examples=70)
    assert xa.dtype == xk.dtype == np.uint8 and xa.shape == xk.shape == (150,) + storage_hw + (ours.shape[3],)
    diff = np.abs(xa.astype(int) - xk.astype(int)).max()
    assert diff == 0 if storage_hw == (12, 10) else diff <= 1
    np.testing.assert_array_equal(ya, yk)
    assert trace_a == trace_k  # same chunk sizes, same moment `exhausted` turns True
    assert (peek_a.heights, peek_a.widths, peek_a.channels, peek_a.frames) == \
        (peek_k.heights, peek_k.widths, peek_k.channels, peek_k.frames)
    np.testing.assert_array_equal(peek_a.labels, peek_k.labels)
    scale = 255.0 if ours.dtype == np.uint8 else 1.0  # value range in the array's own units
    assert peek_a.value_max == pytest.approx(peek_k.value_max * scale, rel=1e-5)
    assert peek_a.value_min == pytest.approx(peek_k.value_min * scale, abs=1e-4)


def test_variable_size_matches_tfreader():
    rng = np.random.default_rng(2)
    sizes = [(9, 14), (16, 16), (20, 11), (16, 16), (5, 30)] * 14
    images = [rng.integers(0, 256, (h, w, 3)).astype(np.uint8) for h, w in sizes]
    labels = _labels(len(images))
    dataset = arrays.ArrayDataset(images, labels)
    assert not dataset.fixed_size and arrays.ArrayMetadata(dataset).get_matrix_size(0) == (-1, -1)
    peek_a, xa, ya, trace_a = _read_all(dataset, (16, 16))
    peek_k, xk, yk, trace_k = _read_all(_kit_dataset([a / 255.0 for a in images], labels), (16, 16))
    assert peek_a.heights == peek_k.heights and peek_a.median_hw == peek_k.median_hw
    assert np.abs(xa.astype(int) - xk.astype(int)).max() <= 1
    np.testing.assert_array_equal(ya, yk)
    assert trace_a == trace_k


def test_corpus_order_matches_tools_convert(tmp_path):
    """The kit reads what `tools convert` wrote in the order load_corpus_npz gives (and the same pixels)."""
    _tf()
    from autodl_data.autodl_format import AutoDLDataset, find_task, read_solution
    from tools.convert import convert

    folder = _corpus(tmp_path, "encoded", n=40)
    convert(_convert_args(folder, tmp_path / "kit"))
    task = find_task(tmp_path / "kit" / "toy")
    train, test, _ = corpus_npz.load_corpus_npz(folder)
    for ours, split_dir in ((train, task.train_dir), (test, task.test_dir)):
        _, xa, ya, _ = _read_all(ours, (10, 12))  # sizes vary: resized, so within one grey level
        _, xk, yk, _ = _read_all(AutoDLDataset(split_dir).get_dataset(), (10, 12))
        assert np.abs(xa.astype(int) - xk.astype(int)).max() <= 1
        if split_dir == task.train_dir:
            np.testing.assert_array_equal(ya, yk)
    np.testing.assert_array_equal(test.labels, read_solution(task.solution_path))


def _convert_args(source, out):
    import argparse

    return argparse.Namespace(source=str(source), out=str(out), name=None, kind=None, test_fraction=None, seed=0,
                              max_train=None, max_test=None, shard_size=None, class_names=None, overwrite=False,
                              quiet=True)


# ---------------------------------------------------------------- reading rules


def test_deadline_and_max_examples_follow_tfreader():
    dataset = arrays.ArrayDataset(np.zeros((300, 4, 4, 1), np.uint8), _labels(300))
    reader = arrays.ChunkReader(dataset, (4, 4), 0.0, 1.0, batch_size=64)
    x, _ = reader.read(deadline=time.monotonic() - 1.0)  # past deadline: one batch all the same
    assert len(x) == 64 and not reader.exhausted
    x, _ = reader.read(max_examples=65)  # whole batches until max_examples is reached
    assert len(x) == 128 and reader.n_read == 192
    x, _ = reader.read(max_examples=108)  # ends exactly at the end: exhausted only on the next read
    assert len(x) == 108 and not reader.exhausted
    assert reader.read() is None and reader.exhausted


def test_deadline_stops_between_batches(monkeypatch):
    dataset = arrays.ArrayDataset(np.zeros((640, 4, 4, 1), np.uint8), _labels(640))
    clock = iter(range(100))
    monkeypatch.setattr(arrays.time, "monotonic", lambda: float(next(clock)))
    x, _ = arrays.ChunkReader(dataset, (4, 4), 0.0, 1.0, batch_size=64).read(deadline=3.0)
    assert len(x) == 4 * 64  # checked before each batch after the first: t = 0, 1, 2 pass, 3 stops


def test_readers_dispatch(tmp_path):
    dataset = arrays.ArrayDataset(np.zeros((10, 4, 4, 1), np.uint8), _labels(10))
    assert isinstance(readers.ChunkReader(dataset, (4, 4)), arrays.ChunkReader)
    assert readers.count_examples(dataset) == 10
    assert readers.peek(dataset, n=3).labels.shape == (3, 3)
    assert readers.declared_test_count(arrays.ArrayMetadata(dataset)) is None
    assert readers.value_transform is tfreader.value_transform

    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "metadata.textproto").write_text("sample_count: 7\n")

    class KitMetadata:
        def get_dataset_name(self):
            return str(tmp_path / "train")

    assert readers.declared_test_count(KitMetadata()) == 7
    tf = _tf()
    kit = tf.data.Dataset.from_tensor_slices((np.zeros((5, 1, 4, 4, 1), np.float32), _labels(5)))
    assert isinstance(readers.ChunkReader(kit, (4, 4)), tfreader.ChunkReader)
    assert readers.count_examples(kit) == 5


def test_importing_readers_never_imports_tensorflow():
    """(Reading arrays without TensorFlow, resizes included, is checked end to end in test_npz_run.)"""
    code = "import sys, autodl_core.readers\nassert 'tensorflow' not in sys.modules, 'tensorflow imported'\n"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------- load_corpus_npz


def _png(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return np.frombuffer(buffer.getvalue(), np.uint8)


def _corpus(tmp_path, layout, n=12, name="toy"):
    """A tiny corpus folder; every 4th example is a test example; encoded: variable sizes, one grey image."""
    rng = np.random.default_rng(3)
    y = np.eye(3, dtype=np.uint8)[np.arange(n) % 3]
    is_test = np.arange(n) % 4 == 3
    folder = tmp_path / f"corpus_{layout}"
    folder.mkdir()
    if layout == "x":
        data = {"x": rng.integers(0, 256, (n, 6, 5, 1)).astype(np.uint8)}
    else:
        images = [rng.integers(0, 256, (6 + i % 3, 5, 3)).astype(np.uint8) for i in range(n)]
        images[1] = images[1][:, :, 0]  # one grey PNG among colour ones
        encoded = [_png(a) for a in images]
        data = {"encoded": np.concatenate(encoded), "offsets": np.cumsum([0] + [len(e) for e in encoded])}
    np.savez_compressed(folder / "data.npz", y=y, is_test=is_test, **data)
    (folder / "info.json").write_text(json.dumps({"name": name, "class_names": ["a", "b", "c"]}))
    return folder


def test_load_corpus_x_layout(tmp_path):
    folder = _corpus(tmp_path, "x")
    train, test, info = corpus_npz.load_corpus_npz(folder)
    z = np.load(folder / "data.npz")
    np.testing.assert_array_equal(train.images, z["x"][~z["is_test"]])  # source order kept
    np.testing.assert_array_equal(test.labels, z["y"][z["is_test"]])
    assert (info["name"], info["n_train"], info["n_test"], info["class_names"]) == ("toy", 9, 3, ["a", "b", "c"])
    shuffled, test2, _ = corpus_npz.load_corpus_npz(folder, shuffle_seed=5)
    again, _, _ = corpus_npz.load_corpus_npz(folder, shuffle_seed=5)
    np.testing.assert_array_equal(shuffled.images, again.images)
    assert not np.array_equal(shuffled.images, train.images)
    assert sorted(map(bytes, shuffled.images)) == sorted(map(bytes, train.images))
    np.testing.assert_array_equal(test2.images, test.images)  # the test split is never shuffled


def test_load_corpus_encoded_layout(tmp_path):
    folder = _corpus(tmp_path, "encoded")
    train, test, _ = corpus_npz.load_corpus_npz(folder)
    assert not train.fixed_size and train.channels == test.channels == 3
    grey = train.images[1]  # the grey PNG, replicated to RGB as the kit decodes it in a colour dataset
    assert np.array_equal(grey[:, :, 0], grey[:, :, 2])
    assert arrays.ArrayMetadata(train).get_matrix_size(0) == (-1, 5)
    assert corpus_npz.GRAY_MODES == __import__("autodl_data.autodl_format", fromlist=["_GRAY_MODES"])._GRAY_MODES


def test_load_corpus_errors(tmp_path):
    with pytest.raises(ValueError, match="no data.npz"):
        corpus_npz.load_corpus_npz(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    path = bad / "data.npz"
    cases = [
        (dict(x=np.zeros((3, 4, 4, 1), np.uint8), y=np.eye(3)), "is_test"),
        (dict(x=np.zeros((3, 4, 4, 1), np.uint8), y=np.eye(3), is_test=np.array([0, 1], bool)), "3 images, 3 label"),
        (dict(x=np.zeros((3, 4, 4, 1), np.uint8), y=np.eye(3), is_test=np.zeros(3, bool)), "test split is empty"),
        (dict(x=np.array([np.zeros(2), "a"], dtype=object), y=np.eye(2), is_test=np.array([0, 1], bool)),
         "pickled Python objects"),
        (dict(encoded=np.zeros(5, np.uint8), offsets=np.array([0, 9]), y=np.eye(1), is_test=np.ones(1, bool)),
         "offsets"),
        (dict(encoded=np.zeros(5, np.uint8), offsets=np.array([0, 5]), y=np.eye(1), is_test=np.ones(1, bool)),
         "image 0 cannot be decoded"),
    ]
    for arrays_in, message in cases:
        np.savez(path, **arrays_in)
        with pytest.raises(ValueError, match=message) as caught:
            corpus_npz.load_corpus_npz(bad)
        assert str(path) in str(caught.value)
    path.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match=str(path)):
        corpus_npz.load_corpus_npz(bad)
