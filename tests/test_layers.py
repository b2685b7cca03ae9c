"""Imports point one way: tools -> meta_db -> autodl_data -> autodl_core -> pretrained.

Each package may import the packages below it, never one above: the submission ships
autodl_core, meta_db and pretrained without tools, and a store that imported the command line
(as meta_db once did for dataset I/O) would drag it along. autodl_data (the dataset formats:
the AutoDL folder format, TFRecord framing, corpus npz) sits above the solver, which never
reads them, and below the store and the tools, which do. Every import statement counts, the
ones inside functions too. Run directly (`python tests/test_layers.py`) to print the graph.
"""
from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["pretrained", "autodl_core", "autodl_data", "meta_db", "tools"]  # bottom to top


def imported_packages(path: Path, module_level: bool = False) -> set[str]:
    """Top-level names of the project's packages that `path` imports (absolute imports); `module_level`:
    only the imports that run when the module is imported (not those inside functions)."""
    found = set()
    nodes = [ast.parse(path.read_text(), str(path))]
    while nodes:
        node = nodes.pop()
        if not (module_level and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))):
            nodes.extend(ast.iter_child_nodes(node))
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {name.split(".")[0] for name in names if name.split(".")[0] in LAYERS}
    return found


def import_graph() -> dict[str, dict[str, list[str]]]:
    """package -> imported package -> files that import it."""
    graph: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            for target in imported_packages(path) - {package}:
                graph[package][target].append(str(path.relative_to(ROOT)))
    return graph


def upward_imports() -> list[str]:
    rank = {name: i for i, name in enumerate(LAYERS)}
    return [f"{f} imports {target} (a layer above {package})"
            for package, targets in import_graph().items() for target, files in targets.items()
            if rank[target] > rank[package] for f in files]


def test_no_package_imports_a_layer_above_it():
    assert upward_imports() == []


def test_the_checker_sees_function_level_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from tools.errors import UserInputError\n    import meta_db.store\n")
    assert imported_packages(module) == {"tools", "meta_db"}
    assert imported_packages(module, module_level=True) == set()


def test_shipped_modules_import_only_shipped_packages_when_imported():
    """The submission zip ships some packages (not autodl_data, not tools): importing any module of them,
    model.py included, must not need another (offline-only code imports it inside its functions)."""
    from tools.package import ENTRY_POINT, PACKAGES

    files = [ROOT / ENTRY_POINT] + [path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))]
    unshipped = {f"{path.relative_to(ROOT)} imports {target}" for path in files
                 for target in imported_packages(path, module_level=True) - set(PACKAGES)}
    assert sorted(unshipped) == []


if __name__ == "__main__":
    for package in reversed(LAYERS):
        targets = import_graph().get(package, {})
        print(f"{package} -> {', '.join(sorted(targets)) or '(nothing of ours)'}")
    problems = upward_imports()
    print("\n".join(problems) or "no upward import")
    sys.exit(1 if problems else 0)
