"""`tools frozen-probe`: what a plain frozen probe reaches on a dataset, per backbone and resolution.

One forward pass of a pretrained backbone over every image resized to one square size, pooled
features L2-normalised, scikit-learn's logistic regression (C = 10; one-vs-rest for multi-label
data), test NAUC. No time budget, no validation split: the quality a resolution and a backbone
can carry, and what a pass costs here (images/s of the engine the solver would choose). It is the
yardstick the solver's later steps are chosen against (docs/benchmarks.md).

    tools frozen-probe data/corpus/oxford_flowers17 data/corpus/dtd_textures10 \\
        --backbones mobilenetv2_100,efficientnet_lite2 --resolutions 96,224 --out probe.json
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from autodl_core.errors import UserInputError
from tools.corpus_rows import finish, require_corpus_folders


def resized_batch(images, size: int) -> np.ndarray:
    """uint8 (N, size, size, C) of images of any sizes (each resized alone, antialiased bilinear)."""
    import torch
    import torch.nn.functional as F

    out = []
    for image in images:
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]
        downscale = x.shape[-2] > size or x.shape[-1] > size
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=downscale)
        out.append(x[0].permute(1, 2, 0).numpy())
    return np.stack(out)


def features(runner, preprocess, images, size: int, batch: int = 64) -> tuple[np.ndarray, float]:
    """(pooled features, seconds of the frozen passes) of `images` at size x size."""
    outs, seconds = [], 0.0
    for start in range(0, len(images), batch):
        x = preprocess(resized_batch(images[start:start + batch], size), (size, size))
        began = time.perf_counter()
        outs.append(runner(x).float().numpy())
        seconds += time.perf_counter() - began
    return np.concatenate(outs), seconds


def probe_nauc(train_f, train_y, test_f, test_y, multilabel: bool) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    from autodl_core.metrics import nauc

    def unit(f):
        return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)

    if multilabel:
        keep = (train_y.sum(0) > 0) & (train_y.sum(0) < len(train_y))
        model = OneVsRestClassifier(LogisticRegression(C=10, max_iter=1000)).fit(unit(train_f), train_y[:, keep])
        probs = np.full(test_y.shape, 0.0)
        probs[:, keep] = model.predict_proba(unit(test_f))
        probs[:, ~keep] = train_y.mean(0)[~keep]
    else:
        model = LogisticRegression(C=10, max_iter=1000).fit(unit(train_f), train_y.argmax(1))
        probs = np.zeros(test_y.shape)
        probs[:, model.classes_] = model.predict_proba(unit(test_f))
    return float(nauc(test_y, probs))


def subsample(n: int, most: int, seed: int = 0) -> np.ndarray:
    if n <= most:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, most, replace=False))


def run_dataset(folder: str, backbones: list[str], resolutions: list[int], max_train: int, max_test: int) -> list[dict]:
    import torch

    from autodl_core.engines import choose_runner
    from autodl_core.images import Preprocessor
    from autodl_data.corpus_npz import load_corpus_npz
    from pretrained import create_backbone, get_spec

    train, test, info = load_corpus_npz(folder)
    tr, te = subsample(len(train), max_train), subsample(len(test), max_test, seed=1)
    train_x = [train.images[i] for i in tr]
    test_x = [test.images[i] for i in te]
    train_y, test_y = train.labels[tr], test.labels[te]
    multilabel = bool(np.any(np.abs(train.labels.sum(1) - 1) > 1e-6))
    rows = []
    for name in backbones:
        network = create_backbone(name, pretrained=True, num_classes=0).eval()
        spec = get_spec(name)
        preprocess = Preprocessor(spec.mean, spec.std)
        choice = choose_runner(network, torch.randn(4, 3, 64, 64), torch.device("cpu"), bf16=True,
                               label=name, timing_input=torch.randn(16, 3, 128, 128))
        for size in resolutions:
            f_train, s_train = features(choice.runner, preprocess, train_x, size)
            f_test, s_test = features(choice.runner, preprocess, test_x, size)
            row = {"dataset": info.get("name", Path(folder).name), "backbone": name, "size": size,
                   "engine": choice.name, "n_train": len(tr), "n_test": len(te),
                   "test_nauc": round(probe_nauc(f_train, train_y, f_test, test_y, multilabel), 4),
                   "images_per_s": round((len(tr) + len(te)) / max(1e-9, s_train + s_test), 1)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    columns = list(dict.fromkeys((r["backbone"], r["size"]) for r in rows))
    short = {"mobilenetv2_100": "MNv2", "efficientnet_lite0": "Lite0", "efficientnet_lite1": "Lite1",
             "efficientnet_lite2": "Lite2"}
    lines = ["| dataset | " + " | ".join(f"{short.get(b, b)} {s}" for b, s in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for name in datasets:
        cells = {(r["backbone"], r["size"]): r["test_nauc"] for r in rows if r["dataset"] == name}
        best = max(cells.values())
        lines.append(f"| {name} | " + " | ".join(
            (f"**{cells[c]:.3f}**" if cells.get(c) == best else f"{cells[c]:.3f}") if c in cells else "-"
            for c in columns) + " |")
    return "\n".join(lines)


def run(args) -> int:
    require_corpus_folders(args.datasets)
    backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    try:
        resolutions = [int(r) for r in args.resolutions.split(",") if r.strip()]
    except ValueError:
        raise UserInputError(f"--resolutions must be integers separated by commas, got {args.resolutions!r}") from None
    rows = []
    for folder in args.datasets:
        rows += run_dataset(folder, backbones, resolutions, args.max_train, args.max_test)
    return finish(rows, markdown, args.out)


def register(subparsers):
    parser = subparsers.add_parser("frozen-probe", help="test NAUC of a plain frozen probe per backbone and resolution",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("datasets", nargs="+", help="corpus dataset folders (data.npz + info.json)")
    parser.add_argument("--backbones", default="mobilenetv2_100,efficientnet_lite0,efficientnet_lite2")
    parser.add_argument("--resolutions", default="64,128,224")
    parser.add_argument("--max-train", type=int, default=2000, help="training images at most (a seeded subsample)")
    parser.add_argument("--max-test", type=int, default=1000, help="test images at most (a seeded subsample)")
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.set_defaults(func=run)
