"""`tools corpus`: recipes -> datasets in the shared corpus format, read from real git snapshots."""
from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from autodl_data.corpus_npz import load_corpus_npz
from tools.cli import main as tools_main
from tools.corpus.build import build_dataset, encode_image, subsample_rows
from tools.corpus.git_tree import GitTree, find_git_dir
from tools.corpus.layouts import LAYOUTS, pattern_regex
from tools.corpus.recipes import load_recipes, parse_recipe
from tools.errors import UserInputError

CLASS_BASE = {"cat": 0, "dog": 100, "owl": 200}  # pixel value = base + 10 * drawer + k: the label is in the pixels


def _png(value: int, size=(12, 10), mode="L") -> bytes:
    buffer = io.BytesIO()
    colour = value if mode == "L" else (value, 255 - value, 7)
    Image.new(mode, size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _tiff(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (9, 7), (value, 3, 200)).save(buffer, format="TIFF")
    return buffer.getvalue()


def _git(repo: Path, *args) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env=env).stdout.strip()


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    """Repositories `someone/images` (class folders with two drawers each, a zip, npz, IDX, CSV, TIFF
    scenes) and `someone/labels` (a label table), mirrored as bare clones (`owner+name.git`), and a
    partial snapshot of `someone/images` that lacks one image's object."""
    root = tmp_path_factory.mktemp("src")
    work = root / "images"
    for cls, base in CLASS_BASE.items():
        for drawer in (0, 1):
            folder = work / "pics" / cls / f"d{drawer}"
            folder.mkdir(parents=True)
            for k in range(5):
                size = (40, 20) if cls == "owl" else (12, 10)
                (folder / f"{k}.png").write_bytes(_png(base + 10 * drawer + k, size=size))
    (work / "pics" / "README.txt").write_text("not an image")
    for name, classes in (("letters.zip", ("alpha", "beta")), ("letters2.zip", ("beta", "gamma"))):
        with zipfile.ZipFile(work / name, "w") as zf:  # beta is in both archives, byte for byte
            for cls in classes:
                for k in range(6):
                    zf.writestr(f"letters/{cls}/{k}.png", _png(40 * k + ("alpha", "beta", "gamma").index(cls), mode="RGB"))
    rng = np.random.RandomState(0)
    buffer = io.BytesIO()
    np.savez(buffer, train_images=np.repeat(np.arange(30, dtype=np.uint8)[:, None, None], 8, 1).repeat(8, 2),
             train_labels=np.arange(30).reshape(-1, 1) % 3,
             test_images=np.full((9, 8, 8), 99, dtype=np.uint8), test_labels=np.arange(9).reshape(-1, 1) % 3)
    (work / "tiny.npz").write_bytes(buffer.getvalue())
    images = rng.randint(0, 255, (6, 4, 5), dtype=np.uint8)  # IDX: magic 0x0803 / 0x0801, big-endian sizes
    (work / "x-idx3-ubyte.gz").write_bytes(gzip.compress(b"\0\0\x08\x03" + b"".join(
        d.to_bytes(4, "big") for d in images.shape) + images.tobytes()))
    (work / "y-idx1-ubyte").write_bytes(b"\0\0\x08\x01" + (6).to_bytes(4, "big") + bytes([0, 1, 2, 0, 1, 2]))
    columns = rng.randint(0, 255, (4, 6), dtype=np.uint8)  # CSV rows hold 2x3 images column by column
    with zipfile.ZipFile(work / "pixels.zip", "w") as zf:
        zf.writestr("train x.csv", "\n".join(",".join(map(str, r)) for r in columns[:3]))
        zf.writestr("train y.csv", "1\n2\n1")
        zf.writestr("test x.csv", ",".join(map(str, columns[3])))
        zf.writestr("test y.csv", "2")
    for cls in ("cat", "dog"):
        (work / "scenes" / cls).mkdir(parents=True)
        for k in range(3):
            (work / "scenes" / cls / f"{cls}{k}.tif").write_bytes(_tiff(40 * k + (20 if cls == "dog" else 0)))
    labels_repo = root / "labels"
    labels_repo.mkdir()
    (labels_repo / "table.txt").write_text("IMAGE\\LABEL\tsea\tship\tsand\n" + "".join(
        f"{cls}{k}\t{int(cls == 'cat')}\t{int(k % 2 == 0)}\t1\n" for cls in ("cat", "dog") for k in range(3)))
    mirrors = root / "mirrors"
    mirrors.mkdir()
    commits = {}
    for repo, name in ((work, "images"), (labels_repo, "labels")):
        _git(repo, "init", "-q")
        _git(repo, "add", ".")
        _git(repo, "commit", "-q", "-m", "data")
        commits[name] = _git(repo, "rev-parse", "HEAD")
        subprocess.run(["git", "clone", "-q", "--bare", str(repo), str(mirrors / f"someone+{name}.git")], check=True)
    partial = root / "partial"  # the work repo's objects are loose: drop one image's, as a snapshot lacks large files
    shutil.copytree(work / ".git", partial / "someone+images" / ".git")
    sha = _git(work, "rev-parse", "HEAD:pics/dog/d1/3.png")
    (partial / "someone+images" / ".git" / "objects" / sha[:2] / sha[2:]).unlink()
    return SimpleNamespace(mirrors=mirrors, partial=partial, commit=commits["images"], labels_commit=commits["labels"],
                           csv_rows={tuple(r) for r in columns})


