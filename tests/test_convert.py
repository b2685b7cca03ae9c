"""Tests of `tools convert`: each source kind, split rules, summaries and clear errors (small generated data)."""
from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

from autodl_data.autodl_format import AutoDLDataset, AutoDLMetadata, find_task, read_solution
from tools.cli import main as cli_main
from tools.convert import detect_kind, split_indices, subsample
from tools.errors import UserInputError


def png(array) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def run_cli(*argv) -> int:
    return cli_main(["convert", *map(str, argv), "-q"])


def eager_items(split_dir):
    return list(AutoDLDataset(split_dir).get_dataset().as_numpy_iterator())


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    x = data.images.astype(np.uint8)[:200]  # 8x8, values 0..16
    return x, data.target[:200]


def test_plain_npz_with_int_labels_split_stratified(tmp_path, digits, capsys):
    x, y = digits
    np.savez(tmp_path / "digits.npz", x=x, y=y)
    assert run_cli(tmp_path / "digits.npz", "--out", tmp_path / "out", "--seed", "3") == 0
    out = capsys.readouterr().out
    assert "train 160, test 40 examples; 10 classes" in out and "image shape 8x8x1" in out
    task = find_task(tmp_path / "out" / "digits")
    solution = read_solution(task.solution_path)
    assert solution.shape == (40, 10)
    np.testing.assert_array_equal(solution.sum(axis=0), [4] * 10)  # 20 per class -> 4 in test each
    test_x = np.array([item[0][0, :, :, 0] for item in eager_items(task.test_dir)])
    is_test = split_indices(np.eye(10, dtype=np.uint8)[y], 0.2, 3)
    np.testing.assert_allclose(test_x, x[is_test] / 255.0, atol=1e-6)  # exact pixels (0..16), order kept
    np.testing.assert_array_equal(solution.argmax(axis=1), y[is_test])


def test_corpus_folder_with_encoded_images_is_test_and_class_names(tmp_path):
    rng = np.random.default_rng(0)
    sizes = [(9, 6), (5, 11), (7, 7)]
    images = [rng.integers(0, 256, (*sizes[i % 3], 3), dtype=np.uint8) for i in range(12)]
    blobs = [png(im) for im in images]
    offsets = np.cumsum([0] + [len(b) for b in blobs])
    y = np.zeros((12, 3), np.uint8)
    y[np.arange(12), np.arange(12) % 3] = 1
    y[::4, 2] = 1  # multi-label rows
    is_test = np.arange(12) >= 8
    folder = tmp_path / "tiny_corpus"
    folder.mkdir()
    np.savez_compressed(folder / "data.npz", encoded=np.frombuffer(b"".join(blobs), np.uint8), offsets=offsets,
                        y=y, is_test=is_test)
    (folder / "info.json").write_text(json.dumps({"name": "tiny_corpus", "class_names": ["x", "y", "z"],
                                                  "source": {"repo": "github.com/o/r", "commit": "ab" * 20},
                                                  "license": "CC BY 4.0"}))
    assert detect_kind(folder) == "corpus"
    assert run_cli(folder, "--out", tmp_path / "out") == 0
    task = find_task(tmp_path / "out" / "tiny_corpus")
    meta = AutoDLMetadata(task.train_dir)
    assert meta.get_tensor_shape() == (1, -1, -1, 3) and meta.size() == 8
    assert meta.get_label_to_index_map() == {"x": 0, "y": 1, "z": 2}
    np.testing.assert_array_equal(read_solution(task.solution_path), y[8:])
    train = eager_items(task.train_dir)
    np.testing.assert_array_equal([label for _, label in train], y[:8])
    for (image, _), expected in zip(eager_items(task.test_dir), images[8:]):
        np.testing.assert_allclose(image[0], expected / 255.0, atol=1e-6)
    # the PNG bytes are stored as they were
    record = json.loads((task.solution_path.parent / "tiny_corpus_conversion.json").read_text())
    assert record["reencoded"] == 0
    # the provenance a store can keep: references, not this machine's paths
    assert record["origin"] == {"corpus": "tiny_corpus", "repo": "github.com/o/r", "commit": "ab" * 20,
                                "license": "CC BY 4.0"}


