"""Hostile files for the `tools` commands, and what their errors must say.

Each case writes a bad input into its own folder and names the command to run on it. The promise
for every case: exit status non-zero, an error message that names the file and the problem (a
word from `expect`), no traceback, and nothing half-written where the command writes.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from tools.faults.synth import class_patterns, jpeg_bytes, pattern_image, to_uint8


@dataclass(frozen=True)
class Invocation:
    argv: list[str]  # arguments of `python -m tools`
    names: str  # the file or folder the error must name (its file name is enough)
    expect: tuple[str, ...]  # the error names the problem with one of these words (case-insensitive)
    output: Path  # where the command writes: must not exist afterwards
    env: dict | None = None


@dataclass(frozen=True)
class ToolCase:
    name: str
    what: str
    build: Callable[[Path, Path], Invocation]  # (case folder, repo root) -> what to run


def _png_folder(root: Path, n_per_class: int = 4) -> Path:
    """An image-folder dataset (class sub-folders of PNGs) that `tools convert` reads."""
    from PIL import Image

    rng = np.random.default_rng(0)
    patterns = class_patterns(2, 3, 0)
    for label in range(2):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            Image.fromarray(to_uint8(pattern_image(patterns[label], 16, 16, rng))).save(folder / f"{i}.png")
    return root


def build_truncated_tfrecord(case_dir: Path, repo: Path) -> Invocation:
    from tools.faults.kit_cases import build_channels_3

    dataset = build_channels_3(case_dir, "truncated")
    record = next((dataset / "truncated.data" / "train").glob("*.tfrecord"))
    data = record.read_bytes()
    record.write_bytes(data[: len(data) // 2])
    out = case_dir / "run_out"
    return Invocation(["run", "--code-dir", str(repo), "--dataset-dir", str(dataset), "--time-budget", "10",
                       "--out", str(out), "--no-progress"], record.name, ("truncated", "corrupt"), out)


def build_corrupt_png(case_dir: Path, repo: Path) -> Invocation:
    source = _png_folder(case_dir / "images")
    bad = source / "class_1" / "2.png"
    bad.write_bytes(bad.read_bytes()[:40])  # the header survives, the pixel data does not
    return Invocation(["convert", str(source), "--out", str(case_dir / "out"), "--name", "bad_png", "-q"],
                      bad.name, ("decode", "truncated", "corrupt"), case_dir / "out" / "bad_png")


def build_corrupt_jpeg(case_dir: Path, repo: Path) -> Invocation:
    source = _png_folder(case_dir / "images")
    bad = source / "class_0" / "broken.jpg"
    data = bytearray(jpeg_bytes(np.random.default_rng(0).random((64, 64, 3)).astype(np.float32)))
    data[200:] = b"\x00" * (len(data) - 200)  # header kept, entropy-coded data zeroed
    bad.write_bytes(bytes(data[: len(data) // 2]))
    return Invocation(["convert", str(source), "--out", str(case_dir / "out"), "--name", "bad_jpeg", "-q"],
                      bad.name, ("decode", "truncated", "corrupt"), case_dir / "out" / "bad_jpeg")


def build_npz_mismatched_lengths(case_dir: Path, repo: Path) -> Invocation:
    path = case_dir / "mismatched.npz"
    np.savez(path, x=np.zeros((10, 8, 8), np.uint8), y=np.zeros(9, np.int64))
    return Invocation(["convert", str(path), "--out", str(case_dir / "out"), "--name", "mismatched", "-q"],
                      path.name, ("length", "examples", "rows"), case_dir / "out" / "mismatched")


def build_corpus_npz_mismatched_for_run_npz(case_dir: Path, repo: Path) -> Invocation:
    folder = case_dir / "corpus_set"
    folder.mkdir(parents=True)
    np.savez(folder / "data.npz", x=np.zeros((10, 8, 8), np.uint8), y=np.eye(2, dtype=np.uint8)[np.arange(9) % 2],
             is_test=np.arange(10) >= 7)
    (folder / "info.json").write_text('{"name": "corpus_set", "n_classes": 2}')
    out = case_dir / "run_out"
    return Invocation(["run-npz", "--code-dir", str(repo), "--dataset-dir", str(folder), "--time-budget", "10",
                       "--out", str(out), "--no-progress"], "data.npz", ("length", "examples", "rows"), out)


def build_pickled_npz(case_dir: Path, repo: Path) -> Invocation:
    path = case_dir / "pickled.npz"
    objects = np.empty(3, dtype=object)
    objects[:] = [np.zeros((8, 8), np.uint8), "not an image", {"x": 1}]
    np.savez(path, x=objects, y=np.zeros(3, np.int64))
    return Invocation(["convert", str(path), "--out", str(case_dir / "out"), "--name", "pickled", "-q"],
                      path.name, ("pickle", "object"), case_dir / "out" / "pickled")


def build_pickled_corpus_for_run_npz(case_dir: Path, repo: Path) -> Invocation:
    folder = case_dir / "corpus_set"
    folder.mkdir(parents=True)
    objects = np.empty(4, dtype=object)
    objects[:] = [np.zeros((8, 8), np.uint8)] * 4
    np.savez(folder / "data.npz", x=objects, y=np.eye(2, dtype=np.uint8)[np.arange(4) % 2],
             is_test=np.arange(4) >= 2)
    (folder / "info.json").write_text('{"name": "corpus_set", "n_classes": 2}')
    out = case_dir / "run_out"
    return Invocation(["run-npz", "--code-dir", str(repo), "--dataset-dir", str(folder), "--time-budget", "10",
                       "--out", str(out), "--no-progress"], "data.npz", ("pickle", "object"), out)


def build_unreadable_folder(case_dir: Path, repo: Path) -> Invocation:
    """A class folder that cannot be listed: mode 000, or (as root, who reads anything) a symlink loop."""
    source = _png_folder(case_dir / "images")
    bad = source / "class_2"
    if os.geteuid() == 0:
        bad.symlink_to(bad.name)  # points at itself: listing it fails with "Too many levels of symbolic links"
    else:
        bad.mkdir()
        bad.chmod(0)
    return Invocation(["convert", str(source), "--out", str(case_dir / "out"), "--name", "unreadable", "-q"],
                      bad.name, ("permission", "cannot read", "symbolic links", "unreadable", "cannot list"),
                      case_dir / "out" / "unreadable")


def _package_with_weights(case_dir: Path, repo: Path, write) -> Invocation:
    from autodl_core.config import PipelineConfig

    weights = case_dir / "weights"
    weights.mkdir()
    path = write(weights, PipelineConfig().backbone)
    out = case_dir / "submission.zip"
    return Invocation(["package", "--out", str(out), "--no-vendor"], path.name,
                      ("tensor", "weights only", "weights_only", "unsafe", "not a state dict", "header"),
                      out, env={"AUTODL_WEIGHTS_DIR": str(weights)})


def build_weights_not_tensors(case_dir: Path, repo: Path) -> Invocation:
    import torch

    def write(folder: Path, backbone: str) -> Path:
        path = folder / f"{backbone}.pt"
        torch.save({"state_dict": {"conv_stem.weight": "not a tensor"}, "metadata": {}}, path)
        return path
    return _package_with_weights(case_dir, repo, write)


def build_weights_pickled_object(case_dir: Path, repo: Path) -> Invocation:
    def write(folder: Path, backbone: str) -> Path:
        path = folder / f"{backbone}.pt"
        with open(path, "wb") as f:  # a pickle that would import and call os.system if unpickled freely
            pickle.dump(_Exploit(), f)
        return path
    return _package_with_weights(case_dir, repo, write)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


CASES: list[ToolCase] = [
    ToolCase("truncated_tfrecord", "`tools run` on a dataset whose train TFRecord is cut in half",
             build_truncated_tfrecord),
    ToolCase("corrupt_png", "`tools convert` on an image folder with a truncated PNG", build_corrupt_png),
    ToolCase("corrupt_jpeg", "`tools convert` on an image folder with a corrupt JPEG", build_corrupt_jpeg),
    ToolCase("npz_mismatched_lengths", "`tools convert` on an npz with 10 images and 9 labels",
             build_npz_mismatched_lengths),
    ToolCase("corpus_npz_mismatched", "`tools run-npz` on a corpus data.npz with 10 images and 9 labels",
             build_corpus_npz_mismatched_for_run_npz),
    ToolCase("unreadable_folder", "`tools convert` on an image folder with a class folder that cannot be listed",
             build_unreadable_folder),
    ToolCase("pickled_npz", "`tools convert` on an npz holding pickled objects", build_pickled_npz),
    ToolCase("pickled_corpus_npz", "`tools run-npz` on a corpus data.npz holding pickled objects",
             build_pickled_corpus_for_run_npz),
    ToolCase("weights_not_tensors", "`tools package` with a weight file whose state dict holds a string",
             build_weights_not_tensors),
    ToolCase("weights_pickled_object", "`tools package` with a weight file that is a pickled callable",
             build_weights_pickled_object),
]
