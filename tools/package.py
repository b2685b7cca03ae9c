"""`tools package`: the challenge submission zip (model.py, our packages, backbone weights, vendored timm).

The platform unpacks the zip and imports model.py from its root; it has torch and TensorFlow but neither
our packages, nor the pip weight packages, nor timm. So the zip carries: model.py; autodl_core/, meta_db/
(with its shipped store files) and pretrained/; weights/ with one exported file per backbone the shipped
pipelines can choose (model.py points $AUTODL_WEIGHTS_DIR there); vendor/ with pure-Python dependencies
(model.py puts it on sys.path); and MANIFEST.json saying what went in. A zip over --max-mb is refused
(exit 2, nothing left behind), since the platform rejects oversized submissions.

`--verify DATASET` then unpacks the zip and runs it through the official kit (tools/kit/run.py, as
`tools kit` does) in an environment where the pip weight packages, huggingface_hub and safetensors
cannot be imported, and checks that timm and our packages were imported from the unpacked copy.
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from tools.errors import UserInputError
from tools.provenance import git_head
from tools.shared_paths import REPO_ROOT, default_kit_run

PACKAGES = ("autodl_core", "meta_db", "pretrained")  # not autodl_data: no shipped module imports it when imported
ENTRY_POINT = "model.py"
MANIFEST_NAME = "MANIFEST.json"
WEIGHTS_FOLDER = "weights"
VENDOR_FOLDER = "vendor"
DEFAULT_VENDOR = ("timm",)
DEFAULT_MAX_MB = 300.0
# Never shipped: test code, the CLI, caches, editor/OS clutter, SQLite side files of an open store.
SKIP_DIRS = {"__pycache__", "tests", "test", "tools", ".git", ".pytest_cache"}
SKIP_SUFFIXES = (".pyc", ".pyo", "~", ".swp", ".orig", ".rej", "-journal", "-wal", "-shm")
BINARY_SUFFIXES = (".so", ".pyd", ".dll", ".dylib")
# Imports that must not be needed by the unpacked submission (the platform lacks them).
HIDDEN_WHEN_VERIFYING = ("huggingface_hub", "safetensors")
WATCHED_WHEN_VERIFYING = ("timm",) + PACKAGES


@dataclass
class PackageResult:
    """What build_submission wrote: the zip, its size and the manifest stored inside it."""

    path: Path
    size_bytes: int
    manifest: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- what goes in
def backbones_needed(store_path: str | os.PathLike | None = None) -> list[str]:
    """Backbones the shipped pipelines can select (weights must ship for each, or the solver cannot start).

    Always the default PipelineConfig's backbone (the selector's fallback) and the backbones its any-time
    steps move on to (without their weights a step is left out and the run stops buying quality early);
    plus meta_db's own list when it
    offers one (``selectable_backbones()`` in meta_db.selector or meta_db.store), else the backbone of every
    pipeline with measured runs in the shipped store (meta_db/store.sqlite, or ``store_path``), as the
    selector can pick any of those. Unregistered backbones are left out: the selector skips them too.
    """
    from autodl_core.config import PipelineConfig
    from pretrained import list_backbones

    default_config = PipelineConfig()
    default = default_config.backbone
    names = default_config.step_backbone_names()
    offered = False
    for module_name in ("meta_db.selector", "meta_db.store"):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise
            continue
        offer = getattr(module, "selectable_backbones", None)
        if callable(offer):
            names.extend(str(name) for name in offer())
            offered = True
    if not offered:
        names.extend(_store_backbones(store_path, default))
    registered = set(list_backbones())
    return [default] + [name for name in dict.fromkeys(names) if name in registered and name != default]


def _store_backbones(store_path: str | os.PathLike | None, default: str) -> list[str]:
    """Backbones of the pipelines that have runs in the meta-knowledge store ([] when there is no store)."""
    try:
        from meta_db.store import DEFAULT_STORE_PATH, Store
    except ModuleNotFoundError as error:
        if error.name not in ("meta_db.store",):
            raise
        return []
    path = Path(store_path) if store_path is not None else Path(DEFAULT_STORE_PATH)
    if not path.is_file():
        return []
    with Store(path, readonly=True) as store:
        measured = {pipeline_id for _, pipeline_id in store.alc_table()}
        return [str(raw.get("backbone", default)) for pipeline_id, _, raw in store.pipelines()
                if pipeline_id in measured]


def _skipped(relative: Path) -> bool:
    parts = relative.parts
    if any(part in SKIP_DIRS or part.startswith(".") for part in parts):
        return True
    return relative.name.endswith(SKIP_SUFFIXES)


def package_files(root: Path = REPO_ROOT) -> list[tuple[Path, str]]:
    """(source file, name in the zip) for model.py and every shippable file of our packages."""
    entry = root / ENTRY_POINT
    if not entry.is_file():
        raise UserInputError(f"{entry} not found: the submission needs model.py at the repository root")
    files = [(entry, ENTRY_POINT)]
    for package in PACKAGES:
        folder = root / package
        if not (folder / "__init__.py").is_file():
            raise UserInputError(f"{folder} is not a Python package (no __init__.py)")
        for path in sorted(folder.rglob("*")):
            relative = path.relative_to(root)
            if path.is_file() and not _skipped(relative):
                files.append((path, relative.as_posix()))
    return files


def vendor_files(distributions: tuple[str, ...] | list[str]) -> tuple[list[tuple[Path, str]], dict]:
    """Installed pure-Python packages to ship under vendor/: (file, zip name) pairs and {name: version}.

    Copies the package folder as installed (no __pycache__) plus the licence and METADATA of its
    dist-info; refuses a package holding compiled extensions, which would not load on another platform.
    """
    files: list[tuple[Path, str]] = []
    versions = {}
    for name in distributions:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise UserInputError(f"cannot vendor {name!r}: it is not an installed package here")
        folder = Path(list(spec.submodule_search_locations)[0])
        for path in sorted(folder.rglob("*")):
            relative = path.relative_to(folder.parent)
            if not path.is_file() or _skipped(relative):
                continue
            if path.name.endswith(BINARY_SUFFIXES) or ".so." in path.name:
                raise UserInputError(f"cannot vendor {name!r}: {path} is a compiled extension (not pure Python)")
            files.append((path, f"{VENDOR_FOLDER}/{relative.as_posix()}"))
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "unknown"
            continue
        versions[name] = dist.version
        for record in dist.files or []:
            posix = record.as_posix()
            if ".dist-info/" in posix and ("licen" in posix.lower() or posix.endswith("/METADATA")):
                files.append((Path(record.locate()), f"{VENDOR_FOLDER}/{posix}"))
    return files, versions


def export_weight_file(name: str, dest: Path, *, half: bool = False) -> Path:
    """Write ``dest/<name>.pt``: the backbone's weights under timm names, without the ImageNet head.

    A torch-pickled file (not safetensors) so that the submission does not need the compiled safetensors
    package; pretrained.read_state_dict / create_backbone(weights_dir=dest) read it.
    """
    import torch

    from pretrained import IncompatibleWeightsError, UnreadableWeightsError, WeightsNotFoundError, export_weights, get_spec
    from pretrained.weight_files import read_state_dict

    try:
        get_spec(name)
    except KeyError as error:
        raise UserInputError(str(error.args[0])) from None
    with tempfile.TemporaryDirectory(prefix="export_") as scratch:
        try:
            exported = export_weights(name, scratch, half=half, include_classifier=False)
        except (WeightsNotFoundError, UnreadableWeightsError, IncompatibleWeightsError) as error:
            raise UserInputError(f"cannot ship backbone {name!r}: {error}") from None
        state, metadata = read_state_dict(exported)  # floats come back as fp32
        if half:
            state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
        path = dest / f"{name}.pt"
        torch.save({"state_dict": state, "metadata": metadata}, path)
    return path


def git_commit(root: Path = REPO_ROOT) -> dict:
    """HEAD commit and whether the work tree differs from it, or {} outside a git checkout."""
    head = git_head(root)
    return {} if head is None else {"commit": head[0], "dirty": head[1]}


# --------------------------------------------------------------------------- building the zip
def _largest(entries: list[zipfile.ZipInfo], count: int = 8) -> str:
    top = sorted(entries, key=lambda info: info.compress_size, reverse=True)[:count]
    return "\n".join(f"  {info.compress_size / 1e6:8.2f} MB  {info.filename}" for info in top)


def build_submission(
    out: str | os.PathLike,
    *,
    backbones: list[str] | None = None,
    vendor: tuple[str, ...] | list[str] = DEFAULT_VENDOR,
    max_mb: float = DEFAULT_MAX_MB,
    half: bool = False,
    root: Path = REPO_ROOT,
) -> PackageResult:
    """Write the submission zip to ``out``; raise UserInputError (and leave no file) when it exceeds max_mb."""
    if max_mb <= 0:
        raise UserInputError(f"--max-mb must be positive, got {max_mb}")
    out = Path(out).resolve()
    if out.suffix.lower() != ".zip":
        raise UserInputError(f"--out must end in .zip, got {out.name!r}")
    if not out.parent.is_dir():
        raise UserInputError(f"output folder {out.parent} does not exist")
    backbones = list(dict.fromkeys(backbones if backbones is not None else backbones_needed()))

    files = package_files(root)
    vendored, versions = vendor_files(vendor)
    partial = out.with_name(out.name + ".partial")
    try:
        with tempfile.TemporaryDirectory(prefix="weights_") as scratch:
            weights = [export_weight_file(name, Path(scratch), half=half) for name in backbones]
            files += [(path, f"{WEIGHTS_FOLDER}/{path.name}") for path in weights] + vendored
            names = [name for _, name in files]
            duplicates = {name for name in names if names.count(name) > 1}
            if duplicates:
                raise UserInputError(f"several files would share a zip name: {sorted(duplicates)}")
            manifest = {
                "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "git": git_commit(root),
                "python": sys.version.split()[0],
                "backbones": backbones,
                "weights": {"dtype": "float16" if half else "float32", "classifier": False,
                            "folder": WEIGHTS_FOLDER},
                "vendor": versions,
                "files": [{"name": name, "bytes": path.stat().st_size} for path, name in files],
            }
            with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as archive:
                for path, name in files:
                    archive.write(path, name)
                archive.writestr(MANIFEST_NAME, json.dumps(manifest, indent=1))
                entries = archive.infolist()
        size = partial.stat().st_size
        if size > max_mb * 1e6:
            raise UserInputError(
                f"the submission would be {size / 1e6:.1f} MB, over the {max_mb:g} MB cap (--max-mb); "
                f"nothing written. Largest entries (compressed):\n{_largest(entries)}")
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    print(f"wrote {out}: {size / 1e6:.1f} MB, {len(entries)} entries; backbones {', '.join(backbones) or 'none'}; "
          f"vendored {', '.join(f'{k} {v}' for k, v in versions.items()) or 'nothing'}")
    print(f"largest entries (compressed):\n{_largest(entries)}")
    return PackageResult(out, size, manifest)


# --------------------------------------------------------------------------- checking an unpacked copy
_GUARD_SOURCE = '''\
"""Written by `tools package --verify`: hides modules the platform lacks, logs where watched ones come from."""
import json, os, sys
_HIDDEN = set({hidden!r})
_WATCHED = set({watched!r})
_LOG = {log!r}

def _note(record):
    record["pid"] = os.getpid()
    with open(_LOG, "a") as handle:
        handle.write(json.dumps(record) + "\\n")

class _SubmissionGuard:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] in _HIDDEN:
            _note({{"hidden": name}})
            raise ModuleNotFoundError("%s is hidden by tools package --verify" % name, name=name)
        if name not in _WATCHED:
            return None
        for finder in sys.meta_path:
            if finder is cls or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                _note({{"module": name, "origin": spec.origin}})
                return spec
        return None

sys.meta_path.insert(0, _SubmissionGuard)
'''


def hidden_modules() -> list[str]:
    """Modules an unpacked submission must run without: the pip weight packages, huggingface_hub, safetensors."""
    from pretrained import get_spec, list_backbones

    modules = {get_spec(name).source.module for name in list_backbones() if get_spec(name).source}
    return sorted(modules) + list(HIDDEN_WHEN_VERIFYING)


def isolated_env(guard_dir: Path, log_path: Path) -> dict:
    """Environment for running an unpacked submission as the platform would: no user site, no weights dir
    preset, and a sitecustomize that hides `hidden_modules()` and logs where timm and our packages load from."""
    guard_dir.mkdir(parents=True, exist_ok=True)
    (guard_dir / "sitecustomize.py").write_text(_GUARD_SOURCE.format(
        hidden=hidden_modules(), watched=list(WATCHED_WHEN_VERIFYING), log=str(log_path)))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "AUTODL_WEIGHTS_DIR", "PYTHONHOME")}
    env.update(PYTHONNOUSERSITE="1", PYTHONPATH=str(guard_dir), PYTHONDONTWRITEBYTECODE="1")
    return env


def import_origins(log_path: Path) -> tuple[dict[str, set[str]], set[str]]:
    """From the guard's log: {module: origins seen} and the hidden modules something tried to import."""
    origins: dict[str, set[str]] = {}
    hidden: set[str] = set()
    if log_path.is_file():
        for line in log_path.read_text().splitlines():
            record = json.loads(line)
            if "module" in record:
                origins.setdefault(record["module"], set()).add(str(record["origin"]))
            else:
                hidden.add(record["hidden"])
    return origins, hidden


