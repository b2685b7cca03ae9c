"""In-memory datasets for hosts without TensorFlow, behind the interface of `autodl_core.tfreader`.

The kit hands the solver tf.data datasets; a machine where TensorFlow cannot be installed (a GPU box
with torch only) hands it an `ArrayDataset` and an `ArrayMetadata` instead, and `autodl_core.readers`
sends each call to the matching implementation here. The numbers are the kit's: `peek` reports the
same sizes and value range (in the array's own units), `ChunkReader` maps values with tfreader's
(v + offset) * scale, clip, round, resizes with the same antialiased bilinear filter (torch's equals
TF's to float rounding, so at most one grey level apart), and reads in the same batches, in order.
"""
from __future__ import annotations

import time

import numpy as np

from autodl_core.tfreader import PeekResult


class ArrayDataset:
    """Examples and their label vectors, held in memory, in reading order.

    `images`: one N x H x W x C array (N x H x W gets a channel axis), or a list of H_i x W_i x C
    arrays (2-D ones get a channel axis); a list whose arrays share one shape is stacked, so that
    readers take whole slices. Values are kept as given (any numeric dtype and range: the solver
    maps the range it peeks, in these units; so uint8 images holding only 0 and 1 are stretched to
    0/255, where the kit, decoding them to 0 and 1/255, keeps them 0/1). `labels`: N x K, one-hot or
    multi-hot.
    """

    def __init__(self, images, labels):
        labels = np.asarray(labels)
        if labels.ndim != 2 or labels.shape[1] < 1:
            raise ValueError(f"labels must be an N x K array (one-hot or multi-hot, K >= 1), got shape {labels.shape}")
        if isinstance(images, np.ndarray):
            if images.ndim not in (3, 4):
                raise ValueError(f"an image array must be N x H x W x C or N x H x W, got shape {images.shape}")
            images = images[..., None] if images.ndim == 3 else images
            _check_dtype(images.dtype)
            if images.shape[1] == 0 or images.shape[2] == 0:
                raise ValueError(f"images have no pixels (shape {images.shape})")
        else:
            images = [_one_image(image, i) for i, image in enumerate(images)]
            if len({image.shape[2] for image in images}) > 1:
                raise ValueError(f"images have different channel counts: {sorted({a.shape[2] for a in images})}")
            if len({image.shape for image in images}) == 1:
                images = np.stack(images)
        if len(images) == 0:
            raise ValueError("no example: a dataset needs at least one image")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} label rows")
        self.images = images
        self.labels = labels.astype(np.float32)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def fixed_size(self) -> bool:
        return isinstance(self.images, np.ndarray)

    @property
    def channels(self) -> int:
        return int(self.images[0].shape[-1])

    def sizes(self) -> tuple[np.ndarray, np.ndarray]:
        """Heights and widths of every example."""
        if self.fixed_size:
            n, h, w = self.images.shape[:3]
            return np.full(n, h), np.full(n, w)
        return np.array([a.shape[0] for a in self.images]), np.array([a.shape[1] for a in self.images])


def _check_dtype(dtype) -> None:
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)) or dtype == np.bool_:
        raise ValueError(f"image values must be integers or floats, got dtype {dtype}")


def _one_image(image, index: int) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim not in (2, 3):
        raise ValueError(f"image {index} must be H x W x C or H x W, got shape {image.shape}")
    _check_dtype(image.dtype)
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image {index} has no pixels (shape {image.shape})")
    return image[:, :, None] if image.ndim == 2 else image


class ArrayMetadata:
    """The kit's metadata interface (what the solver and the pipeline selector call) for an ArrayDataset.

    Sizes that vary across examples are -1, as in the kit's metadata of variable-size data. The
    dataset name deliberately names no folder: tfreader would look for a kit `test/` split next to it.
    """

    def __init__(self, dataset: ArrayDataset, name: str = "arrays"):
        self.dataset = dataset
        self.name = str(name)
        heights, widths = dataset.sizes()
        self.rows = int(heights[0]) if (heights == heights[0]).all() else -1
        self.cols = int(widths[0]) if (widths == widths[0]).all() else -1

    def size(self) -> int:
        return len(self.dataset)

    def get_output_size(self) -> int:
        return int(self.dataset.labels.shape[1])

    def get_matrix_size(self, bundle_index: int = 0) -> tuple[int, int]:
        return self.rows, self.cols

    def get_num_channels(self, bundle_index: int = 0) -> int:
        return self.dataset.channels

    def get_tensor_size(self, bundle_index: int = 0) -> tuple[int, int, int]:
        return self.rows, self.cols, self.dataset.channels

    def get_tensor_shape(self, bundle_index: int = 0) -> tuple[int, int, int, int]:
        return 1, self.rows, self.cols, self.dataset.channels

    def get_sequence_size(self) -> int:
        return 1

    def get_dataset_name(self) -> str:
        return f"<in-memory>/{self.name}"


