"""Build one corpus dataset from its recipe: layout -> subsample -> split -> encode -> data.npz + info.json.

The output is the format of `../shared/datasets` (see its README): `data.npz` with `x` (uint8
N x H x W x C, arrays of one shape) or `encoded` + `offsets` (image files' bytes), `y` (N x K 0/1)
and `is_test`; `info.json` with the source, license, split, counts and the recipe itself.
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np

from autodl_data.autodl_format import UndecodableImage, prepare_image
from autodl_data.corpus_npz import GRAY_MODES
from tools.convert import check_classes, split_indices, subsample
from tools.corpus.layouts import Labelled, read_layout
from tools.corpus.recipes import Recipe
from tools.errors import UserInputError

SHUFFLE_SEED = 0  # rows are shuffled like the shared corpus's (RandomState(0))


def label_matrix(labels: list[tuple[int, ...]], width: int) -> np.ndarray:
    y = np.zeros((len(labels), width), dtype=np.uint8)
    for row, classes in enumerate(labels):
        y[row, list(classes)] = 1
    return y


def subsample_rows(y: np.ndarray, spec: dict | None) -> np.ndarray:
    """Rows kept: all, or `max_images` drawn at random (seeded). Single-label data keeps each class's
    share (largest remainders; every class keeps one image when the limit allows)."""
    n = len(y)
    if not spec or spec.get("max_images") is None or n <= spec["max_images"]:
        return np.arange(n)
    limit, seed = int(spec["max_images"]), int(spec.get("seed", 0))
    if not (y.sum(axis=1) == 1).all():
        return subsample(np.arange(n), limit, seed)
    counts = y.sum(axis=0)
    if limit < (counts > 0).sum():
        raise UserInputError(f"max_images {limit} is below the number of classes ({(counts > 0).sum()})")
    exact = limit * counts / n
    shares = np.maximum(np.floor(exact).astype(int), (counts > 0).astype(int))
    for k in np.argsort(-(exact - np.floor(exact)), kind="stable"):
        if shares.sum() >= limit:
            break
        shares[k] += shares[k] < counts[k]
    while shares.sum() > limit:  # the one-per-class floor overshot: take from the largest shares
        shares[np.argmax(shares)] -= 1
    rng = np.random.RandomState(seed)
    return np.sort(np.concatenate([rng.permutation(np.flatnonzero(y[:, k]))[:shares[k]] for k in range(y.shape[1])]))


def test_mask(recipe: Recipe, data: Labelled, rows: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, str]:
    kind = recipe.split.get("kind", "source")
    fraction, seed = float(recipe.split.get("test_fraction", 0.2)), int(recipe.split.get("seed", 0))
    single_label = bool((y.sum(axis=1) == 1).all())
    if kind == "source":
        splits = [data.splits[i] for i in rows]
        odd = sorted({str(s) for s in splits} - {"train", "test"})
        if odd:
            raise UserInputError(f"{recipe.name}: split 'source' needs train/test for every image; the layout "
                                 f"gives {', '.join(odd)} (map them with the layout's splits/split_map)")
        return np.array([s == "test" for s in splits]), recipe.split.get("describe", "source split")
    if kind == "random":
        how = "stratified per class" if single_label else "not stratified (multi-label)"
        return split_indices(y, fraction, seed), f"seeded split: {fraction:.0%} test, {how} (seed {seed})"
    if kind == "grouped":
        groups = np.array([data.groups[i] for i in rows], dtype=object)
        if any(g is None for g in groups):
            raise UserInputError(f"{recipe.name}: split 'grouped' but the layout gives no group for some images")
        return grouped_mask(groups, y, fraction, seed), (
            f"seeded split by {recipe.split.get('group_name', 'group')}: about {fraction:.0%} of the groups "
            f"held out whole{' in each class' if nested_groups(groups, y) else ''} (seed {seed})")
    raise UserInputError(f"{recipe.name}: unknown split kind {kind!r} (source, random, grouped)")


def nested_groups(groups: np.ndarray, y: np.ndarray) -> bool:
    """Does every group lie inside one class (a traffic-sign track), rather than span them (a drawer)?"""
    classes = {}
    for group, row in zip(groups, y):
        classes.setdefault(group, set()).add(tuple(np.flatnonzero(row)))
    return (y.sum(axis=1) == 1).all() and all(len(c) == 1 for c in classes.values())


def grouped_mask(groups: np.ndarray, y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Test mask holding out whole groups: per class when groups are nested in classes (each class then
    keeps train and test whenever it has two groups), else across the data."""
    if not 0 < fraction < 1:
        raise UserInputError(f"test_fraction must be in (0, 1), got {fraction}")
    rng = np.random.RandomState(seed)
    pools = [np.flatnonzero(y[:, k]) for k in range(y.shape[1])] if nested_groups(groups, y) else [np.arange(len(y))]
    held = set()
    for members in pools:
        names = sorted(set(groups[members]))
        if len(names) >= 2:
            count = min(max(int(round(fraction * len(names))), 1), len(names) - 1)
            held |= set(rng.permutation(names)[:count])
    return np.array([g in held for g in groups])


