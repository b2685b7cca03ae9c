"""`tools demo`: the solver on a small bundled dataset, end to end, no download needed.

    tools demo [--time-budget 60] [--out runs/demo] [--code-dir DIR] [--tf-mode graph|eager] [--no-progress]

Builds an AutoDL dataset from scikit-learn's bundled digits (1797 8x8 grey images,
10 classes; pixels scaled from 0..16 to 0..255; seeded, stratified 20% test split)
into OUT/data/digits (reused on later runs), runs model.py (default: the repo
root's) on it with `tools run`'s machinery, and prints the ALC and where the
learning curve and the report are.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from tools.errors import UserInputError
from tools.shared_paths import REPO_ROOT
from tools.tf_support import import_tensorflow, require_tensorflow

DATASET_NAME = "digits"
TEST_FRACTION = 0.2
SPLIT_SEED = 0


def digits_examples():
    """(train, test) lists of (uint8 8x8 image, one-hot label) from scikit-learn's bundled copy."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    labels = np.eye(10, dtype=np.uint8)[digits.target]
    idx_train, idx_test = train_test_split(np.arange(len(images)), test_size=TEST_FRACTION,
                                           random_state=SPLIT_SEED, stratify=digits.target)
    train = [(images[i], labels[i]) for i in idx_train]
    test = [(images[i], labels[i]) for i in idx_test]
    return train, test


def build_digits_dataset(data_root: Path) -> Path:
    """Write OUT/data/digits once; reuse it when it is already a complete AutoDL task."""
    from autodl_data.autodl_format import find_task, write_autodl_dataset

    dataset_dir = Path(data_root) / DATASET_NAME
    if dataset_dir.is_dir():
        try:
            find_task(dataset_dir)
            return dataset_dir
        except UserInputError:
            pass  # incomplete or foreign: rebuild
    try:  # the writer imports TensorFlow here; torch/triton must come first (segfault otherwise)
        import torch  # noqa: F401
        import torch._dynamo  # noqa: F401
    except ImportError:
        pass
    # TensorFlow's start-up lines kept out of the demo's output; the environment is left as it is, so the
    # ingestion child (tools run's) logs as under the kit
    import_tensorflow()
    train, test = digits_examples()
    write_autodl_dataset(data_root, DATASET_NAME, train, test, output_dim=10,
                         class_names=[str(d) for d in range(10)], overwrite=True,
                         extra_info={"source": "sklearn.datasets.load_digits, pixels x255/16",
                                     "split": f"stratified {TEST_FRACTION:.0%} test, seed {SPLIT_SEED}"})
    return dataset_dir


def run_demo(out_dir, time_budget: float = 60.0, code_dir=None, tf_mode: str = "graph",
             progress: bool = True) -> dict:
    from tools.runner import run_local

    require_tensorflow("the demo writes TFRecords and runs the kit's ingestion loop")
    out = Path(out_dir)
    code_dir = Path(code_dir) if code_dir else REPO_ROOT
    if not (code_dir / "model.py").is_file():
        raise UserInputError(f"no model.py in {code_dir}")
    dataset_dir = build_digits_dataset(out / "data")
    return run_local(code_dir, dataset_dir, time_budget, out / "run", tf_mode=tf_mode, progress=progress)


def _cli(args) -> int:
    from tools.runner import final_line

    result = run_demo(args.out, args.time_budget, args.code_dir, args.tf_mode, progress=not args.no_progress)
    print(f"status: {result['status']}" + (f" ({result['error']})" if result.get("error") else ""))
    print(f"ALC = {result['alc']:.4f} on digits in {result['time_budget']:g} s "
          f"({result['n_predictions']} predictions, final NAUC "
          f"{result['final_nauc'] if result['final_nauc'] is not None else float('nan'):.4f})")
    print(f"learning curve: {result['learning_curve']}")
    print(f"report:         {result['report']}")
    print(final_line(result), flush=True)
    return 0 if result["n_predictions"] > 0 else 3


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="run the solver on a bundled digits dataset and report its ALC",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("--time-budget", type=float, default=60.0, help="T in seconds (default 60)")
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("--code-dir", default=None, help="folder with model.py (default: the repo root)")
    parser.add_argument("--tf-mode", choices=("graph", "eager"), default="graph",
                        help="TensorFlow mode of the ingestion: graph (default; TF1 semantics, as the challenge "
                             "platform runs the kit) or eager (TF2)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no live progress display (the final lines are printed all the same)")
    parser.set_defaults(func=_cli)


if __name__ == "__main__":
    from tools.cli import main

    sys.exit(main(["demo", *sys.argv[1:]]))
