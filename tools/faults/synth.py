"""Synthetic image data for the fault suite, and the AutoDL writer for dense float tensors.

Images are class patterns (a coarse random grid per class, upsampled, plus noise), so that a
solver can learn something and a broken one shows; sizes, channels, value ranges and label
layouts are whatever a case asks for. Compressed cases go through `write_autodl_dataset` (the
path `tools convert` takes); dense cases (2 or 4 channels, values outside [0, 1]) need the
format's `DENSE` layout, which PNG/JPEG cannot carry: `write_dense_dataset` writes it.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from autodl_data.autodl_format import dataset_under_construction, metadata_text, write_solution


def class_patterns(n_classes: int, channels: int, seed: int, grid: int = 4) -> np.ndarray:
    """One coarse pattern per class, (n_classes, grid, grid, channels), values in [0, 1]."""
    rng = np.random.default_rng(seed)
    return rng.random((n_classes, grid, grid, channels)).astype(np.float32)


def pattern_image(pattern: np.ndarray, height: int, width: int, rng: np.random.Generator,
                  noise: float = 0.15) -> np.ndarray:
    """The class pattern at (height, width) (nearest upsampling) plus noise: float32 in [0, 1]."""
    grid_h, grid_w = pattern.shape[:2]
    rows = np.minimum(np.arange(height) * grid_h // max(1, height), grid_h - 1)
    cols = np.minimum(np.arange(width) * grid_w // max(1, width), grid_w - 1)
    image = pattern[rows][:, cols]
    image = image + noise * rng.standard_normal(image.shape, dtype=np.float32)
    return np.clip(image, 0.0, 1.0)


def to_uint8(image: np.ndarray) -> np.ndarray:
    out = np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
    return out[:, :, 0] if out.shape[2] == 1 else out


def jpeg_bytes(image: np.ndarray, quality: int = 85) -> bytes:
    """JPEG bytes of a float image in [0, 1] (large images: PNG of noise would be tens of MB)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(to_uint8(image)).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def one_hot(labels: np.ndarray, n_classes: int) -> np.ndarray:
    return np.eye(n_classes, dtype=np.uint8)[np.asarray(labels, dtype=int)]


def write_dense_dataset(out_dir: str | Path, name: str, x_train: np.ndarray, y_train: np.ndarray,
                        x_test: np.ndarray, y_test: np.ndarray) -> Path:
    """Write `<out_dir>/<name>/` in the AutoDL DENSE layout (float32 tensors, any channel count and range).

    `x_*`: (N, H, W, C) float arrays, stored as they are (no scaling); `y_*`: (N, K) 0/1 rows. Train
    labels go into the records, test labels into `<name>.solution` only, like the kit's data. Built
    under a temporary name and renamed at the end (nothing half-written is left on failure).
    """
    import tensorflow as tf

    x_train, x_test = np.asarray(x_train, np.float32), np.asarray(x_test, np.float32)
    if x_train.ndim != 4 or x_test.shape[1:] != x_train.shape[1:]:
        raise ValueError(f"dense images must be (N, H, W, C) with one shape, got {x_train.shape} and {x_test.shape}")
    _, rows, cols, channels = x_train.shape
    output_dim = int(y_train.shape[1])
    with dataset_under_construction(out_dir, name) as work:
        first_id = 0
        for split, x, y in (("test", x_test, None), ("train", x_train, y_train)):
            split_dir = work / f"{name}.data" / split
            split_dir.mkdir(parents=True)
            with tf.io.TFRecordWriter(str(split_dir / f"sample-{name}-{split}.tfrecord")) as writer:
                for i in range(len(x)):
                    example = tf.train.SequenceExample()
                    positives = [] if y is None else np.flatnonzero(y[i]).tolist()
                    example.context.feature["label_index"].int64_list.value.extend(positives)
                    example.context.feature["label_score"].float_list.value.extend([1.0] * len(positives))
                    example.context.feature["id"].int64_list.value.append(first_id + i)
                    frame = example.feature_lists.feature_list["0_dense_input"].feature.add()
                    frame.float_list.value.extend(x[i].ravel().tolist())
                    writer.write(example.SerializeToString())
            first_id += len(x)
            text = metadata_text(len(x), output_dim, rows, cols, channels).replace("format: COMPRESSED",
                                                                                 "format: DENSE")
            (split_dir / "metadata.textproto").write_text(text)
        write_solution(work / f"{name}.solution", y_test)
    return Path(out_dir) / name
