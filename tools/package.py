"""`tools package`: the challenge submission zip (model.py, our packages, backbone weights, vendored timm).

The platform unpacks the zip and imports model.py from its root; it has torch and TensorFlow but neither
our packages, nor the pip weight packages, nor timm. So the zip carries: model.py and the project's LICENSE;
autodl_core/ and pretrained/ whole; meta_db/ as far as the submission imports it (``submission_modules``:
the selector and what it needs, with the shipped store files; the offline-only modules, meta-evaluation,
measuring batches, dataset variants, stay out); weights/ with one exported file per backbone the shipped
pipelines can choose (model.py points $AUTODL_WEIGHTS_DIR there) and licenses/ with the licence files of
the packages those weights come from; vendor/ with pure-Python dependencies (model.py puts it on
sys.path), less the files the solver never reads (VENDOR_LEAVE_OUT: timm's ImageNet label text); and
MANIFEST.json saying what went in, what was left out, and under which licences. A zip over --max-mb is
refused (exit 2, nothing left behind), since the platform rejects oversized submissions.

`--verify DATASET` then unpacks the zip and runs it through the official kit (tools/kit/run.py, as
`tools kit` does) in an environment where the pip weight packages, huggingface_hub and safetensors
cannot be imported, and checks that timm and our packages were imported from the unpacked copy.
"""
from __future__ import annotations

import argparse
import ast
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
# Shipped only as far as the submission imports them (``submission_modules``), plus their data files
# (meta_db's store); the other packages ship whole.
PRUNED_PACKAGES = ("meta_db",)
ENTRY_POINT = "model.py"
LICENSE_FILE = "LICENSE"  # the project's licence, shipped at the zip root
MANIFEST_NAME = "MANIFEST.json"
WEIGHTS_FOLDER = "weights"
LICENSES_FOLDER = "licenses"  # licence files of the packages the shipped weights come from
VENDOR_FOLDER = "vendor"
DEFAULT_VENDOR = ("timm",)
# Vendored files the solver never reads, by path prefix inside vendor/: timm's ImageNet class names and
# subset maps (timm/data/_info/), read only by timm.data.ImageNetInfo and RealLabelsImagenet.
VENDOR_LEAVE_OUT = {"timm": ("timm/data/_info/",)}
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
    plus meta_db's own list when it offers one (``selectable_backbones()`` in meta_db.selector or
    meta_db.store), else the backbones of the pipelines in use in the shipped store (meta_db/store.sqlite,
    or ``store_path``): not retired, with measured runs of a code version in use, as the selector can pick
    any of those (``_store_backbones``). A retired pipeline's backbone ships only when the default steps
    use it. Unregistered backbones are left out: the selector skips them too.
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
        names.extend(_store_backbones(store_path))
    registered = set(list_backbones())
    return [default] + [name for name in dict.fromkeys(names) if name in registered and name != default]


def _store_backbones(store_path: str | os.PathLike | None) -> list[str]:
    """Backbones the pipelines in use in the meta-knowledge store run ([] when there is no store).

    The live pipelines (``meta_db.portfolio.live_pipelines``, every backbone allowed: the zip is what makes
    them runnable), each as model.py runs it, i.e. as the first of the any-time steps, so the steps'
    backbones count too.
    """
    try:
        from meta_db.store import DEFAULT_STORE_PATH, Store
    except ModuleNotFoundError as error:
        if error.name not in ("meta_db.store",):
            raise
        return []
    from meta_db.portfolio import live_pipelines

    path = Path(store_path) if store_path is not None else Path(DEFAULT_STORE_PATH)
    if not path.is_file():
        return []
    with Store(path, readonly=True) as store:
        live = live_pipelines(store.pipelines_in_use())
    return [name for _, config in live.values() for name in config.as_steps().step_backbone_names()]


def _skipped(relative: Path) -> bool:
    parts = relative.parts
    if any(part in SKIP_DIRS or part.startswith(".") for part in parts):
        return True
    return relative.name.endswith(SKIP_SUFFIXES)


