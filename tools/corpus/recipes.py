"""Recipes: how one extra corpus dataset is rebuilt, as data (`recipes/<name>.json`).

A recipe records what `../shared/datasets/README.md` asks of every corpus dataset (source
repository and commit, the files used, the original dataset, the license as stated) and every
conversion choice: the layout that turns files into labelled images, the split, a subsample, a
size cap. `tools corpus build` copies the whole recipe into the dataset's info.json, so a built
dataset says how it was made.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tools.corpus.layouts import check_layout
from tools.errors import UserInputError

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
REQUIRED = ("name", "domain", "source", "license", "layout")
SPLIT_KINDS = ("source", "random", "grouped")


@dataclass(frozen=True)
class Recipe:
    name: str
    domain: str
    source: dict  # repo (github.com/owner/name), commit, paths (text), original (dataset, paper)
    license: str
    layout: dict  # {"kind": <layouts.LAYOUTS key>, ...its parameters}
    split: dict = field(default_factory=lambda: {"kind": "source"})  # source | random | grouped (+ test_fraction, seed)
    subsample: dict | None = None  # {"max_images": N, "seed": S}
    encode: dict = field(default_factory=dict)  # {"max_side": px, "reencode": "jpeg", "grayscale": bool}
    notes: str = ""
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def repo(self) -> str:
        return self.source["repo"]

    @property
    def commit(self) -> str:
        return self.source["commit"]

    def repositories(self) -> list[str]:
        """Every repository the build reads: the source, and any a layout names (a label table's)."""
        others = [v["repo"] for v in self.layout.values() if isinstance(v, dict) and v.get("repo")]
        return [self.repo, *others]


def parse_recipe(raw: dict, where: str) -> Recipe:
    missing = [key for key in REQUIRED if not raw.get(key)]
    if missing:
        raise UserInputError(f"{where}: recipe lacks {', '.join(missing)}")
    if not isinstance(raw["source"], dict) or not raw["source"].get("repo") or not raw["source"].get("commit"):
        raise UserInputError(f"{where}: source needs repo and commit")
    if len(raw["source"]["commit"]) != 40:
        raise UserInputError(f"{where}: source commit must be the full 40-hex id, got {raw['source']['commit']!r}")
    known = {f for f in Recipe.__dataclass_fields__ if f != "raw"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise UserInputError(f"{where}: unknown recipe field(s) {', '.join(unknown)}")
    try:
        check_layout(raw["layout"])
    except UserInputError as exc:
        raise UserInputError(f"{where}: {exc}") from None
    split = raw.get("split", {"kind": "source"})
    if split.get("kind") not in SPLIT_KINDS or not 0 < float(split.get("test_fraction", 0.2)) < 1:
        raise UserInputError(f"{where}: split needs kind in {SPLIT_KINDS} and 0 < test_fraction < 1, got {split}")
    encode = raw.get("encode", {})
    if (set(encode) - {"max_side", "reencode", "grayscale"} or encode.get("reencode", "jpeg") != "jpeg"
            or not isinstance(encode.get("grayscale", False), bool)):
        raise UserInputError(f"{where}: encode takes max_side (pixels), reencode ('jpeg') and grayscale "
                             f"(true/false), got {encode}")
    return Recipe(**{k: raw[k] for k in raw if k in known}, raw=raw)


def load_recipes(directory: Path | None = None) -> dict[str, Recipe]:
    """Every recipe in `directory` (default: the shipped ones), by name."""
    recipes = {}
    for path in sorted(Path(directory or RECIPES_DIR).glob("*.json")):
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise UserInputError(f"{path}: not valid JSON ({exc})") from None
        recipe = parse_recipe(raw, str(path))
        if recipe.name != path.stem:
            raise UserInputError(f"{path}: recipe name {recipe.name!r} differs from its file name")
        recipes[recipe.name] = recipe
    return recipes
