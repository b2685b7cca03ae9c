"""In-memory datasets for hosts without TensorFlow, behind the interface of `autodl_core.tfreader`.

The kit hands the solver tf.data datasets; a machine where TensorFlow cannot be installed (a GPU box
with torch only) hands it an `ArrayDataset` and an `ArrayMetadata` instead, and `autodl_core.readers`
sends each call to the matching implementation here. The numbers are the kit's: `peek` reports the
same sizes and value range (in the array's own units), `ChunkReader` maps values with tfreader's
(v + offset) * scale, clip, round, resizes with the same antialiased bilinear filter (torch's equals
TF's to float rounding, so at most one grey level apart), and reads in the same batches, in order.

`load_corpus_npz` turns a corpus `data.npz` folder into train and test datasets in the order
`tools convert` writes them for the kit, so an in-memory run and a kit run see the same stream.
"""
from __future__ import annotations

import io
import json
import time
import zipfile
from pathlib import Path

import numpy as np

from autodl_core.tfreader import PeekResult

# PIL modes that `tools convert` stores as one channel (autodl_core.autodl_format._GRAY_MODES): a dataset
# is grey when every image is, otherwise every image becomes RGB, as the kit then decodes them.
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")


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


def corpus_origin(info: dict, folder_name: str) -> dict:
    """Where a corpus dataset comes from, as its info.json records it: references any machine can
    resolve (corpus name, source repository and commit, license), never a local path."""
    source = info.get("source") if isinstance(info.get("source"), dict) else {}
    repos = source.get("repos") if isinstance(source.get("repos"), list) else []
    first = repos[0] if repos and isinstance(repos[0], dict) else source  # several mirrors: the first
    origin = {"corpus": info.get("name") or folder_name, "repo": first.get("repo"), "commit": first.get("commit"),
              "package": source.get("package"), "license": info.get("license")}
    return {key: value for key, value in origin.items() if value}


def load_corpus_npz(folder, shuffle_seed: int | None = None) -> tuple[ArrayDataset, ArrayDataset, dict]:
    """A corpus dataset folder (data.npz [+ info.json]) -> (train, test, info).

    Examples keep the file's order within each split, which is the order `tools convert` writes
    them (train and test each in source order) and so the order the kit reads; `shuffle_seed`
    permutes the train split instead. Encoded images are decoded with Pillow; channels follow
    `tools convert`: 1 if every image is grey, else 3 for all. PNG pixels are the kit's exactly;
    JPEG ones are not quite: Pillow uses libjpeg's accurate integer IDCT, the kit's `decode_image`
    the fast one (about one grey level apart on average, up to ~17 on a few pixels). `info` is
    info.json (when present) plus the name, the npz path and the split sizes.
    """
    folder = Path(folder)
    path = folder / "data.npz"
    if not path.is_file():
        raise ValueError(f"no data.npz in {folder}")
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            if "y" not in keys or "is_test" not in keys or not ("x" in keys or {"encoded", "offsets"} <= keys):
                raise ValueError(f"{path}: expected arrays x (or encoded + offsets), y and is_test; "
                                 f"found {sorted(keys)}")
            y, is_test = z["y"], z["is_test"]
            images = _npz_pixels(z["x"], path) if "x" in keys else _decode_all(z["encoded"], z["offsets"], path)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:  # pickled objects, truncated or not npz
        message = str(exc)
        if "allow_pickle" in message:
            message = ("holds pickled Python objects (object arrays), refused: loading them can run code; "
                       "save plain numeric arrays")
        raise ValueError(message if str(path) in message else f"{path}: {message}") from None
    if y.ndim != 2 or is_test.ndim != 1:
        raise ValueError(f"{path}: y must be N x K and is_test N, got shapes {y.shape} and {is_test.shape}")
    if not len(images) == len(y) == len(is_test):
        raise ValueError(f"{path}: {len(images)} images, {len(y)} label rows and {len(is_test)} is_test entries")
    is_test = is_test.astype(bool)
    train_idx, test_idx = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    if len(train_idx) == 0 or len(test_idx) == 0:
        raise ValueError(f"{path}: the {'train' if len(train_idx) == 0 else 'test'} split is empty")
    if shuffle_seed is not None:
        train_idx = train_idx[np.random.default_rng(shuffle_seed).permutation(len(train_idx))]

    def subset(indices):
        picked = images[indices] if isinstance(images, np.ndarray) else [images[i] for i in indices]
        return ArrayDataset(picked, y[indices])

    info_path = folder / "info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    info.update(name=info.get("name") or folder.name, data_npz=str(path), n_train=len(train_idx),
                n_test=len(test_idx), shuffle_seed=shuffle_seed)
    return subset(train_idx), subset(test_idx), info


def _npz_pixels(x: np.ndarray, path: Path) -> np.ndarray:
    if x.ndim not in (3, 4):
        raise ValueError(f"{path}: 'x' must be N x H x W x C or N x H x W, got shape {x.shape}")
    return x[..., None] if x.ndim == 3 else x


def _decode_all(encoded: np.ndarray, offsets: np.ndarray, path: Path):
    """Decode every image; grey ones are replicated to RGB when any image has colour (as the kit decodes)."""
    from PIL import Image

    offsets = np.asarray(offsets, dtype=np.int64)
    if offsets.ndim != 1 or len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != len(encoded) \
            or (np.diff(offsets) < 0).any():
        raise ValueError(f"{path}: 'offsets' do not delimit the 'encoded' bytes")
    images = []
    for i in range(len(offsets) - 1):
        try:
            with Image.open(io.BytesIO(encoded[offsets[i]:offsets[i + 1]].tobytes())) as pil:
                images.append(np.asarray(pil.convert("L" if pil.mode in GRAY_MODES else "RGB")))
        except Exception as exc:  # PIL raises many types for bad data
            raise ValueError(f"{path}: image {i} cannot be decoded ({exc})") from None
    if any(a.ndim == 3 for a in images):
        images = [np.repeat(a[:, :, None], 3, axis=2) if a.ndim == 2 else a for a in images]
    return images
