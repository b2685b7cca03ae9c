"""The kit cases of the fault suite: which dataset, which budget, which load, which memory cap.

A dataset is built once per suite run (by key) and shared by the cases that use it; the real one
(cifar10, the largest dev set) comes converted from the corpus. Sizes are kept small where the
case is about shape, not volume, so that the whole suite runs in about half an hour on 2 cores.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from tools.faults.synth import class_patterns, jpeg_bytes, one_hot, pattern_image, to_uint8, write_dense_dataset

CATEGORIES = ("sizes", "values", "labels", "budgets", "load")
# Peak memory allowed beyond the solver's data cap: TensorFlow, torch, the kit and the network.
FRAMEWORK_ALLOWANCE_GB = 3.0
DEFAULT_MEMORY_CAP_GB = 4.0  # PipelineConfig.memory_cap_gb


@dataclass(frozen=True)
class KitCase:
    name: str
    category: str
    dataset: str  # key in DATASETS (or "cifar10", the converted corpus set)
    time_budget: float
    what: str
    tf_mode: str = "graph"
    neighbours: int = 0  # CPU-bound processes running beside the kit (the kit's clock keeps running)
    pipeline: dict = field(default_factory=dict)  # forced through AUTODL_PIPELINE_JSON when not empty

    @property
    def memory_cap_gb(self) -> float:
        return float(self.pipeline.get("memory_cap_gb", DEFAULT_MEMORY_CAP_GB))


# ------------------------------------------------------------------ dataset builders
def _compressed(out_dir: Path, name: str, n_classes: int, train_labels, test_labels, size=(32, 32), channels=3,
                seed: int = 0, multilabel_rows=None, image_fn=None) -> Path:
    """A PNG/JPEG dataset through `write_autodl_dataset` (the path `tools convert` takes)."""
    from autodl_data.autodl_format import write_autodl_dataset

    rng = np.random.default_rng(seed)
    patterns = class_patterns(n_classes, channels, seed)

    def items(labels, rows):
        for i, label in enumerate(labels):
            if image_fn is not None:
                image = image_fn(i, label, rng, patterns)
            else:
                image = to_uint8(pattern_image(patterns[label], size[0], size[1], rng))
            row = rows[i] if rows is not None else one_hot([label], n_classes)[0]
            yield image, row

    train_rows = test_rows = None
    if multilabel_rows is not None:
        train_rows, test_rows = multilabel_rows
    write_autodl_dataset(out_dir, name, items(train_labels, train_rows), items(test_labels, test_rows), n_classes,
                         overwrite=True)
    return out_dir / name


def _dense(out_dir: Path, name: str, n_classes: int, n_train: int, n_test: int, channels: int, low: float,
           high: float, size=(24, 24), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    patterns = class_patterns(n_classes, channels, seed)
    y_train, y_test = rng.integers(0, n_classes, n_train), rng.integers(0, n_classes, n_test)

    def images(labels):
        unit = np.stack([pattern_image(patterns[c], size[0], size[1], rng) for c in labels])
        return low + (high - low) * unit

    return write_dense_dataset(out_dir, name, images(y_train), one_hot(y_train, n_classes), images(y_test),
                               one_hot(y_test, n_classes))


def _balanced(n_classes: int, per_class: int) -> np.ndarray:
    return np.tile(np.arange(n_classes), per_class)


def build_one_example_classes(out: Path, name: str) -> Path:
    """Ten classes; five of them have a single training example."""
    train = np.concatenate([_balanced(5, 40), np.arange(5, 10)])
    return _compressed(out, name, 10, train, _balanced(10, 10))


def build_absent_classes(out: Path, name: str) -> Path:
    """Ten classes declared; the training set holds six of them, the test set all ten."""
    return _compressed(out, name, 10, _balanced(6, 30), _balanced(10, 10))


def build_classes_1200(out: Path, name: str) -> Path:
    """1,200 classes, two training examples and one test example each."""
    return _compressed(out, name, 1200, _balanced(1200, 2), _balanced(1200, 1), size=(24, 24))


def build_test_10x_train(out: Path, name: str) -> Path:
    """A test set ten times the training set."""
    return _compressed(out, name, 5, _balanced(5, 16), _balanced(5, 160))


def build_photos_96px(out: Path, name: str) -> Path:
    """600 training and 200 test colour JPEGs of 96 px: enough images for full fine-tuning to run
    several slices in a short budget, large enough for the any-time steps to look at 224 px and more."""
    return _compressed(out, name, 6, _balanced(6, 100), _balanced(6, 34)[:200], size=(96, 96),
                       image_fn=_sized_jpeg([(96, 96)]))


def _sized_jpeg(sizes):
    def image_fn(i, label, rng, patterns):
        h, w = sizes[i % len(sizes)]
        return jpeg_bytes(pattern_image(patterns[label], h, w, rng, noise=0.05))
    return image_fn


def build_sizes_8_to_2000(out: Path, name: str) -> Path:
    """Images from 8 px to 2,000 px (log-spaced sides, varied aspect) in one dataset."""
    rng = np.random.default_rng(1)
    sides = np.round(np.exp(rng.uniform(np.log(8), np.log(2000), (45, 2)))).astype(int)
    sides[0], sides[1] = (8, 8), (2000, 2000)
    return _compressed(out, name, 3, _balanced(3, 10), _balanced(3, 5), image_fn=_sized_jpeg([tuple(s) for s in sides]))


def build_wide_and_tall(out: Path, name: str) -> Path:
    """Very wide (16 x 1,200) and very tall (1,200 x 16) images mixed."""
    return _compressed(out, name, 4, _balanced(4, 15), _balanced(4, 5),
                       image_fn=_sized_jpeg([(16, 1200), (1200, 16)]))


def build_large_2000px(out: Path, name: str) -> Path:
    """Photos-sized images: 1,800-2,000 px sides, 60 training and 30 test images (JPEG)."""
    rng = np.random.default_rng(2)
    sides = [tuple(s) for s in rng.integers(1800, 2001, (90, 2))]
    return _compressed(out, name, 3, _balanced(3, 20), _balanced(3, 10), image_fn=_sized_jpeg(sides))


def build_channels_1(out: Path, name: str) -> Path:
    return _compressed(out, name, 5, _balanced(5, 40), _balanced(5, 20), size=(28, 28), channels=1)


def build_channels_3(out: Path, name: str) -> Path:
    return _compressed(out, name, 5, _balanced(5, 40), _balanced(5, 20))


def build_channels_2_dense(out: Path, name: str) -> Path:
    return _dense(out, name, 5, 200, 100, channels=2, low=0.0, high=1.0)


def build_channels_4_dense(out: Path, name: str) -> Path:
    return _dense(out, name, 5, 200, 100, channels=4, low=0.0, high=1.0)


def build_values_beyond_255(out: Path, name: str) -> Path:
    """Float pixels from -300 to 700 (negative and above 255)."""
    return _dense(out, name, 5, 200, 100, channels=3, low=-300.0, high=700.0)


def build_tiny_float_values(out: Path, name: str) -> Path:
    """Float pixels in [0, 0.001]: the whole range is a thousandth of the usual one."""
    return _dense(out, name, 5, 200, 100, channels=3, low=0.0, high=1e-3)


def build_grey_in_colour(out: Path, name: str) -> Path:
    """A colour dataset where every third image is grey (one channel in its file)."""
    def image_fn(i, label, rng, patterns):
        image = to_uint8(pattern_image(patterns[label], 32, 32, rng))
        return image.mean(axis=2).astype(np.uint8) if i % 3 == 0 else image
    return _compressed(out, name, 5, _balanced(5, 40), _balanced(5, 20), image_fn=image_fn)


def build_constant_images(out: Path, name: str) -> Path:
    """Every image is one flat grey (nothing to learn, no variance to normalise by)."""
    def image_fn(i, label, rng, patterns):
        return np.full((32, 32, 3), 128, np.uint8)
    return _compressed(out, name, 4, _balanced(4, 40), _balanced(4, 20), image_fn=image_fn)


def _multilabel(out: Path, name: str, n_labels: int, rows_fn, test_rows_fn=None) -> Path:
    rng = np.random.default_rng(3)
    train_rows, test_rows = rows_fn(rng, 240), (test_rows_fn or rows_fn)(rng, 120)
    first = lambda rows: np.array([int(np.argmax(r)) for r in rows])  # the pattern follows the first positive
    return _compressed(out, name, n_labels, first(train_rows), first(test_rows),
                       multilabel_rows=(train_rows, test_rows))


def build_multilabel_empty_rows(out: Path, name: str) -> Path:
    """Six labels, multi-label rows; 30% of the rows have no positive label at all."""
    def rows(rng, n):
        r = (rng.random((n, 6)) < 0.35).astype(np.uint8)
        r[rng.random(n) < 0.3] = 0
        return r
    return _multilabel(out, name, 6, rows)


# The two degenerate label cases below keep their test labels scorable: the kit's scoring program
# crashes on a solution whose every label column is constant (`reduce() of empty iterable` in
# libscores), and the kit's runner then stops the ingestion, so no run could be judged.
def build_labels_all_ones(out: Path, name: str) -> Path:
    """Four labels; every training example carries all of them (test rows: random)."""
    return _multilabel(out, name, 4, lambda rng, n: np.ones((n, 4), np.uint8),
                       lambda rng, n: (rng.random((n, 4)) < 0.5).astype(np.uint8))


def build_one_class(out: Path, name: str) -> Path:
    """Three classes declared; every training example in the first one (the test set holds all three)."""
    return _compressed(out, name, 3, np.zeros(150, int), _balanced(3, 20))


DATASETS: dict[str, Callable[[Path, str], Path]] = {
    "one_example_classes": build_one_example_classes,
    "absent_classes": build_absent_classes,
    "classes_1200": build_classes_1200,
    "test_10x_train": build_test_10x_train,
    "sizes_8_to_2000": build_sizes_8_to_2000,
    "wide_and_tall": build_wide_and_tall,
    "large_2000px": build_large_2000px,
    "channels_1": build_channels_1,
    "channels_2_dense": build_channels_2_dense,
    "channels_3": build_channels_3,
    "channels_4_dense": build_channels_4_dense,
    "values_beyond_255": build_values_beyond_255,
    "tiny_float_values": build_tiny_float_values,
    "grey_in_colour": build_grey_in_colour,
    "constant_images": build_constant_images,
    "multilabel_empty_rows": build_multilabel_empty_rows,
    "labels_all_ones": build_labels_all_ones,
    "one_class": build_one_class,
    "photos_96px": build_photos_96px,
}
REAL_DATASETS = ("cifar10",)  # converted from the corpus by the suite (tools convert)


def _case(name, category, dataset, t, what, **kw) -> KitCase:
    return KitCase(name, category, dataset, float(t), what, **kw)


CASES: list[KitCase] = [
    _case("one_example_classes", "sizes", "one_example_classes", 20, "5 of 10 classes with 1 training example"),
    _case("absent_classes", "sizes", "absent_classes", 20, "4 of 10 classes absent from training"),
    _case("classes_1200", "sizes", "classes_1200", 30, "1,200 classes, 2 examples each"),
    _case("test_10x_train", "sizes", "test_10x_train", 20, "800 test vs 80 training examples"),
    _case("sizes_8_to_2000", "sizes", "sizes_8_to_2000", 30, "8 px to 2,000 px images in one set"),
    _case("wide_and_tall", "sizes", "wide_and_tall", 20, "16 x 1,200 and 1,200 x 16 images"),
    _case("channels_1", "values", "channels_1", 15, "1 channel (PNG)"),
    _case("channels_2_dense", "values", "channels_2_dense", 15, "2 channels (dense floats)"),
    _case("channels_3", "values", "channels_3", 15, "3 channels (PNG)"),
    _case("channels_3_eager", "values", "channels_3", 15, "3 channels, TF2 eager datasets", tf_mode="eager"),
    _case("channels_4_dense", "values", "channels_4_dense", 15, "4 channels (dense floats)"),
    _case("grey_in_colour", "values", "grey_in_colour", 15, "grey files in a colour set"),
    _case("constant_images", "values", "constant_images", 15, "every image one flat grey"),
    _case("values_beyond_255", "values", "values_beyond_255", 15, "float pixels from -300 to 700"),
    _case("tiny_float_values", "values", "tiny_float_values", 15, "float pixels in [0, 0.001]"),
    _case("multilabel_empty_rows", "labels", "multilabel_empty_rows", 15, "30% of rows without a positive"),
    _case("multilabel_empty_rows_eager", "labels", "multilabel_empty_rows", 15, "the same, eager datasets",
          tf_mode="eager"),
    _case("one_class", "labels", "one_class", 15, "every training example in one class"),
    _case("labels_all_ones", "labels", "labels_all_ones", 15, "every label of every training row is 1"),
    *[_case(f"cifar10_T{t}", "budgets", "cifar10", t, f"cifar10 (60k images) at T = {t} s") for t in (5, 10, 20, 30)],
    _case("cifar10_T10_eager", "budgets", "cifar10", 10, "cifar10 at T = 10 s, eager datasets", tf_mode="eager"),
    *[_case(f"large_2000px_T{t}", "budgets", "large_2000px", t, f"1,800-2,000 px images at T = {t} s")
      for t in (5, 10, 20, 30)],
    _case("below_safety_margin", "budgets", "channels_3", 2,
          "T = 2 s: less than the solver's 3 s safety margin on the first call"),
    _case("neighbour_1_core", "load", "cifar10", 30, "a CPU-bound neighbour on one core", neighbours=1),
    _case("neighbour_2_cores", "load", "cifar10", 30, "CPU-bound neighbours on both cores", neighbours=2),
    _case("neighbour_2_cores_2000px", "load", "large_2000px", 20, "2,000 px images, neighbours on both cores",
          neighbours=2),
    # Full fine-tuning (the whole network on augmented images: the GPU default, a CPU step on small sets)
    # under load: it once ended a call 46 s past its deadline beside one CPU-bound neighbour.
    _case("neighbour_1_core_full_ft", "load", "photos_96px", 45, "full fine-tuning, a neighbour on one core",
          neighbours=1, pipeline={"strategy": "finetune"}),
    _case("neighbour_2_cores_full_ft", "load", "photos_96px", 45, "full fine-tuning, neighbours on both cores",
          neighbours=2, pipeline={"strategy": "finetune"}),
    _case("neighbour_1_core_steps", "load", "photos_96px", 45, "the any-time steps, a neighbour on one core",
          neighbours=1),
    _case("memory_cap_below_data", "load", "cifar10", 20,
          "memory cap 0.05 GB; cifar10 is 0.18 GB at its storage size", pipeline={"memory_cap_gb": 0.05}),
]