def encode_image(image, encode: dict):
    """Apply the recipe's `encode` choices to one image; returns (image, resized?, made JPEG?).

    `max_side`: images larger on their longer side are shrunk (Lanczos, aspect kept), JPEG sources
    re-encoded as JPEG quality 95, others as PNG. `reencode: "jpeg"`: sources the kit cannot decode
    (TIFF, PPM, ...) become JPEG quality 95 instead of the lossless PNG `prepare_image` would make,
    where PNG would multiply the size of photographic data. `grayscale: true`: every image becomes
    one channel (L), whatever its file mode, so the mode cannot carry the label (one brain MRI source
    saved nearly all tumour-free scans as RGB and the others as L, all of them grey in content); each
    is re-encoded, not only the RGB ones, so no class alone carries a second compression."""
    grayscale = bool(encode.get("grayscale"))
    if not isinstance(image, (bytes, bytearray)) or not (encode.get("max_side") or encode.get("reencode") or grayscale):
        return image, False, False
    from PIL import Image

    with Image.open(io.BytesIO(image)) as pil:
        fmt, max_side = pil.format, encode.get("max_side")
        resize = bool(max_side) and max(pil.size) > max_side
        to_jpeg = encode.get("reencode") == "jpeg" and fmt not in ("JPEG", "PNG")
        if not resize and not to_jpeg and not grayscale:  # all re-encoded alike: no class-wise artefacts
            return image, False, False
        picture = pil.convert("L" if grayscale or pil.mode in GRAY_MODES else "RGB")
    if resize:
        scale = max_side / max(picture.size)
        picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))),
                                 Image.LANCZOS)
    jpeg = fmt == "JPEG" or to_jpeg
    out = io.BytesIO()
    picture.save(out, format="JPEG" if jpeg else "PNG", **({"quality": 95} if jpeg else {}))
    return out.getvalue(), resize, to_jpeg


