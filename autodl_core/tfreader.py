"""Read the kit's tf.data datasets into uint8 arrays at a fixed storage shape, in time-bounded chunks.

Works in both TensorFlow modes the kit can hand us: TF1 graph mode (the challenge:
one-shot iterator + Session on ingestion's default graph, built once and reused
across calls) and TF2 eager mode. Resizing and the uint8 cast happen inside the
TF pipeline so the cache never holds full-size float images.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np


def _tf():
    import tensorflow as tf  # imported lazily: the kit has imported it before model.py anyway

    return tf


def _resize(image, size):
    """Antialiased bilinear resize; the TF2 op also under the kit's TF1 alias (whose v1 resize lacks antialias)."""
    tf = _tf()
    v2 = getattr(tf.compat, "v2", tf)
    return v2.image.resize(image, size, method="bilinear", antialias=True)


def count_examples(dataset, batch_size: int = 256) -> int:
    """Number of examples in a dataset, by iterating it (fallback when nothing else says)."""
    it = _BatchIterator(dataset.map(lambda x, y: y).batch(batch_size))
    n = 0
    while True:
        item = it.next()
        if item is None:
            return n
        n += len(item)


def declared_test_count(metadata) -> int | None:
    """sample_count of the test split next to the train split the metadata describes (kit layout)."""
    import re

    try:
        train_dir = metadata.get_dataset_name()
        path = os.path.join(os.path.dirname(os.path.abspath(train_dir)), "test", "metadata.textproto")
        with open(path) as f:
            match = re.search(r"sample_count\s*:\s*(\d+)", f.read())
        return int(match.group(1)) if match else None
    except Exception:
        return None


def is_graph_mode() -> bool:
    return not _tf().executing_eagerly()


@dataclass
class PeekResult:
    """What a few raw examples say about the data: sizes, channels and value range."""

    heights: list[int]
    widths: list[int]
    channels: int
    frames: int
    value_min: float
    value_max: float
    labels: np.ndarray

    @property
    def median_hw(self) -> tuple[int, int]:
        return int(np.median(self.heights)), int(np.median(self.widths))


class _Session:
    """One Session on ingestion's default graph, shared by every iterator of this process."""

    _session = None

    @classmethod
    def get(cls):
        if cls._session is None:
            tf = _tf()
            n = os.cpu_count() or 2
            config = tf.compat.v1.ConfigProto(
                intra_op_parallelism_threads=n, inter_op_parallelism_threads=n
            )
            cls._session = tf.compat.v1.Session(
                graph=tf.compat.v1.get_default_graph(), config=config
            )
        return cls._session

    @classmethod
    def close(cls):
        if cls._session is not None:
            cls._session.close()
            cls._session = None


def close_session() -> None:
    _Session.close()


class _BatchIterator:
    """Next-batch over a tf.data dataset in either TF mode; `None` when exhausted."""

    def __init__(self, dataset):
        tf = _tf()
        self.graph_mode = not tf.executing_eagerly()
        if self.graph_mode:
            iterator = tf.compat.v1.data.make_one_shot_iterator(dataset)
            self._next_op = iterator.get_next()
            self._session = _Session.get()
        else:
            self._iterator = iter(dataset)
        self.exhausted = False

    def next(self):
        if self.exhausted:
            return None
        tf = _tf()
        try:
            if self.graph_mode:
                return self._session.run(self._next_op)
            item = next(self._iterator)
            if isinstance(item, (tuple, list)):
                return tuple(t.numpy() for t in item)
            return item.numpy()
        except (StopIteration, tf.errors.OutOfRangeError):
            self.exhausted = True
            return None


PEEK_MIN_EXAMPLES = 4  # looked at even past the peek's deadline


def peek(dataset, n: int = 48, deadline: float | None = None) -> PeekResult:
    """Look at the first n raw examples (no resizing) to learn sizes, channels and value range; past the
    deadline (time.monotonic()) stop after PEEK_MIN_EXAMPLES (decoding 48 photos of 2,000 px took 3.7 s)."""
    it = _BatchIterator(dataset.take(n))
    heights, widths, labels = [], [], []
    vmin, vmax, channels, frames = np.inf, -np.inf, 1, 1
    while True:
        if deadline is not None and len(heights) >= PEEK_MIN_EXAMPLES and time.monotonic() > deadline:
            break
        item = it.next()
        if item is None:
            break
        example, label = item
        example = np.asarray(example)
        if example.ndim == 3:  # (H, W, C) without the frame axis
            example = example[None]
        frames, h, w, channels = example.shape[0], example.shape[1], example.shape[2], example.shape[3]
        heights.append(h)
        widths.append(w)
        labels.append(np.asarray(label, dtype=np.float32))
        vmin = min(vmin, float(example.min()))
        vmax = max(vmax, float(example.max()))
    if not heights:
        raise ValueError("the dataset yielded no example")
    return PeekResult(heights, widths, int(channels), int(frames), vmin, vmax, np.stack(labels))


def value_transform(vmin: float, vmax: float) -> tuple[float, float]:
    """(offset, scale) mapping raw example values to 0..255 for uint8 storage.

    The kit decodes images to [0, 1]; dense data may come in any range. Values already
    in [0, 1] keep their integer grey levels exactly (0..16 data stays 0..16).
    """
    if vmin >= -1e-6 and vmax <= 1.0 + 1e-6:
        return 0.0, 255.0
    if vmin >= -1e-6 and vmax <= 255.0 + 1e-6:
        return 0.0, 1.0
    span = max(vmax - vmin, 1e-12)
    return -vmin, 255.0 / span


class ChunkReader:
    """Reads a dataset once, in order, as uint8 (N, H, W, C) at `storage_hw`, in bounded chunks."""

    def __init__(self, dataset, storage_hw: tuple[int, int], offset: float = 0.0, scale: float = 255.0,
                 batch_size: int = 64):
        tf = _tf()
        height, width = int(storage_hw[0]), int(storage_hw[1])
        offset, scale = float(offset), float(scale)

        def prepare(example, labels):
            image = example[0] if len(example.shape) == 4 else example  # first frame
            image = tf.cast(image, tf.float32)
            image = _resize(image, (height, width))
            image = tf.clip_by_value((image + offset) * scale, 0.0, 255.0)
            return tf.cast(tf.round(image), tf.uint8), tf.cast(labels, tf.float32)

        autotune = tf.data.experimental.AUTOTUNE
        pipeline = dataset.map(prepare, num_parallel_calls=autotune).batch(batch_size).prefetch(2)
        self._it = _BatchIterator(pipeline)
        self.n_read = 0

    @property
    def exhausted(self) -> bool:
        return self._it.exhausted

    def read(self, max_examples: int | None = None, deadline: float | None = None):
        """Read until max_examples, the deadline (time.monotonic()) or the end; returns (x, y) or None."""
        xs, ys, n = [], [], 0
        while not self._it.exhausted:
            if max_examples is not None and n >= max_examples:
                break
            if deadline is not None and n > 0 and time.monotonic() >= deadline:
                break
            item = self._it.next()
            if item is None:
                break
            x, y = item
            xs.append(x)
            ys.append(y)
            n += len(x)
        if not xs:
            return None
        self.n_read += n
        return np.concatenate(xs), np.concatenate(ys)