def foreign_imports(origins: dict[str, set[str]], code_dir: Path) -> list[str]:
    """Watched modules that were loaded from outside ``code_dir`` (or never loaded at all)."""
    code_dir = code_dir.resolve()
    problems = [f"{module}: never imported" for module in WATCHED_WHEN_VERIFYING if module not in origins]
    for module, paths in sorted(origins.items()):
        for origin in paths:
            if not Path(origin).resolve().is_relative_to(code_dir):
                problems.append(f"{module}: loaded from {origin}, outside {code_dir}")
    return problems


def kit_run_command(code_dir: Path, dataset: str, budget: float, out_dir: Path, python: str | None = None,
                    kit_run: str | None = None) -> list[str]:
    """The kit_run command line for one run of ``code_dir`` (graph mode, the challenge's TF semantics)."""
    python = python or os.environ.get("KIT_PYTHON") or sys.executable
    kit_run = kit_run or default_kit_run()
    return [python, kit_run, "--code-dir", str(code_dir), "--dataset-dir", dataset, "--time-budget",
            f"{budget:g}", "--out", str(out_dir), "--tf-mode", "graph", "--python", python]


@dataclass
class VerifyResult:
    """Outcome of one isolated kit run of an unpacked submission."""

    returncode: int
    score_line: str
    scores: dict  # ALC, NAUC, n_predictions, duration parsed from the score line ({} when missing)
    origins: dict  # watched module -> set of files it was loaded from
    hidden: set  # hidden modules something tried to import (and was refused)
    problems: list  # watched modules loaded from outside the unpacked copy
    stderr_tail: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.problems and self.scores.get("n_predictions", 0) >= 1