def build_dataset(recipe: Recipe, tree, out_root: Path, built_by: str | None = None, force: bool = False,
                  open_tree=None) -> dict:
    """Write `<out_root>/<recipe.name>/` (data.npz, info.json); returns the info written.
    `open_tree(repo, commit)` gives other repositories a layout reads from (labels kept apart)."""
    out = Path(out_root) / recipe.name
    if out.exists() and not force:
        raise UserInputError(f"{out} already exists (pass --force to rebuild it)")
    data = read_layout(tree, recipe.layout, open_tree)
    y_all = label_matrix(data.labels, len(data.class_names))
    rows = subsample_rows(y_all, recipe.subsample)
    y = y_all[rows]
    check_classes(y, data.class_names, recipe.name)
    is_test, split_text = test_mask(recipe, data, rows, y)
    check_classes(y[~is_test], data.class_names, f"{recipe.name}, train split")
    untested = [data.class_names[k] for k in np.flatnonzero(y[is_test].sum(axis=0) == 0)]
    if not is_test.any() or len(untested) > len(data.class_names) // 2:
        raise UserInputError(f"{recipe.name}: the test split lacks {len(untested)} of {len(data.class_names)} classes")
    order = np.random.RandomState(SHUFFLE_SEED).permutation(len(rows))
    rows, y, is_test = rows[order], y[order], is_test[order]

    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.with_name(f".{out.name}.part")  # hidden: a leftover is never taken for a dataset
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    resized = jpegs = reencoded = 0
    if all(isinstance(data.images[i], np.ndarray) for i in rows) and len({data.images[i].shape for i in rows}) == 1:
        x = np.stack([data.images[i] for i in rows])  # arrays of one shape: stored as they are
        x = x[..., None] if x.ndim == 3 else x
        np.savez_compressed(work / "data.npz", x=x, y=y, is_test=is_test)
        storage, channels = "x", x.shape[-1]
        sizes = np.tile([x.shape[2], x.shape[1]], (len(x), 1))
    else:
        prepared = []
        for i in rows:
            try:
                image, was_resized, made_jpeg = encode_image(data.images[i], recipe.encode)
                prepared.append(prepare_image(image))
            except (UndecodableImage, OSError, ValueError) as exc:
                raise UserInputError(f"{recipe.name}: {data.paths[i]}: cannot decode ({exc})") from None
            resized, jpegs = resized + was_resized, jpegs + made_jpeg
        reencoded = sum(p.reencoded for p in prepared)
        offsets = np.zeros(len(prepared) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(p.encoded) for p in prepared])
        encoded = np.frombuffer(b"".join(p.encoded for p in prepared), dtype=np.uint8)
        np.savez_compressed(work / "data.npz", encoded=encoded, offsets=offsets, y=y, is_test=is_test)
        storage, channels = "encoded+offsets", 1 if all(p.channels == 1 for p in prepared) else 3
        sizes = np.array([(p.width, p.height) for p in prepared])
    if untested:
        split_text += f"; {len(untested)} class(es) without a test image: {', '.join(untested[:10])}"
    info = describe(recipe, data, y, is_test, sizes, int(channels), split_text, storage, work / "data.npz",
                    resized=resized, jpegs=jpegs, reencoded=reencoded, dropped=len(data.images) - len(rows),
                    built_by=built_by)
    (work / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    work.rename(out)
    return info


def describe(recipe, data, y, is_test, sizes, channels, split_text, storage, npz_path, *,
             resized, jpegs, reencoded, dropped, built_by) -> dict:
    """info.json: the fields of `../shared/datasets/README.md`, plus the recipe (every conversion choice)."""
    notes = ([recipe.notes] if recipe.notes else []) + data.notes
    if dropped:
        notes.append(f"subsampled: {len(y)} of {len(y) + dropped} images kept ({recipe.subsample}).")
    if resized:
        notes.append(f"{resized} images larger than {recipe.encode['max_side']} px on their longer side were "
                     "shrunk (Lanczos, aspect kept), then stored as JPEG quality 95 (JPEG sources"
                     f"{' and, with reencode jpeg, the others' if recipe.encode.get('reencode') else ''}) or PNG.")
    if recipe.encode.get("grayscale"):
        notes.append("Every image converted to one grey channel and re-encoded (encode grayscale): JPEG sources "
                     "as JPEG quality 95, others as PNG.")
    if jpegs:
        notes.append(f"{jpegs} images in formats the kit cannot decode (e.g. TIFF) re-encoded as JPEG quality 95 "
                     "(lossy, near-transparent; PNG would have multiplied the size).")
    if reencoded:
        notes.append(f"{reencoded} images in formats the kit cannot decode (e.g. TIFF, BMP) re-encoded as PNG.")
    notes.append("Rows shuffled with numpy RandomState(0).")
    info = {"name": recipe.name, "domain": recipe.domain, "source": recipe.source, "license": recipe.license,
            "multilabel": bool((y.sum(axis=1) != 1).any()), "channels": channels,
            "class_names": data.class_names, "split": split_text, "notes": " ".join(notes)}
    if len({tuple(size) for size in sizes}) == 1:
        width, height = (int(v) for v in sizes[0])
        info["image_shape"] = [height, width, channels]
    else:
        info.update({"image_shape": "variable", "image_size_min_wh": sizes.min(axis=0).tolist(),
                     "image_size_max_wh": sizes.max(axis=0).tolist(),
                     "image_size_median_wh": np.median(sizes, axis=0).tolist()})
    payload = npz_path.read_bytes()
    info.update({"n_total": int(len(y)), "n_train": int((~is_test).sum()), "n_test": int(is_test.sum()),
                 "n_classes": int(y.shape[1]), "label_cardinality": round(float(y.sum(axis=1).mean()), 4),
                 "class_counts": y.sum(axis=0).astype(int).tolist(), "storage": storage,
                 "data_npz_bytes": len(payload), "data_npz_sha256": hashlib.sha256(payload).hexdigest(),
                 "recipe": recipe.raw, "built_by": built_by})
    return info