def peek(dataset: ArrayDataset, n: int = 48, deadline: float | None = None) -> PeekResult:
    """tfreader.peek on the first n examples: sizes, channels, value range in the array's units, labels
    (in memory: no decoding, the deadline is not needed)."""
    m = min(int(n), len(dataset))
    heights, widths = dataset.sizes()
    if dataset.fixed_size:
        head = dataset.images[:m]
        vmin, vmax = float(head.min()), float(head.max())
    else:
        vmin = min(float(a.min()) for a in dataset.images[:m])
        vmax = max(float(a.max()) for a in dataset.images[:m])
    return PeekResult([int(h) for h in heights[:m]], [int(w) for w in widths[:m]], dataset.channels, 1,
                      vmin, vmax, dataset.labels[:m].copy())


def count_examples(dataset: ArrayDataset) -> int:
    return len(dataset)


class ChunkReader:
    """tfreader.ChunkReader over an ArrayDataset: uint8 (N, H, W, C) at `storage_hw`, in order, in chunks.

    Reads `batch_size` examples at a time with tfreader's stopping rules (at least one batch; then
    stop at max_examples, at the deadline or at the end), so the chunks have the kit's sizes and
    `exhausted` turns True when a read finds the end, as there.
    """

    def __init__(self, dataset: ArrayDataset, storage_hw: tuple[int, int], offset: float = 0.0, scale: float = 255.0,
                 batch_size: int = 64):
        self.dataset = dataset
        self.hw = (int(storage_hw[0]), int(storage_hw[1]))
        self.offset, self.scale = float(offset), float(scale)  # Python floats: float32 arithmetic, as in TF
        self.batch_size = int(batch_size)
        self.exhausted = False
        self.n_read = 0

    def read(self, max_examples: int | None = None, deadline: float | None = None):
        """Read until max_examples, the deadline (time.monotonic()) or the end; returns (x, y) or None."""
        xs, n, start = [], 0, self.n_read
        while not self.exhausted:
            if max_examples is not None and n >= max_examples:
                break
            if deadline is not None and n > 0 and time.monotonic() >= deadline:
                break
            if start + n >= len(self.dataset):
                self.exhausted = True
                break
            stop = min(start + n + self.batch_size, len(self.dataset))
            xs.append(self._batch(start + n, stop))
            n = stop - start
        if not xs:
            return None
        self.n_read += n
        return np.concatenate(xs), self.dataset.labels[start:start + n].copy()

    def _batch(self, begin: int, end: int) -> np.ndarray:
        images = self.dataset.images
        if self.dataset.fixed_size:
            return self._to_uint8(images[begin:end])
        return np.stack([self._to_uint8(images[i][None])[0] for i in range(begin, end)])

    def _to_uint8(self, x: np.ndarray) -> np.ndarray:
        """(b, h, w, C) raw values -> uint8 at storage_hw: tfreader's value mapping, in float32 as in TF."""
        if x.shape[1:3] != self.hw:
            return _resize_to_uint8(x, self.hw, self.offset, self.scale)
        if x.dtype == np.uint8 and self.offset == 0.0 and self.scale == 1.0:
            return x.copy()  # the mapping is the identity on uint8
        x = (x.astype(np.float32) + self.offset) * self.scale
        return np.round(np.clip(x, 0.0, 255.0)).astype(np.uint8)


def _resize_to_uint8(x: np.ndarray, hw: tuple[int, int], offset: float, scale: float) -> np.ndarray:
    """Antialiased bilinear resize (TF's `image.resize` filter) of a (b, h, w, C) batch, then the value mapping.

    In torch: its resize is threaded, and twice as fast on contiguous NCHW float32 as on a channels-last view.
    """
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32))
    t = F.interpolate(t, size=hw, mode="bilinear", antialias=True, align_corners=False)
    t = t.add_(offset).mul_(scale).clamp_(0.0, 255.0).round_().to(torch.uint8)
    return t.permute(0, 2, 3, 1).contiguous().numpy()
