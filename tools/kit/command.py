"""`tools kit`: one run through the official starting kit, from the project's command line.

    tools kit --code-dir DIR --dataset-dir DIR --time-budget 300 --out OUT [--kit GITDIR]
              [--tf-mode graph|eager] [--python PY] [-v]

The same run, options and outputs as `python tools/kit/run.py` (see tools/kit/README.md). What can be
checked cheaply is checked before anything is started or removed from OUT: the kit (given, existing,
holding ingestion and scoring at --kit-rev), a dataset folder given by path (kit-style: one
`<name>.data/` and its `<name>.solution`) and a code folder given by path (a model.py). Problems, found
then or during the run's setup, are UserInputErrors: exit status 2 and one line naming the problem.
"""
from __future__ import annotations

import argparse

from tools.errors import UserInputError
from tools.kit import export, inputs
from tools.kit.errors import KitRunError
from tools.kit.run import add_arguments, run_kit


def check_inputs(args: argparse.Namespace) -> None:
    """KitRunError for a kit, dataset or code folder the run would refuse (`kit:` names are checked by
    the run itself, in its export of the kit)."""
    export.check(args.kit, args.kit_rev)
    if not args.dataset_dir.startswith(inputs.KIT_PREFIX):
        inputs.dataset_task(inputs.resolve(args.dataset_dir, "", "dataset"))
    if not args.code_dir.startswith(inputs.KIT_PREFIX):
        inputs.check_code_dir(inputs.resolve(args.code_dir, "", "code"))


def run(args: argparse.Namespace) -> int:
    try:
        check_inputs(args)
        return run_kit(args)
    except KitRunError as exc:
        raise UserInputError(str(exc)) from None


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "kit", help="run a model.py through the official AutoDL starting kit's ingestion and scoring",
        description="Run a model.py through the genuine, unmodified ingestion and scoring programs of the "
                    "AutoDL starting kit (github.com/zhengying-liu/autodl_starting_kit_stable; point at your "
                    "copy with --kit or $AUTODL_KIT_GIT). Last stdout line: ALC=.. NAUC=.. n_predictions=.. "
                    "duration=..; details in OUT/summary.json. Exit status 0 when a prediction was scored, "
                    "3 when none, 2 on a usage problem.")
    add_arguments(parser)
    parser.set_defaults(func=run)