def make_folder(root: Path, classes: dict, rng) -> None:
    for name, count in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            (root / name / f"img{i}.png").write_bytes(png(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)))


def test_image_folder_split_skips_and_reports(tmp_path, capsys):
    rng = np.random.default_rng(1)
    make_folder(tmp_path / "pets", {"cat": 10, "dog": 5, "emu": 5}, rng)
    (tmp_path / "pets" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (tmp_path / "pets" / "dog" / "notes.txt").write_text("not an image")
    assert detect_kind(tmp_path / "pets") == "folder"
    # By default the first undecodable image stops the conversion, naming it; nothing is left behind.
    assert run_cli(tmp_path / "pets", "--out", tmp_path / "out", "--test-fraction", "0.4") == 2
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "cannot decode" in err and "--skip-bad-images" in err
    assert not (tmp_path / "out" / "pets").exists() and not list((tmp_path / "out").glob(".*partial*"))
    assert run_cli(tmp_path / "pets", "--out", tmp_path / "out", "--test-fraction", "0.4", "--skip-bad-images") == 0
    out = capsys.readouterr().out
    assert "SKIPPED 1 unreadable" in out and "broken.jpg" in out
    assert "1 non-image file(s) ignored" in out
    task = find_task(tmp_path / "out" / "pets")
    solution = read_solution(task.solution_path)
    assert solution.sum(axis=0).tolist() in ([4, 2, 2], [5, 2, 2])  # stratified (the broken file may be in test)
    assert AutoDLMetadata(task.train_dir).get_label_to_index_map() == {"cat": 0, "dog": 1, "emu": 2}


def test_image_folder_with_own_train_test(tmp_path):
    rng = np.random.default_rng(2)
    make_folder(tmp_path / "ds" / "train", {"a": 3, "b": 2}, rng)
    make_folder(tmp_path / "ds" / "test", {"a": 1, "b": 2}, rng)
    assert run_cli(tmp_path / "ds", "--out", tmp_path / "out", "--name", "own") == 0
    task = find_task(tmp_path / "out" / "own")
    np.testing.assert_array_equal(read_solution(task.solution_path), [[1, 0], [0, 1], [0, 1]])
    assert AutoDLMetadata(task.train_dir).size() == 5


def test_csv_multilabel_with_split_column(tmp_path):
    rng = np.random.default_rng(3)
    (tmp_path / "imgs").mkdir()
    rows = ["path,labels,split"]
    label_sets = ["red;round", "blue", "red big", "blue;round", "big", "red", "round blue"]
    for i, labels in enumerate(label_sets):
        (tmp_path / "imgs" / f"{i}.png").write_bytes(png(rng.integers(0, 256, (4, 5), dtype=np.uint8)))
        rows.append(f"imgs/{i}.png,{labels},{'test' if i >= 5 else 'train'}")
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    assert run_cli(tmp_path / "list.csv", "--out", tmp_path / "out") == 0
    task = find_task(tmp_path / "out" / "list")
    names = ["big", "blue", "red", "round"]
    assert AutoDLMetadata(task.train_dir).get_label_to_index_map() == {n: i for i, n in enumerate(names)}
    np.testing.assert_array_equal(read_solution(task.solution_path), [[0, 0, 1, 0], [0, 1, 0, 1]])
    train_labels = [label for _, label in eager_items(task.train_dir)]
    np.testing.assert_array_equal(train_labels[0], [0, 0, 1, 1])
    assert AutoDLMetadata(task.train_dir).get_tensor_shape() == (1, 4, 5, 1)


def test_max_train_max_test_subsample(tmp_path, digits):
    x, y = digits
    np.savez(tmp_path / "d.npz", x=x, y=y, is_test=np.arange(200) >= 150)
    assert run_cli(tmp_path / "d.npz", "--out", tmp_path / "out", "--max-train", "30", "--max-test", "20") == 0
    task = find_task(tmp_path / "out" / "d")
    assert AutoDLMetadata(task.train_dir).size() == 30 and read_solution(task.solution_path).shape == (20, 10)


def test_subsample_keeps_order():
    kept = subsample(np.arange(100), 10, seed=0)
    assert len(kept) == 10 and (np.diff(kept) > 0).all()


@pytest.mark.parametrize("setup, args, message", [
    (lambda p: None, ["missing"], "not found"),
    (lambda p: np.savez(p / "a.npz", x=np.zeros((4, 3, 3), np.uint8), y=np.array([0, 1, 0])), ["a.npz"],
     "4 images but 3 label rows"),
    (lambda p: np.savez(p / "a.npz", x=np.zeros((4, 3, 3), np.uint8), y=np.array([[0, 2]] * 4)), ["a.npz"],
     "0/1"),
    (lambda p: np.savez(p / "a.npz", x=np.zeros((4, 3, 3), np.uint8), y=np.array([0, 2, 0, 2])), ["a.npz"],
     "without any example: 1"),
    (lambda p: np.savez(p / "a.npz", z=np.zeros(3)), ["a.npz"], "expected arrays"),
    (lambda p: np.savez(p / "a.npz", x=np.zeros((4, 3, 3), np.float32), y=np.array([0, 1, 0, 1])), ["a.npz"],
     "uint8"),
    (lambda p: (p / "f" / "a").mkdir(parents=True) or (p / "f" / "b").mkdir(), ["f"], "without images"),
    (lambda p: (p / "l.csv").write_text("file,label\nx.png,a\n"), ["l.csv"], "'path' and 'labels'"),
])
def test_clear_errors_exit_2(tmp_path, capsys, setup, args, message):
    setup(tmp_path)
    code = run_cli(*(tmp_path / a for a in args), "--out", tmp_path / "out")
    assert code == 2
    assert message in capsys.readouterr().err


def test_class_names_width_mismatch(tmp_path, digits):
    x, y = digits
    np.savez(tmp_path / "d.npz", x=x[:40], y=y[:40])
    (tmp_path / "names.txt").write_text("a\nb\n")
    with pytest.raises(UserInputError, match="2 class names"):
        from tools.convert import load_npz
        load_npz(tmp_path / "d.npz", "npz", argparse.Namespace(class_names=str(tmp_path / "names.txt"),
                                                               test_fraction=None, seed=0, name=None,
                                                               max_train=None, max_test=None))


def test_split_indices_stratified_and_seeded():
    labels = np.eye(3, dtype=np.uint8)[np.repeat([0, 1, 2], [10, 5, 2])]
    mask = split_indices(labels, 0.2, seed=5)
    assert [int(mask[labels[:, k] == 1].sum()) for k in range(3)] == [2, 1, 1]
    np.testing.assert_array_equal(mask, split_indices(labels, 0.2, seed=5))
    with pytest.raises(UserInputError):
        split_indices(labels, 1.5, seed=0)


def test_one_class_folder_refused(tmp_path, capsys):
    make_folder(tmp_path / "photos", {"cats": 4}, np.random.default_rng(4))
    assert run_cli(tmp_path / "photos", "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "only one class folder (cats)" in err and "two classes" in err
    assert not (tmp_path / "out").exists()


def test_text_file_named_npz_is_not_an_archive(tmp_path, capsys):
    (tmp_path / "a.npz").write_text("x,y\n1,2\n")
    assert run_cli(tmp_path / "a.npz", "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "not a numpy .npz archive" in err and "pickle" not in err


def test_existing_output_names_the_overwrite_flag(tmp_path, capsys):
    np.savez(tmp_path / "d.npz", x=np.zeros((6, 3, 3), np.uint8), y=np.arange(6) % 2)
    (tmp_path / "out" / "d").mkdir(parents=True)
    assert run_cli(tmp_path / "d.npz", "--out", tmp_path / "out") == 2
    assert "pass --overwrite" in capsys.readouterr().err


def test_without_tensorflow_a_clear_error(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tensorflow", None)  # what an install without the [kit] extra sees
    np.savez(tmp_path / "d.npz", x=np.zeros((6, 3, 3), np.uint8), y=np.arange(6) % 2)
    assert run_cli(tmp_path / "d.npz", "--out", tmp_path / "out") == 2
    assert "this command needs TensorFlow: pip install 'autodl-solver[kit]'" in capsys.readouterr().err


def test_unknown_flag_prints_the_subcommand_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["convert", "photos", "--out", "data", "--nope"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: tools convert" in err and "tools convert: error: unrecognized arguments: --nope" in err