def _recipe(commit, layout, **extra):
    raw = {"name": "toy", "domain": "test", "license": "CC0 (test data)", "layout": layout,
           "source": {"repo": "github.com/someone/images", "commit": commit, "paths": "pics/"}}
    raw.update(extra)
    return parse_recipe(raw, "test")


def _build(snapshot, tmp_path, recipe, mirrors=None):
    mirrors = mirrors or snapshot.mirrors
    with GitTree(find_git_dir(recipe.repo, [mirrors]), recipe.commit) as tree:
        return build_dataset(recipe, tree, tmp_path,
                             open_tree=lambda repo, commit: GitTree(find_git_dir(repo, [mirrors]), commit))


def _pixels_by_label(folder):
    """{(class index, ...): sorted first-pixel values} of train + test, decoded as a solver reads them."""
    train, test, _ = load_corpus_npz(folder)
    found = {}
    for split in (train, test):
        for image, label in zip(split.images, split.labels):
            found.setdefault(tuple(np.flatnonzero(label)), []).append(int(np.asarray(image).reshape(-1)[0]))
    return {k: sorted(v) for k, v in found.items()}, train, test


def test_pattern_regex_names_parts_and_keeps_star_inside_a_folder():
    regex = pattern_regex("pics/{class}/*/*.png")
    assert regex.match("pics/cat/d1/0.png").group("class") == "cat"
    assert not regex.match("pics/cat/0.png")
    deep = pattern_regex("**/{class}/*.png")
    assert deep.match("a/b/cat/0.png").group("class") == "cat" and deep.match("cat/0.png").group("class") == "cat"
    assert pattern_regex("**::*/{class+}/*_{group}.png").match(
        "x.zip::small1/Greek/char01/0394_07.png").groupdict() == {"class": "Greek/char01", "group": "07"}
    with pytest.raises(UserInputError, match="lacks {class}"):
        pattern_regex("pics/*/*.png", needs=("class",))
    with pytest.raises(UserInputError, match="bad or repeated"):
        pattern_regex("pics/{class}/{class}.png")


