"""`tools replay`: the solver on scikit-learn's digits under a virtual clock, to show that two code
versions make the same decisions.

Every `time.monotonic()` call advances the virtual clock by a fixed step, so every time decision
(slice lengths, what fits before a deadline, schedule length) depends on the code's logic alone,
not on the machine's speed or load; torch runs on one thread with fixed seeds. Two versions that
make the same decisions return bit-identical predictions at the same virtual times: a refactor's
"no change in behaviour" checked without the run-to-run noise of a benchmark.

    cd worktree-A && PYTHONPATH=$PWD python -m tools replay --out /tmp/a.npz
    cd worktree-B && PYTHONPATH=$PWD python -m tools replay --out /tmp/b.npz
    tools replay --compare /tmp/a.npz /tmp/b.npz
"""
from __future__ import annotations

import os
import time

import numpy as np

from autodl_core.errors import UserInputError


class VirtualClock:
    """A monotonic clock that advances by `step` seconds at every reading."""

    def __init__(self, step: float, start: float = 1000.0):
        self.step, self.now = step, start

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def multilabel_digits_split():
    """The digits with a second label column set on every digit of 5 or more: a multi-label task (11
    columns, one or two of them set), for checking the solver's multi-label decisions too."""
    from autodl_core.arrays import ArrayDataset

    train, test = digits_split()

    def with_high(data):
        high = data.labels[:, 5:].sum(axis=1, keepdims=True)
        return ArrayDataset(data.images, np.concatenate([data.labels, high], axis=1).astype(np.float32))

    return with_high(train), with_high(test)


def digits_split():
    from sklearn.datasets import load_digits

    from autodl_core.arrays import ArrayDataset

    digits = load_digits()
    x = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)[..., None]
    y = np.eye(10, dtype=np.float32)[digits.target]
    order = np.random.default_rng(0).permutation(len(x))
    return ArrayDataset(x[order[:1400]], y[order[:1400]]), ArrayDataset(x[order[1400:]], y[order[1400:]])


def replay(budget: float, step: float, strategy: str = "auto", max_calls: int = 40, multilabel: bool = False) -> dict:
    """Run the kit's loop under the virtual clock; {"times": virtual seconds, "predictions": [...]}."""
    import torch

    clock = VirtualClock(step)
    real_monotonic, real_cpu_count, threads = time.monotonic, os.cpu_count, torch.get_num_threads()
    time.monotonic, os.cpu_count = clock, (lambda: 1)
    engine = os.environ.get("AUTODL_ENGINE")
    os.environ["AUTODL_ENGINE"] = "torch"  # one engine whatever this machine has: the same arithmetic everywhere
    try:
        torch.set_num_threads(1)
        torch.manual_seed(0)
        np.random.seed(0)
        from autodl_core.arrays import ArrayMetadata
        from autodl_core.config import PipelineConfig
        from autodl_core.solver import Solver

        train, test = multilabel_digits_split() if multilabel else digits_split()
        solver = Solver(ArrayMetadata(train, "digits"), PipelineConfig(strategy=strategy), device="cpu")
        start, times, predictions = time.monotonic(), [], []
        while not solver.done_training and len(predictions) < max_calls:
            left = start + budget - time.monotonic()
            if left <= 0:
                break
            solver.train(train, left)
            left = start + budget - time.monotonic()
            predictions.append(solver.test(test, left))
            times.append(time.monotonic() - start)
        return {"times": np.array(times), "predictions": predictions, "labels": test.labels}
    finally:
        time.monotonic, os.cpu_count = real_monotonic, real_cpu_count
        torch.set_num_threads(threads)
        if engine is None:
            os.environ.pop("AUTODL_ENGINE", None)
        else:
            os.environ["AUTODL_ENGINE"] = engine


def save(path, result: dict):
    np.savez(path, times=result["times"], labels=result["labels"],
             **{f"prediction_{i}": p for i, p in enumerate(result["predictions"])})


def compare(path_a, path_b) -> list[str]:
    """Differences between two saved replays (empty: the same decisions, bit-identical predictions)."""
    a, b = np.load(path_a), np.load(path_b)
    problems = []
    if not np.array_equal(a["times"], b["times"]):
        problems.append(f"prediction times differ: {a['times'].round(2).tolist()} vs {b['times'].round(2).tolist()}")
    names = sorted(k for k in a.files if k.startswith("prediction_"))
    if names != sorted(k for k in b.files if k.startswith("prediction_")):
        problems.append(f"{len(names)} vs {sum(k.startswith('prediction_') for k in b.files)} predictions")
    for name in names:
        if name in b.files and not np.array_equal(a[name], b[name]):
            problems.append(f"{name}: max difference {float(np.abs(a[name] - b[name]).max()):.3g}")
    return problems


def run(args) -> int:
    if args.compare:
        for path in args.compare:
            if not os.path.isfile(path):
                raise UserInputError(f"replay not found: {path}")
        problems = compare(*args.compare)
        print("\n".join(problems) or "identical: the same prediction times and bit-identical predictions")
        return 1 if problems else 0
    if not args.out:
        raise UserInputError("--out is required (or --compare A B)")
    result = replay(args.budget, args.step, args.strategy, multilabel=args.multilabel)
    save(args.out, result)
    from autodl_core.metrics import nauc

    print(f"{len(result['predictions'])} predictions at virtual {result['times'].round(2).tolist()} s; NAUC "
          f"{[round(nauc(result['labels'], p), 4) for p in result['predictions']]}")
    return 0


def register(subparsers):
    parser = subparsers.add_parser("replay", help="the solver under a virtual clock: same decisions across versions?",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="where to save the replay (.npz)")
    parser.add_argument("--budget", type=float, default=60.0, help="virtual time budget in seconds (default 60)")
    parser.add_argument("--step", type=float, default=0.01, help="virtual seconds per clock reading (default 0.01)")
    parser.add_argument("--strategy", default="auto", help="the pipeline's strategy (default: the device's)")
    parser.add_argument("--multilabel", action="store_true",
                        help="a multi-label task (the digits with a 'five or more' column) instead of the digits")
    parser.add_argument("--compare", nargs=2, metavar="NPZ", help="compare two saved replays instead")
    parser.set_defaults(func=run)