def parse_score_line(line: str) -> dict:
    """kit_run's last line `ALC=.. NAUC=.. n_predictions=.. duration=..` as numbers ({} when malformed)."""
    scores = {}
    for token in line.split():
        key, sep, value = token.partition("=")
        if not sep:
            return {}
        try:
            scores[key] = int(value) if key == "n_predictions" else float(value)
        except ValueError:
            return {}
    return scores if {"ALC", "NAUC", "n_predictions"} <= set(scores) else {}


def verify_submission(zip_path: Path, dataset: str, budget: float, work_dir: Path,
                      unzip_dir: Path | None = None) -> VerifyResult:
    """Unpack ``zip_path`` (into unzip_dir, default work_dir/unzipped, emptied first) and run it through
    kit_run in the isolated environment; kit_run's output goes to work_dir/kit_out."""
    if not os.environ.get("AUTODL_KIT_GIT"):
        raise UserInputError("--verify needs $AUTODL_KIT_GIT (the official starting kit's git dir)")
    work_dir = Path(work_dir).resolve()
    unzipped = Path(unzip_dir).resolve() if unzip_dir is not None else work_dir / "unzipped"
    shutil.rmtree(unzipped, ignore_errors=True)
    with zipfile.ZipFile(zip_path) as archive:
        archive.extractall(unzipped)
    log_path = work_dir / "imports.jsonl"
    log_path.unlink(missing_ok=True)
    env = isolated_env(work_dir / "guard", log_path)
    kit_out = work_dir / "kit_out"
    command = kit_run_command(unzipped, dataset, budget, kit_out)
    completed = subprocess.run(command, env=env, cwd=work_dir, capture_output=True, text=True)
    lines = completed.stdout.strip().splitlines()
    score_line = lines[-1] if lines else ""
    origins, hidden = import_origins(log_path)
    # kit_run copies the code dir to OUT/code and runs that copy.
    problems = foreign_imports(origins, kit_out / "code")
    # pretrained only looks for a weight package when $AUTODL_WEIGHTS_DIR (weights/) lacks the file.
    problems += [f"weights: looked for the pip package {module} (its file is not in {WEIGHTS_FOLDER}/)"
                 for module in sorted(hidden) if module.partition(".")[0] not in HIDDEN_WHEN_VERIFYING]
    return VerifyResult(completed.returncode, score_line, parse_score_line(score_line), origins, hidden,
                        problems, completed.stderr[-3000:])


