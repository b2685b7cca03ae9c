"""What `tools package` puts in the zip, checked without building it (no weights, no torch): meta_db only as
far as the submission imports it, timm without its ImageNet label text, the licences it names."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tools import package

ROOT = package.REPO_ROOT


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_submission_modules_follow_every_import_statement(tmp_path):
    """Module level and inside functions, absolute and relative, `from package import submodule`."""
    _write(tmp_path, {
        "model.py": "import os\nfrom autodl_core.solver import Solver\n\n"
                    "def set_up():\n    from meta_db.selector import choose\n",
        "autodl_core/__init__.py": "",
        "autodl_core/solver.py": "from . import util\n",
        "autodl_core/util.py": "",
        "pretrained/__init__.py": "from .registry import spec\n",
        "pretrained/registry.py": "",
        "meta_db/__init__.py": "",
        "meta_db/selector.py": "from . import store\nfrom .portfolio import ids\n\n"
                               "def later():\n    import meta_db.metafeatures\n",
        "meta_db/store.py": "",
        "meta_db/portfolio.py": "from meta_db import store\n",
        "meta_db/metafeatures.py": "def offline():\n    from autodl_data.formats import read\n",
        "meta_db/evaluate.py": "from meta_db.selector import choose\nfrom meta_db.batches import fit\n",
        "meta_db/batches.py": "",
        "meta_db/store.sqlite": "",
        "meta_db/sub/__init__.py": "",
        "meta_db/sub/tool.py": "from ..store import x\n",
    })
    modules = package.submission_modules(tmp_path)
    assert {name for name in modules if name.startswith("meta_db")} == {
        "meta_db", "meta_db.selector", "meta_db.store", "meta_db.portfolio", "meta_db.metafeatures"}
    assert {"autodl_core", "autodl_core.solver", "autodl_core.util", "pretrained", "pretrained.registry"} <= set(modules)
    assert "autodl_data.formats" not in modules  # not one of the shipped packages
    assert package.offline_only_modules(tmp_path) == [
        "meta_db/batches.py", "meta_db/evaluate.py", "meta_db/sub/__init__.py", "meta_db/sub/tool.py"]
    names = {name for _, name in package.package_files(tmp_path)}
    assert {"model.py", "meta_db/selector.py", "meta_db/metafeatures.py", "meta_db/store.sqlite",
            "autodl_core/util.py", "pretrained/registry.py"} <= names
    assert not {"meta_db/evaluate.py", "meta_db/batches.py", "meta_db/sub/tool.py"} & names


def test_relative_imports_resolve_against_the_module_package(tmp_path):
    path = tmp_path / "tool.py"
    path.write_text("from ..store import x\nfrom . import sibling\nfrom .... import too_far\n")
    assert package.imported_modules(path, "meta_db.sub.tool") == {
        "meta_db", "meta_db.store", "meta_db.store.x", "meta_db.sub", "meta_db.sub.sibling"}


def _imports_of_our_packages(path: Path, module: str) -> set[str]:
    """Every module of ours that `path` names in an import statement (a second, plainer reading than
    package.imported_modules: the dotted names as written, relative ones resolved)."""
    package_parts = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package_parts[:len(package_parts) - node.level + 1] + [node.module or ""]).strip(".") \
                if node.level else (node.module or "")
            candidates = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        names |= {name for name in candidates if name.split(".")[0] in package.PACKAGES}
    return names


def test_the_shipped_modules_import_only_shipped_modules():
    """The zip's Python files are closed under their imports (inside functions too): a meta_db module the
    zip leaves out is never reached from model.py, whatever path the submission takes at run time."""
    shipped = {name for _, name in package.package_files(ROOT)}
    missing = []
    for name in sorted(shipped):
        if not name.endswith(".py"):
            continue
        parts = Path(name).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        for imported in _imports_of_our_packages(ROOT / name, module):
            base = Path(*imported.split("."))
            candidates = {f"{base.as_posix()}.py", f"{base.as_posix()}/__init__.py"}
            if not candidates & shipped and any((ROOT / c).is_file() for c in candidates):
                missing.append(f"{name} imports {imported}, which the zip leaves out")
    assert missing == []


def test_the_offline_only_modules_are_left_out_and_the_selector_ships():
    offline = package.offline_only_modules(ROOT)
    shipped = {name for _, name in package.package_files(ROOT)}
    assert "meta_db/evaluate.py" in offline  # meta-evaluation: never run by the submission
    assert "meta_db/build.py" in offline  # building the store: offline only
    assert not set(offline) & shipped
    for needed in ("model.py", "LICENSE", "meta_db/selector.py", "meta_db/knowledge.py", "meta_db/selectors.py",
                   "meta_db/second_choice.py", "meta_db/store.py", "meta_db/store.sqlite"):
        assert needed in shipped
    # what the selector (its knowledge, its rankings) and the second choice import is shipped
    for path in (ROOT / "meta_db/selector.py", ROOT / "meta_db/knowledge.py", ROOT / "meta_db/selectors.py",
                 ROOT / "meta_db/second_choice.py"):
        module = "meta_db." + path.stem
        for imported in _imports_of_our_packages(path, module):
            if imported.startswith("meta_db.") and (ROOT / f"{imported.replace('.', '/')}.py").is_file():
                assert f"{imported.replace('.', '/')}.py" in shipped, imported


def test_the_solver_never_reads_timms_imagenet_label_files():
    """What VENDOR_LEAVE_OUT drops from vendor/timm is read only by timm.data.ImageNetInfo and
    RealLabelsImagenet (pkgutil.get_data on timm/data/_info/): no shipped module uses them."""
    words = ("ImageNetInfo", "infer_imagenet_subset", "RealLabelsImagenet", "imagenet_info", "real_labels",
             "_info/", "get_data(")
    uses = [f"{name}: {word}" for source, name in package.package_files(ROOT) if name.endswith(".py")
            for word in words if word in source.read_text()]
    assert uses == []
    assert package.VENDOR_LEAVE_OUT["timm"] == ("timm/data/_info/",)


def test_vendored_timm_leaves_out_its_label_text_and_names_its_licence():
    pytest.importorskip("timm")
    files, versions, left_out = package.vendor_files(["timm"])
    names = [name for _, name in files]
    assert "vendor/timm/__init__.py" in names and "vendor/timm/data/imagenet_info.py" in names
    assert not any(name.startswith("vendor/timm/data/_info/") for name in names)
    assert left_out and all(name.startswith("vendor/timm/data/_info/") for name in left_out)
    licenses = package.vendor_licenses(versions, names)
    assert licenses["timm"]["version"] == versions["timm"]
    assert licenses["timm"]["license"] and not licenses["timm"]["license"].startswith("unknown")
    assert licenses["timm"]["files"] and set(licenses["timm"]["files"]) <= set(names)


def test_project_licence_comes_from_pyproject():
    assert package.project_license(ROOT) == {"license": "Apache-2.0", "file": "LICENSE"}


def test_distribution_licence_falls_back_to_unknown():
    assert package.distribution_license("no-such-distribution-here").startswith("unknown (see no-such-distribution")