def _module_file(root: Path, module: str) -> Path | None:
    """The file of our module ``module`` (dotted name) under ``root``, or None when there is none."""
    base = root.joinpath(*module.split("."))
    for candidate in (base.parent / f"{base.name}.py", base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path, module: str) -> set[str]:
    """Dotted names of the modules ``path`` (the module named ``module``) may import, every import
    statement counted, those inside functions too. Relative imports are resolved; ``from X import Y``
    counts X and X.Y (Y may be a submodule); importing a.b.c counts a and a.b as well (Python runs their
    ``__init__``)."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if node.level - 1 > len(package):
                    continue
                parts = package[:len(package) - (node.level - 1)] + ([node.module] if node.module else [])
                base = ".".join(parts)
            else:
                base = node.module or ""
            if base:
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return {".".join(name.split(".")[:i]) for name in found for i in range(1, name.count(".") + 2)}


def submission_modules(root: Path = REPO_ROOT, packages: tuple[str, ...] = PACKAGES,
                       pruned: tuple[str, ...] = PRUNED_PACKAGES) -> dict[str, Path]:
    """{dotted name: file} of our modules the unpacked submission can import: the import closure (every
    import statement, inside functions too) of model.py and of every module of the packages shipped
    whole, within ``packages``. A module of a ``pruned`` package outside it is offline-only code."""
    entry = root / ENTRY_POINT
    queue = [("model", entry)] if entry.is_file() else []
    for package in packages:
        if package not in pruned:
            for path in sorted((root / package).rglob("*.py")):
                relative = path.relative_to(root)
                if not _skipped(relative):
                    parts = relative.with_suffix("").parts
                    queue.append((".".join(parts[:-1] if parts[-1] == "__init__" else parts), path))
    found = dict(queue)
    while queue:
        module, path = queue.pop()
        for name in sorted(imported_modules(path, module)):
            if name in found or name.partition(".")[0] not in packages:
                continue
            file = _module_file(root, name)
            if file is not None:
                found[name] = file
                queue.append((name, file))
    found.pop("model", None)
    return found


def offline_only_modules(root: Path = REPO_ROOT) -> list[str]:
    """Files (relative, posix) of the pruned packages' modules the submission never imports: left out."""
    needed = {path.resolve() for path in submission_modules(root).values()}
    return sorted(path.relative_to(root).as_posix() for package in PRUNED_PACKAGES
                  for path in (root / package).rglob("*.py")
                  if not _skipped(path.relative_to(root)) and path.resolve() not in needed)


def package_files(root: Path = REPO_ROOT) -> list[tuple[Path, str]]:
    """(source file, name in the zip) for model.py, the project's LICENSE and every shippable file of our
    packages: all of autodl_core and pretrained; of meta_db, the modules the submission imports
    (``submission_modules``) and every data file (the store)."""
    entry = root / ENTRY_POINT
    if not entry.is_file():
        raise UserInputError(f"{entry} not found: the submission needs model.py at the repository root")
    files = [(entry, ENTRY_POINT)]
    if (root / LICENSE_FILE).is_file():
        files.append((root / LICENSE_FILE, LICENSE_FILE))
    for package in PACKAGES:
        if not (root / package / "__init__.py").is_file():
            raise UserInputError(f"{root / package} is not a Python package (no __init__.py)")
    left_out = set(offline_only_modules(root))
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*")):
            relative = path.relative_to(root)
            if path.is_file() and not _skipped(relative) and relative.as_posix() not in left_out:
                files.append((path, relative.as_posix()))
    return files


def _vendor_left_out(distribution: str, relative: str) -> bool:
    return relative.startswith(VENDOR_LEAVE_OUT.get(distribution, ()))


def _dist_licence_files(dist: importlib.metadata.Distribution) -> list[tuple[Path, str]]:
    """(file, path inside site-packages) of a distribution's licence files in its dist-info."""
    found = []
    for record in dist.files or []:
        posix = record.as_posix()
        if ".dist-info/" in posix and any(word in posix.lower() for word in ("licen", "copying", "notice")):
            found.append((Path(record.locate()), posix))
    return found


def distribution_license(name: str) -> str:
    """The licence an installed distribution declares (License-Expression, a one-line License field, or
    its licence classifiers), or "unknown (see NAME)" when it declares none."""
    try:
        metadata = importlib.metadata.metadata(name)
    except importlib.metadata.PackageNotFoundError:
        return f"unknown (see {name}; not installed here)"
    expression = (metadata.get("License-Expression") or "").strip()
    if expression:
        return expression
    declared = (metadata.get("License") or "").strip()
    if declared and declared.upper() not in ("UNKNOWN", "NONE") and "\n" not in declared and len(declared) <= 100:
        return declared
    classifiers = [c.split("::")[-1].strip() for c in metadata.get_all("Classifier") or []
                   if c.startswith("License ::")]
    classifiers = [c for c in classifiers if c and c != "OSI Approved"]
    return ", ".join(classifiers) if classifiers else f"unknown (see {name})"


def project_license(root: Path = REPO_ROOT) -> dict:
    """The project's own licence (pyproject.toml's SPDX ``license``) and its file in the zip."""
    license_name = f"unknown (see {LICENSE_FILE})"
    try:
        import tomllib

        project = tomllib.loads((root / "pyproject.toml").read_text()).get("project", {})
        declared = project.get("license")
        if isinstance(declared, dict):
            declared = declared.get("text")
        if isinstance(declared, str) and declared.strip():
            license_name = declared.strip()
    except (ImportError, OSError, ValueError):
        pass
    return {"license": license_name, "file": LICENSE_FILE if (root / LICENSE_FILE).is_file() else None}


