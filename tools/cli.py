"""`tools` console script: one entry point, one module per subcommand.

Each subcommand module exposes `register(subparsers)`, which adds its parser and
sets `func` (called with the parsed args, returns an exit code). Modules are
imported lazily so that `tools convert` does not pay for importing torch.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from tools.errors import UserInputError  # re-exported: tools.cli.UserInputError

SUBCOMMANDS = {
    "convert": "tools.convert",
    "run": "tools.runner",
    "run-npz": "tools.npz_run",
    "bench": "tools.bench",
    "bench-npz": "tools.bench_npz",
    "meta-train": "tools.meta_train",
    "package": "tools.package",
    "demo": "tools.demo",
    "faults": "tools.faults.suite",
    "replay": "tools.replay",
    "corpus": "tools.corpus.command",
    "speed": "tools.speed",
    "frozen-probe": "tools.frozen_probe",
    "split-check": "tools.split_check",
    "lp-ft-start": "tools.lp_ft_start",
    "kit": "tools.kit.command",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tools", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in SUBCOMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=f"(see `tools {name} -h`)")
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue  # subcommand not built yet
        module.register(sub)
    parser.subcommand_parsers = sub.choices  # main: a subcommand's own parser reports its unknown arguments
    return parser


def _version() -> str:
    """The project's version: autodl_core.__version__ (pyproject.toml reads it from there too)."""
    from autodl_core import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    only = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    parser = build_parser(only)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # argparse hands a subcommand's unknown arguments up: report them with that subcommand's usage
        command_parser = parser.subcommand_parsers.get(getattr(args, "command", None) or "", parser)
        command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
