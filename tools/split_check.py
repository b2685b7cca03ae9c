"""`tools split-check`: does the solver's validation split tell the truth about the test set?

For each corpus dataset: the first probe's features as a run computes them (the pipeline's backbone at
the probe's size, through the engine the warm-up chooses), the random validation split a run draws,
the near-duplicate check of autodl_core/validation.py (how often test and held-out examples have a
near-duplicate among the training examples, and the grouped split when held-out ones have far more),
then a linear head fitted on the training side of each split: its validation NAUC beside its test
NAUC. A split that tracks the test set reads about what the test set reads.

    tools split-check ../shared/datasets/peta_pedestrian_attributes ../shared/datasets/orl_att_faces
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tools.corpus_rows import finish, require_corpus_folders


def check_dataset(folder: str, threshold: float | None, max_train: int) -> dict:
    import torch

    from autodl_core.arrays import ArrayMetadata
    from autodl_core.config import PipelineConfig
    from autodl_core.device_plan import plan_for
    from autodl_core.heads import LinearHead
    from autodl_core.images import Preprocessor, working_size
    from autodl_core.metrics import nauc
    from autodl_core.profile import DataProfile, choose_storage_shape
    from autodl_core.readers import ChunkReader, peek, value_transform
    from autodl_core.run_data import random_val_mask
    from autodl_core.stages.probe import ProbeStage
    from autodl_core.validation import check_split
    from autodl_core.warmup import prepare_backbone
    from autodl_data.corpus_npz import load_corpus_npz

    train, test, info = load_corpus_npz(folder)
    config = PipelineConfig()
    device = torch.device("cpu")
    plan = plan_for(device)
    name = info.get("name", Path(folder).name)
    metadata = ArrayMetadata(train, name)
    net = prepare_backbone(config, metadata, device, plan)
    first = peek(train)
    profile = DataProfile.from_metadata_and_peek(metadata, first)
    storage = choose_storage_shape(profile, config.max_resolution, config.memory_cap_gb)
    size = working_size(storage, plan.probe_resolution(min(storage)))
    offset, scale = value_transform(first.value_min, first.value_max)
    preprocess = Preprocessor(net.mean, net.std)

    def features(dataset, most):
        reader = ChunkReader(dataset, storage, offset, scale, batch_size=256)
        outs, labels = [], []
        while not reader.exhausted and sum(len(o) for o in outs) < most:
            chunk = reader.read(max_examples=min(256, most - sum(len(o) for o in outs)))
            if chunk is None:
                break
            x, y = chunk
            for start in range(0, len(x), plan.feature_batch):
                outs.append(net.frozen_features(preprocess(x[start:start + plan.feature_batch], size)))
            labels.append(y)
        return torch.cat(outs), np.concatenate(labels)

    train_f, train_y = features(train, max_train)
    test_f, test_y = features(test, 10 ** 9)
    multilabel = bool(np.any(np.abs(train_y.sum(1) - 1) > 1e-6))
    random_mask = random_val_mask(len(train_f), config.val_fraction, config.val_max)
    mask, report = check_split(train_f, train_y, random_mask, test_f, multilabel, threshold=threshold)

    def head_scores(val_mask):
        fit = ~val_mask
        head = LinearHead(multilabel, l2=ProbeStage.l2(int(fit.sum()))).fit(train_f[torch.from_numpy(fit)],
                                                                           train_y[fit], max_iter=100)
        val_probs = head.predict_proba(train_f[torch.from_numpy(val_mask)])
        return _score(nauc, train_y[val_mask], val_probs), _score(nauc, test_y, head.predict_proba(test_f))

    random_val, random_test = head_scores(random_mask)
    row = {"dataset": name, "n_train": len(train_f), "n_test": len(test_f),
           "probe_size": list(size), "engine": net.engines()["trunk"], "threshold": report.threshold, "test_share": round(report.test_share, 3),
           "val_share": round(report.val_share, 3), "grouped": report.grouped, "reason": report.reason,
           "random_val_nauc": random_val, "random_test_nauc": random_test}
    if mask is not None:
        grouped_val, grouped_test = head_scores(mask)
        row.update({"grouped_val_nauc": grouped_val, "grouped_test_nauc": grouped_test,
                    "val_share_after": round(report.val_share_after, 3), "n_val_grouped": int(mask.sum()),
                    "clusters": report.clusters})
    return row


def _score(nauc, y, probs) -> float | None:
    try:
        value = nauc(y, probs)
    except ValueError:
        return None
    return None if not np.isfinite(value) else round(float(value), 4)


def markdown(rows: list[dict]) -> str:
    lines = ["| dataset | near-duplicates (cosine): test / held-out | split | val NAUC (random) | val NAUC (grouped) "
             "| test NAUC (head of the split used) |", "|---|---|---|---|---|---|"]
    for r in rows:
        grouped = r.get("grouped_val_nauc")
        test = r.get("grouped_test_nauc") if r["grouped"] else r["random_test_nauc"]
        lines.append(f"| {r['dataset']} | ({r['threshold']:.2f}) {r['test_share']:.2f} / {r['val_share']:.2f} | "
                     f"{'grouped' if r['grouped'] else 'random'} | {r['random_val_nauc']} | "
                     f"{grouped if grouped is not None else '-'} | {test} |")
    return "\n".join(lines)


def run(args) -> int:
    require_corpus_folders(args.datasets)
    rows = []
    for folder in args.datasets:
        row = check_dataset(folder, args.threshold, args.max_train)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return finish(rows, markdown, args.out)


def register(subparsers):
    parser = subparsers.add_parser("split-check", help="does the validation split track the test set? (near-duplicates)",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("datasets", nargs="+", help="corpus dataset folders (data.npz + info.json)")
    parser.add_argument("--threshold", type=float,
                        help="cosine similarity of near-duplicates (default: read off the data, as the solver does)")
    parser.add_argument("--max-train", type=int, default=5000,
                        help="training examples with features, as the probe has at most (default 5000)")
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.set_defaults(func=run)