def test_class_folders_keep_images_with_their_labels_and_drawers_whole(snapshot, tmp_path):
    recipe = _recipe(snapshot.commit, {"kind": "class_folders", "pattern": "pics/{class}/d{group}/*.png"},
                     split={"kind": "grouped", "test_fraction": 0.34, "seed": 1, "group_name": "drawer"})
    info = _build(snapshot, tmp_path, recipe)
    assert info["class_names"] == ["cat", "dog", "owl"] and info["n_total"] == 30
    assert info["image_shape"] == "variable" and info["image_size_max_wh"] == [40, 20]
    assert info["channels"] == 1 and info["storage"] == "encoded+offsets"
    assert info["recipe"]["layout"]["pattern"] == "pics/{class}/d{group}/*.png"  # every choice recorded
    values, _, test = _pixels_by_label(tmp_path / "toy")
    for index, cls in enumerate(info["class_names"]):  # after the shuffle each image keeps its own label
        assert values[(index,)] == [CLASS_BASE[cls] + 10 * d + k for d in (0, 1) for k in range(5)]
    drawers = {(int(np.asarray(image).reshape(-1)[0]) % 100) // 10 for image in test.images}
    assert len(test) == 15 and len(drawers) == 1  # one whole drawer of two held out, in every class


def test_groups_nested_in_classes_are_held_out_per_class(snapshot, tmp_path):
    recipe = _recipe(snapshot.commit, {"kind": "class_folders", "pattern": "pics/{class}/{group}/*.png",
                                       "group_per_class": True},
                     split={"kind": "grouped", "test_fraction": 0.2, "seed": 3})
    info = _build(snapshot, tmp_path, recipe)
    with np.load(tmp_path / "toy" / "data.npz") as z:
        test_counts = z["y"][z["is_test"]].sum(axis=0)
    assert test_counts.tolist() == [5, 5, 5]  # each class: one of its two tracks (never a class left untested)
    assert "in each class" in info["split"]


def test_zip_members_random_split_and_shrink(snapshot, tmp_path):
    recipe = _recipe(snapshot.commit, {"kind": "class_folders", "archives": ["letters.zip"],
                                       "pattern": "letters/{class}/*.png"},
                     split={"kind": "random", "test_fraction": 0.5, "seed": 0}, encode={"max_side": 6})
    info = _build(snapshot, tmp_path, recipe)
    assert info["n_train"] == 6 and info["n_test"] == 6 and info["class_counts"] == [6, 6]
    assert info["image_shape"] == [5, 6, 3] and "shrunk" in info["notes"]
    assert "stratified per class" in info["split"]


def test_two_archives_sharing_files_take_each_image_once(snapshot, tmp_path):
    layout = {"kind": "class_folders", "archives": ["letters.zip", "letters2.zip"], "pattern": "**::letters/{class}/*.png",
              "drop_duplicates": True}
    info = _build(snapshot, tmp_path, _recipe(snapshot.commit, layout, split={"kind": "random", "test_fraction": 0.5}))
    assert info["class_names"] == ["alpha", "beta", "gamma"] and info["class_counts"] == [6, 6, 6]
    assert "6 files identical to an earlier one dropped" in info["notes"]


def test_npz_arrays_source_split_and_subsample(snapshot, tmp_path):
    layout = {"kind": "npz_arrays", "class_names": ["a", "b", "c"],
              "files": {"tiny.npz": {"train": ["train_images", "train_labels"], "test": ["test_images", "test_labels"]}}}
    info = _build(snapshot, tmp_path, _recipe(snapshot.commit, layout, subsample={"max_images": 27, "seed": 3}))
    assert info["storage"] == "x" and info["image_shape"] == [8, 8, 1]
    assert info["n_total"] == 27 and info["class_counts"] == [9, 9, 9] and "subsampled" in info["notes"]
    with np.load(tmp_path / "toy" / "data.npz") as z:
        x, y, is_test = z["x"], z["y"], z["is_test"]
    assert x.shape == (27, 8, 8, 1) and (x[is_test] == 99).all()
    train_values = x[~is_test][:, 0, 0, 0]
    assert (np.argmax(y[~is_test], axis=1) == train_values % 3).all()  # train image v has label v % 3


def test_subsample_keeps_class_shares_and_the_limit():
    y = np.eye(3, dtype=np.uint8)[[0] * 10 + [1] * 10 + [2] * 10]
    assert len(subsample_rows(y, {"max_images": 20})) == 20
    skewed = np.eye(4, dtype=np.uint8)[[0] * 97 + [1, 2, 3]]
    kept = subsample_rows(skewed, {"max_images": 10, "seed": 1})
    assert len(kept) == 10 and skewed[kept].sum(axis=0).tolist() == [7, 1, 1, 1]
    with pytest.raises(UserInputError, match="below the number of classes"):
        subsample_rows(skewed, {"max_images": 3})


def test_idx_files_read_gzipped_and_plain_files(snapshot, tmp_path):
    layout = {"kind": "idx_files", "splits": {"all": ["x-idx3-ubyte.gz", "y-idx1-ubyte"]}}
    info = _build(snapshot, tmp_path, _recipe(snapshot.commit, layout, split={"kind": "random", "test_fraction": 0.34}))
    assert info["image_shape"] == [4, 5, 1] and info["class_counts"] == [2, 2, 2] and info["n_test"] == 3


def test_csv_pixels_transposes_and_shifts_labels(snapshot, tmp_path):
    layout = {"kind": "csv_pixels", "archive": "pixels.zip", "shape": [2, 3], "transpose": True, "label_offset": -1,
              "splits": {"train": ["train x.csv", "train y.csv"], "test": ["test x.csv", "test y.csv"]}}
    _build(snapshot, tmp_path, _recipe(snapshot.commit, layout))
    with np.load(tmp_path / "toy" / "data.npz") as z:
        x, y, is_test = z["x"], z["y"], z["is_test"]
    assert x.shape == (4, 2, 3, 1) and is_test.sum() == 1 and y[is_test].tolist() == [[0, 1]]
    assert {tuple(image.T.reshape(-1)) for image in x[..., 0]} == snapshot.csv_rows  # column by column: the rows


def test_label_table_from_another_repository_gives_multilabel_jpegs(snapshot, tmp_path):
    layout = {"kind": "label_table", "pattern": "scenes/{group}/{key}.tif",
              "table": {"repo": "github.com/someone/labels", "commit": snapshot.labels_commit, "path": "table.txt"}}
    info = _build(snapshot, tmp_path, _recipe(snapshot.commit, layout, split={"kind": "random", "test_fraction": 0.34},
                                              encode={"reencode": "jpeg"}))
    assert info["multilabel"] and info["class_names"] == ["sea", "ship", "sand"]
    assert info["class_counts"] == [3, 4, 6] and info["label_cardinality"] == round(13 / 6, 4)
    assert "re-encoded as JPEG" in info["notes"] and "not stratified" in info["split"]
    with np.load(tmp_path / "toy" / "data.npz") as z:
        encoded, offsets, y = z["encoded"], z["offsets"], z["y"]
    for i in range(len(y)):
        image = Image.open(io.BytesIO(encoded[offsets[i]:offsets[i + 1]].tobytes()))
        red = np.asarray(image)[0, 0, 0]
        near_cat = int(red) % 40 < 10 or int(red) % 40 > 30  # cat scenes: red 40k, dog scenes: 40k + 20
        assert image.format == "JPEG" and y[i, 0] == near_cat  # each cat scene is "sea" in the table


def test_a_file_absent_from_a_partial_snapshot_is_an_error(snapshot, tmp_path):
    recipe = _recipe(snapshot.commit, {"kind": "class_folders", "pattern": "pics/{class}/*/*.png"},
                     split={"kind": "random"})
    with pytest.raises(UserInputError, match="absent from the snapshot.*dog/d1/3.png"):
        _build(snapshot, tmp_path, recipe, mirrors=snapshot.partial)


def test_grayscale_encoding_makes_every_mode_one_channel():
    """A source whose file mode follows the class (RGB scans of one class, L of the others) must not
    hand the label to the solver: with `grayscale` every image comes out L, whatever it went in as."""
    def saved(mode, fmt):
        out = io.BytesIO()
        Image.new(mode, (5, 4), 90 if mode == "L" else (90, 90, 90)).save(out, format=fmt)
        return out.getvalue()

    for mode, fmt in (("RGB", "JPEG"), ("L", "JPEG"), ("RGB", "PNG"), ("L", "PNG")):
        image, resized, made_jpeg = encode_image(saved(mode, fmt), {"grayscale": True})
        with Image.open(io.BytesIO(image)) as pil:
            assert (pil.mode, pil.format, pil.size) == ("L", fmt, (5, 4))
        assert not resized and not made_jpeg  # re-encoded, yet counted as neither
    rgb = saved("RGB", "PNG")
    assert encode_image(rgb, {}) == (rgb, False, False)  # without it, bytes are kept as they are
    with pytest.raises(UserInputError, match="grayscale"):
        parse_recipe({"name": "x", "domain": "d", "source": {"repo": "github.com/a/b", "commit": "0" * 40},
                      "license": "l", "layout": {"kind": "class_folders", "pattern": "{class}/*.png"},
                      "encode": {"grayscale": "yes"}}, "x.json")


def test_recipe_and_layout_mistakes_are_named(snapshot, tmp_path):
    with pytest.raises(UserInputError, match="full 40-hex"):
        _recipe("abc", {"kind": "class_folders", "pattern": "pics/{class}/*.png"})
    with pytest.raises(UserInputError, match="may have"):
        _recipe(snapshot.commit, {"kind": "class_folders", "pattern": "pics/{class}/*.png", "patern": "x"})
    with pytest.raises(UserInputError, match="split needs kind"):
        _recipe(snapshot.commit, {"kind": "idx_files", "splits": {}}, split={"kind": "random", "test_fraction": 2})
    missing_key = {"kind": "npz_arrays", "files": {"tiny.npz": {"train": ["nope", "train_labels"]}}}
    with pytest.raises(UserInputError, match="no array 'nope'"):
        _build(snapshot, tmp_path, _recipe(snapshot.commit, missing_key))
    not_a_zip = {"kind": "class_folders", "archives": ["x-idx3-ubyte.gz"], "pattern": "{class}/*.png"}
    with pytest.raises(UserInputError, match="is not a zip file"):
        _build(snapshot, tmp_path, _recipe(snapshot.commit, not_a_zip))
    unmapped = {"kind": "npz_arrays", "files": {"tiny.npz": {"train": ["train_images", "train_labels"],
                                                             "val": ["test_images", "test_labels"]}}}
    with pytest.raises(UserInputError, match="gives val"):
        _build(snapshot, tmp_path, _recipe(snapshot.commit, unmapped))


def test_cli_builds_each_recipe_and_reports_failures(snapshot, tmp_path, monkeypatch, capsys):
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    source = {"repo": "github.com/someone/images", "commit": snapshot.commit, "original": "toy"}
    good = {"name": "good", "domain": "test", "license": "CC0", "source": source,
            "layout": {"kind": "class_folders", "pattern": "pics/{class}/*/*.png"}, "split": {"kind": "random"}}
    bad = {**good, "name": "bad", "layout": {"kind": "class_folders", "pattern": "nothing/{class}/*.png"}}
    for raw in (good, bad):
        (recipes / f"{raw['name']}.json").write_text(json.dumps(raw))
    monkeypatch.setattr("tools.corpus.recipes.RECIPES_DIR", recipes)
    out = tmp_path / "out"
    assert tools_main(["corpus", "build", "--mirrors", str(snapshot.mirrors), "--out", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "bad: FAILED: no image file matches" in printed and "good: 24 train / 6 test" in printed
    assert (out / "good" / "data.npz").is_file() and not (out / "bad").exists()
    assert tools_main(["corpus", "build", "good", "--mirrors", str(snapshot.mirrors), "--out", str(out)]) == 0
    assert "exists, skipped" in capsys.readouterr().out
    assert tools_main(["corpus", "build", "nope", "--mirrors", str(snapshot.mirrors)]) == 2
    assert "no recipe named nope" in capsys.readouterr().err
    assert tools_main(["corpus", "build", "--mirrors", str(tmp_path / "absent")]) == 2
    assert "mirror folder(s) not found" in capsys.readouterr().err
    assert tools_main(["corpus", "list", "--repos"]) == 0
    assert capsys.readouterr().out.split() == ["someone/images"]
    assert tools_main(["corpus", "list", "--markdown", "--built", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| good | test | 24 / 6 | 3 | variable, W 12-40, H 10-20 | no |" in table and "| bad | test | (not built)" in table
    with pytest.raises(UserInputError, match="no git snapshot of someone/other"):
        find_git_dir("github.com/someone/other", [snapshot.mirrors])


def test_shipped_recipes_are_complete():
    recipes = load_recipes()
    assert len(recipes) >= 12
    for recipe in recipes.values():  # parse_recipe checked each layout's parameters and split
        assert recipe.license and recipe.source.get("original") and recipe.source.get("paths"), recipe.name
        assert recipe.layout["kind"] in LAYOUTS, recipe.name
        if "pattern" in recipe.layout:
            pattern_regex(recipe.layout["pattern"])
