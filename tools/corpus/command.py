"""`tools corpus`: list the extra corpus datasets' recipes, build them from local git snapshots.

    tools corpus list
    tools corpus build [NAME ...] --mirrors DIR [--mirrors DIR2] [--out data/corpus] [--force]

`--mirrors` (repeatable; or AUTODL_CORPUS_MIRRORS, folders separated by ':') are where the source repositories'
git snapshots are (a `git clone --bare`, or another bare copy of the repository). Built
datasets go to `--out` (default `data/corpus`, outside git); `tools convert data/corpus/<name>`
makes an AutoDL dataset of one.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from tools.errors import UserInputError

DEFAULT_OUT = Path("data/corpus")


def register(subparsers) -> None:
    parser = subparsers.add_parser("corpus", help="the extra corpus datasets: list recipes, build from git snapshots",
                                   description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="corpus_command", metavar="ACTION")
    listing = sub.add_parser("list", help="the recipes: name, domain, source, license")
    listing.add_argument("--markdown", action="store_true", help="a Markdown table, with sizes from --built")
    listing.add_argument("--repos", action="store_true", help="the source repositories to snapshot, one a line")
    listing.add_argument("--built", type=Path, default=DEFAULT_OUT, help="where built datasets are (for --markdown)")
    listing.set_defaults(func=run_list)
    build = sub.add_parser("build", help="build datasets from their sources")
    build.add_argument("names", nargs="*", help="recipes to build (default: all)")
    build.add_argument("--mirrors", action="append", type=Path, default=None, metavar="DIR",
                       help="a folder holding the source repositories' git snapshots (repeatable; "
                            "default: AUTODL_CORPUS_MIRRORS, folders separated by ':')")
    build.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    build.add_argument("--force", action="store_true", help="rebuild datasets that exist")
    build.set_defaults(func=run_build)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def run_list(args) -> int:
    from tools.corpus.git_tree import repo_slug
    from tools.corpus.recipes import load_recipes

    recipes = load_recipes().values()
    if args.repos:
        for repo in sorted({repo_slug(r) for recipe in recipes for r in recipe.repositories()}):
            print(repo)
        return 0
    if not args.markdown:
        for recipe in recipes:
            print(f"{recipe.name:28s} {recipe.domain:40s} {recipe.repo}@{recipe.commit[:12]}")
        return 0
    print("| name | domain | N train / test | classes | image shape | multi-label | source | license (short) |")
    print("|---|---|---|---|---|---|---|---|")
    for recipe in recipes:
        info_path = args.built / recipe.name / "info.json"
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        shape = info.get("image_shape", "?")
        if shape == "variable":
            shape = f"variable, W {info['image_size_min_wh'][0]}-{info['image_size_max_wh'][0]}, " \
                    f"H {info['image_size_min_wh'][1]}-{info['image_size_max_wh'][1]}"
        elif isinstance(shape, list):
            shape = "x".join(str(v) for v in shape)
        counts = f"{info['n_train']} / {info['n_test']}" if info else "(not built)"
        print(f"| {recipe.name} | {recipe.domain} | {counts} | {info.get('n_classes', '?')} | {shape} | "
              f"{'yes' if info.get('multilabel') else 'no' if info else '?'} | "
              f"{recipe.repo}@{recipe.commit[:12]} | {recipe.license.split(';')[0].split('(')[0].strip()} |")
    return 0


def run_build(args) -> int:
    from tools.corpus.build import build_dataset
    from tools.corpus.git_tree import GitTree, find_git_dir
    from tools.corpus.recipes import load_recipes
    from tools.provenance import code_version
    from tools.shared_paths import REPO_ROOT

    mirrors = args.mirrors or [Path(p) for p in os.environ.get("AUTODL_CORPUS_MIRRORS", "").split(":") if p]
    absent = [str(m) for m in mirrors if not m.is_dir()]
    if not mirrors or absent:
        raise UserInputError(f"mirror folder(s) not found: {', '.join(absent)}" if absent else
                             "no mirror folder: pass --mirrors DIR (or set AUTODL_CORPUS_MIRRORS)")
    recipes = load_recipes()
    unknown = [n for n in args.names if n not in recipes]
    if unknown:
        raise UserInputError(f"no recipe named {', '.join(unknown)} (see `tools corpus list`)")
    chosen = [recipes[n] for n in args.names] if args.names else list(recipes.values())
    built_by = f"tools corpus build (autodl-solver {code_version(REPO_ROOT) or 'unknown version'})"
    failed, opened = [], []

    def open_tree(repo: str, commit: str) -> GitTree:
        opened.append(GitTree(find_git_dir(repo, mirrors), commit))
        return opened[-1]

    for recipe in chosen:
        started = time.monotonic()
        if (args.out / recipe.name).exists() and not args.force:
            print(f"{recipe.name}: exists, skipped (--force rebuilds)")
            continue
        try:
            with GitTree(find_git_dir(recipe.repo, mirrors), recipe.commit) as tree:
                info = build_dataset(recipe, tree, args.out, built_by=built_by, force=args.force, open_tree=open_tree)
        except UserInputError as exc:
            print(f"{recipe.name}: FAILED: {exc}")
            failed.append(recipe.name)
            continue
        finally:
            while opened:
                opened.pop().close()
        print(f"{recipe.name}: {info['n_train']} train / {info['n_test']} test, {info['n_classes']} classes, "
              f"{info['image_shape']}, {info['data_npz_bytes'] / 1e6:.1f} MB, {time.monotonic() - started:.0f} s")
    if failed:
        print(f"{len(failed)} of {len(chosen)} failed: {', '.join(failed)}")
    return 1 if failed else 0