def print_verification(result: VerifyResult) -> None:
    print(result.score_line or "(kit_run printed no score line)")
    for module, paths in sorted(result.origins.items()):
        print(f"  {module} loaded from {', '.join(sorted(paths))}")
    print(f"  hidden modules something tried to import: {', '.join(sorted(result.hidden)) or 'none'}")
    if not result.ok:
        print(result.stderr_tail, file=sys.stderr)
        for problem in result.problems:
            print(f"problem: {problem}", file=sys.stderr)
    print("verification " + ("passed" if result.ok else f"FAILED (kit_run exit {result.returncode})"))


# --------------------------------------------------------------------------- CLI
def run(args: argparse.Namespace) -> int:
    vendor = [] if args.no_vendor else list(args.vendor or DEFAULT_VENDOR)
    if args.verify and not os.environ.get("KIT_PYTHON"):  # the kit runs under this interpreter
        from tools.tf_support import require_tensorflow

        require_tensorflow("--verify runs the official kit under this Python; or set KIT_PYTHON to one that has it")
    result = build_submission(args.out, backbones=args.backbones, vendor=vendor, max_mb=args.max_mb,
                              half=args.half)
    if args.verify:
        work_dir = Path(args.verify_dir or tempfile.mkdtemp(prefix="verify_submission_")).resolve()
        work_dir.mkdir(parents=True, exist_ok=True)
        print(f"verifying in {work_dir} ...", flush=True)
        verification = verify_submission(result.path, args.verify, args.verify_budget, work_dir)
        print_verification(verification)
        return 0 if verification.ok else 1
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "package", help="build the challenge submission zip",
        description="Build the submission zip: model.py, autodl_core/, meta_db/, pretrained/, weights/ "
                    "(exported backbone weights), vendor/ (pure-Python dependencies) and MANIFEST.json.")
    parser.add_argument("--out", default="submission.zip", help="zip to write (default: submission.zip)")
    parser.add_argument("--backbones", nargs="+", metavar="NAME",
                        help="backbones whose weights to ship (default: those the shipped pipelines can select)")
    parser.add_argument("--max-mb", type=float, default=DEFAULT_MAX_MB,
                        help="refuse to write a zip larger than this many MB (default: 300)")
    parser.add_argument("--no-vendor", action="store_true", help="ship no vendored dependencies")
    parser.add_argument("--vendor", nargs="+", metavar="PACKAGE",
                        help=f"pure-Python packages to ship under vendor/ (default: {' '.join(DEFAULT_VENDOR)})")
    parser.add_argument("--half", action="store_true",
                        help="store weights as float16 (half the size; pooled features change by ~1e-2 relative)")
    parser.add_argument("--verify", metavar="DATASET",
                        help="then run the unpacked zip through the official kit (tools/kit/run.py) on DATASET "
                             "(e.g. kit:miniciao), hiding the weight packages, and check it only used its own files")
    parser.add_argument("--verify-budget", type=float, default=60.0, help="time budget of the --verify run (s)")
    parser.add_argument("--verify-dir", help="work folder of the --verify run (default: a new temporary folder)")
    parser.set_defaults(func=run)