def weight_licence_files(backbones: list[str]) -> list[tuple[Path, str]]:
    """(file, zip name) of the licence files of the pip packages the backbones' weights come from,
    under licenses/<package>/."""
    from pretrained import get_spec

    files = []
    for package in dict.fromkeys(get_spec(name).source.pip_package for name in backbones if get_spec(name).source):
        try:
            dist = importlib.metadata.distribution(package)
        except importlib.metadata.PackageNotFoundError:
            continue
        files += [(path, f"{LICENSES_FOLDER}/{package}/{Path(posix).name}") for path, posix in _dist_licence_files(dist)]
    return files


def weight_origin(name: str, zip_names: list[str] | tuple[str, ...] = ()) -> dict:
    """Where a shipped weight file comes from and under which licence: the registry's word on the
    weights (pretrained.registry's WeightSource.license) and what the pip package declares."""
    from pretrained import get_spec

    spec = get_spec(name)
    source = spec.source
    if source is None:
        return {"backbone": name, "timm_arch": spec.timm_arch, "origin": f"timm hub tag {spec.hub_tag}",
                "license": f"unknown (see the model card of {spec.hub_tag})"}
    try:
        version = importlib.metadata.version(source.pip_package)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    package_license = distribution_license(source.pip_package)
    prefix = f"{LICENSES_FOLDER}/{source.pip_package}/"
    return {"backbone": name, "timm_arch": spec.timm_arch, "origin": f"pip package {source.pip_package}",
            "pip_package": source.pip_package, "version": version,
            "license": source.license or package_license, "package_license": package_license,
            "license_files": [zip_name for zip_name in zip_names if zip_name.startswith(prefix)]}


def vendor_files(distributions: tuple[str, ...] | list[str]) -> tuple[list[tuple[Path, str]], dict, list[str]]:
    """Installed pure-Python packages to ship under vendor/: (file, zip name) pairs, {name: version} and
    the zip names left out (VENDOR_LEAVE_OUT: files the solver never reads).

    Copies the package folder as installed (no __pycache__) plus the licence and METADATA of its
    dist-info; refuses a package holding compiled extensions, which would not load on another platform.
    """
    files: list[tuple[Path, str]] = []
    versions = {}
    left_out: list[str] = []
    for name in distributions:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise UserInputError(f"cannot vendor {name!r}: it is not an installed package here")
        folder = Path(list(spec.submodule_search_locations)[0])
        for path in sorted(folder.rglob("*")):
            relative = path.relative_to(folder.parent)
            if not path.is_file() or _skipped(relative):
                continue
            if _vendor_left_out(name, relative.as_posix()):
                left_out.append(f"{VENDOR_FOLDER}/{relative.as_posix()}")
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
        shipped = {zip_name for _, zip_name in files}
        for path, posix in _dist_licence_files(dist):
            if f"{VENDOR_FOLDER}/{posix}" not in shipped:
                files.append((path, f"{VENDOR_FOLDER}/{posix}"))
        for record in dist.files or []:
            posix = record.as_posix()
            if ".dist-info/" in posix and posix.endswith("/METADATA"):
                files.append((Path(record.locate()), f"{VENDOR_FOLDER}/{posix}"))
    return files, versions, left_out


def vendor_licenses(versions: dict, zip_names: list[str] | tuple[str, ...] = ()) -> dict:
    """{vendored package: version, declared licence, its licence files in the zip}."""
    licenses = {}
    for name, version in versions.items():
        try:  # e.g. vendor/timm-1.0.31.dist-info/licenses/LICENSE
            candidates = [f"{VENDOR_FOLDER}/{posix}" for _, posix in
                          _dist_licence_files(importlib.metadata.distribution(name))]
        except importlib.metadata.PackageNotFoundError:
            candidates = []
        licenses[name] = {"version": version, "license": distribution_license(name),
                          "files": [zip_name for zip_name in candidates if zip_name in zip_names]}
    return licenses


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
    vendored, versions, vendor_left_out = vendor_files(vendor)
    partial = out.with_name(out.name + ".partial")
    try:
        with tempfile.TemporaryDirectory(prefix="weights_") as scratch:
            weights = [export_weight_file(name, Path(scratch), half=half) for name in backbones]
            files += [(path, f"{WEIGHTS_FOLDER}/{path.name}") for path in weights]
            files += weight_licence_files(backbones) + vendored
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
                "licenses": {
                    "project": project_license(root),
                    "vendor": vendor_licenses(versions, names),
                    "weights": {f"{WEIGHTS_FOLDER}/{path.name}": weight_origin(name, names)
                                for name, path in zip(backbones, weights)},
                },
                "left_out": {"offline_modules": offline_only_modules(root), "vendor": vendor_left_out},
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
        description="Build the submission zip: model.py, LICENSE, autodl_core/, pretrained/, the meta_db modules "
                    "the submission imports (with the store), weights/ (exported backbone weights) and licenses/ "
                    "(their packages' licence files), vendor/ (pure-Python dependencies, less files the solver "
                    "never reads) and MANIFEST.json (files, sizes, licences, what was left out).")
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
