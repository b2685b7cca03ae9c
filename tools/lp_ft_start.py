"""`tools lp-ft-start`: how validation moves in a fine-tuning's first few hundred steps from a probe's head.

The CPU recipe of the solver's steps on one dataset, outside the clock: MobileNetV2's trunk activations of
2,000 training and 400 held-out images at one size, a linear probe's head fitted on the frozen top's
features (the solver's L-BFGS head), then the top fine-tuned from that head (LP-FT: batch 32, EMA, dropout,
label smoothing, frozen BatchNorm: `PipelineConfig`'s values) at each learning rate asked for, without the
solver's fall rule; validation NAUC after 25, 50, 100, 200, 300 and 450 steps. `solver` among the rates is
the solver's own choice from the head (`autodl_core.learner.lp_ft_learning_rate`). It is where the start at
a lower rate for large heads came from (docs/benchmarks.md, 1.0.4).

    tools lp-ft-start data/corpus/knee_oa_xray data/corpus/wbc_blood_cells --size 96 --lrs 0.016,0.005,solver
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np

from autodl_core.errors import UserInputError
from tools.corpus_rows import finish, require_corpus_folders
from tools.frozen_probe import resized_batch

CHECKPOINTS = (25, 50, 100, 200, 300, 450)


def parse_rates(text: str) -> list[str]:
    """"0.016,0.005,solver" -> ["0.016", "0.005", "solver"], each a positive number or "solver"."""
    rates = [r.strip() for r in text.split(",") if r.strip()]
    for rate in rates:
        if rate == "solver":
            continue
        try:
            ok = float(rate) > 0
        except ValueError:
            ok = False
        if not ok:
            raise UserInputError(f"--lrs takes positive learning rates or 'solver', separated by commas: got {rate!r}")
    if not rates:
        raise UserInputError("--lrs is empty")
    return rates


def run_dataset(folder: str, size: int, rates: list[str], n_fit: int, n_val: int, checkpoints=CHECKPOINTS,
                backbone: str = "mobilenetv2_100") -> list[dict]:
    import torch
    import torch.nn as nn

    from autodl_core.config import PipelineConfig
    from autodl_core.heads import LinearHead
    from autodl_core.images import Preprocessor
    from autodl_core.learner import Classifier, FineTuner, head_row_norm, lp_ft_learning_rate
    from autodl_core.metrics import nauc
    from autodl_core.planner import in_seconds
    from autodl_core.trunk import split_backbone
    from autodl_data.corpus_npz import load_corpus_npz
    from pretrained import create_backbone, get_spec

    torch.manual_seed(0)
    train, _, info = load_corpus_npz(folder)
    order = np.random.default_rng(0).permutation(len(train))
    val_idx, fit_idx = order[:n_val], order[n_val:n_val + n_fit]
    if len(fit_idx) < 32:
        raise UserInputError(f"{folder}: {len(train)} training examples leave fewer than 32 to fine-tune on")
    config = PipelineConfig()
    spec = get_spec(backbone)
    network = create_backbone(backbone, pretrained=True, num_classes=0).eval()
    trunk, top = split_backbone(network, config.trunk_blocks)
    preprocess = Preprocessor(spec.mean, spec.std)

    def activations(idx):
        out = []
        with torch.inference_mode():
            for start in range(0, len(idx), 128):
                images = resized_batch([train.images[i] for i in idx[start:start + 128]], size)
                out.append(trunk(preprocess(images, (size, size))).float())
        return torch.cat(out)

    fit_acts, val_acts = activations(fit_idx), activations(val_idx)
    labels = train.labels
    multilabel = bool(np.any(np.abs(labels.sum(1) - 1) > 1e-6))
    with torch.inference_mode():
        fit_features, val_features = top(fit_acts).float(), top(val_acts).float()
    head = LinearHead(multilabel).fit(fit_features.numpy(), labels[fit_idx], max_iter=100)
    weight, bias = head.as_linear()
    row_norm = head_row_norm(weight)
    position = {p: i for i, p in enumerate(fit_idx)}
    rows = []
    for rate in rates:
        lr = float(rate) if rate != "solver" else lp_ft_learning_rate(config.top_lr, weight)
        model = Classifier(copy.deepcopy(top), fit_features.shape[1], labels.shape[1])
        model.head = nn.Sequential(nn.Dropout(config.top_dropout), model.head)
        with torch.no_grad():
            model.head[-1].weight.copy_(weight)
            model.head[-1].bias.copy_(bias)
        tuner = FineTuner(model, preprocess, multilabel, lr=lr, batch_size=32, weight_decay=config.weight_decay,
                          freeze_fraction=0.0, ema_decay=config.ema_decay, label_smoothing=config.label_smoothing,
                          total_steps_hint=4 * max(checkpoints), freeze_bn=True)

        def batch(idx):
            return fit_acts[[position[i] for i in idx]]

        curve = {}
        for steps in checkpoints:
            tuner.train_until(batch, labels, fit_idx, deadline=in_seconds(3600), max_steps=steps - tuner.steps)
            probs = tuner.predict_batches(lambda p: val_acts[p], len(val_idx))
            curve[str(steps)] = round(float(nauc(labels[val_idx], probs)), 3)
        row = {"dataset": info.get("name", Path(folder).name), "size": size, "rate": rate, "lr": round(lr, 5),
               "head_row_norm": round(row_norm, 1), "probe_val_nauc": round(float(nauc(labels[val_idx],
                                                                                   head.predict_proba(val_features))), 3),
               "val_nauc_by_step": curve}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    steps = list(rows[0]["val_nauc_by_step"]) if rows else []
    lines = ["| dataset (probe, head row norm) | learning rate | " + " | ".join(f"step {s}" for s in steps) + " |",
             "|---|---|" + "---|" * len(steps)]
    for r in rows:
        rate = f"{r['lr']:g}" + (" (solver)" if r["rate"] == "solver" else "")
        lines.append(f"| {r['dataset']} at {r['size']} px ({r['probe_val_nauc']:.3f}, {r['head_row_norm']:.0f}) | "
                     f"{rate} | " + " | ".join(f"{r['val_nauc_by_step'][s]:.3f}" for s in steps) + " |")
    return "\n".join(lines)


def run(args) -> int:
    require_corpus_folders(args.datasets)
    rates = parse_rates(args.lrs)
    if args.size < 32:
        raise UserInputError(f"--size must be at least 32 px, got {args.size}")
    rows = []
    for folder in args.datasets:
        rows += run_dataset(folder, args.size, rates, args.fit, args.val)
    return finish(rows, markdown, args.out)


def register(subparsers):
    parser = subparsers.add_parser("lp-ft-start", help="validation over a fine-tuning's first steps, per learning rate",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("datasets", nargs="+", help="corpus dataset folders (data.npz + info.json)")
    parser.add_argument("--size", type=int, default=96, help="the square working size (px)")
    parser.add_argument("--lrs", default="0.016,0.005,solver",
                        help="learning rates separated by commas; 'solver' is the solver's choice from the head")
    parser.add_argument("--fit", type=int, default=2000, help="training images fine-tuned on at most")
    parser.add_argument("--val", type=int, default=400, help="held-out images scored")
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.set_defaults(func=run)
