"""A corpus dataset folder (`data.npz` [+ `info.json`]) read into the solver's in-memory datasets.

`load_corpus_npz` turns a corpus `data.npz` folder into train and test datasets (`ArrayDataset`) in the
order `tools convert` writes them for the kit, so an in-memory run and a kit run see the same stream;
`corpus_origin` says where a corpus dataset comes from, as references any machine can resolve.
"""
from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np

from autodl_core.arrays import ArrayDataset

# PIL modes that `tools convert` stores as one channel (autodl_data.autodl_format._GRAY_MODES): a dataset
# is grey when every image is, otherwise every image becomes RGB, as the kit then decodes them.
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")


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
