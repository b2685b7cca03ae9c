"""Find, read and write weight files, offline.

Search order for a backbone's weights (first hit wins):

1. an explicit ``weights_dir=`` argument, then the folder named by ``$AUTODL_WEIGHTS_DIR``:
   ``<name>.safetensors`` or ``<name>.pt`` (written by ``export_weights``, timm names), or the original file
   name of the weight package (e.g. ``efficientnet-lite0-57934424.pth``, source names);
2. the installed weight package (located with ``importlib.util.find_spec``, never imported).

A packaged submission has no pip-installed weight packages, only a folder of files next to ``model.py``:
that is what case 1 serves.
"""
from __future__ import annotations

import importlib.util
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from . import key_maps
from .registry import BackboneSpec, get_spec

WEIGHTS_DIR_ENV = "AUTODL_WEIGHTS_DIR"
EXPORT_SUFFIXES = (".safetensors", ".pt")


class UnreadableWeightsError(ValueError):
    """A weight file that is not a state dict of tensors: corrupt, or a pickle holding other objects
    (refused by ``torch.load(weights_only=True)``: unpickling arbitrary objects can run code)."""


class WeightsNotFoundError(FileNotFoundError):
    """No local weight file for a backbone; the message says what to install or where to put the file."""


@dataclass(frozen=True)
class WeightFile:
    """A located weight file and the parameter naming it uses."""

    path: Path
    key_style: str

    @property
    def size(self) -> int:
        return self.path.stat().st_size


def package_dir(module: str) -> Path | None:
    """Folder of an installed top-level package, found without importing (executing) it."""
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    return Path(list(found.submodule_search_locations)[0])


def _package_file(spec: BackboneSpec) -> Path | None:
    if spec.source is None:
        return None
    folder = package_dir(spec.source.module)
    if folder is None:
        return None
    matches = sorted(folder.glob(spec.source.file_glob))
    if len(matches) > 1:
        raise WeightsNotFoundError(
            f"{spec.name}: several files match {spec.source.file_glob!r} in {folder}: {[m.name for m in matches]}"
        )
    return matches[0] if matches else None


def _search_dirs(weights_dir: str | os.PathLike | None) -> list[Path]:
    """Explicit folder first, then $AUTODL_WEIGHTS_DIR; a named folder that does not exist is an error."""
    dirs = []
    for label, value in (("weights_dir", weights_dir), (WEIGHTS_DIR_ENV, os.environ.get(WEIGHTS_DIR_ENV))):
        if value in (None, ""):
            continue
        folder = Path(value)
        if not folder.is_dir():
            raise NotADirectoryError(f"{label}={str(value)!r} is not a directory")
        dirs.append(folder)
    return dirs


def _file_in_dir(spec: BackboneSpec, folder: Path) -> WeightFile | None:
    for suffix in EXPORT_SUFFIXES:
        candidate = folder / f"{spec.name}{suffix}"
        if candidate.is_file():
            return WeightFile(candidate, key_maps.TIMM)
    if spec.source is not None:
        matches = sorted(folder.glob(Path(spec.source.file_glob).name))
        if matches:
            return WeightFile(matches[-1], spec.source.key_style)
    return None


def find_weight_file(name: str, weights_dir: str | os.PathLike | None = None) -> WeightFile | None:
    """The weight file ``create_backbone`` would load for ``name``, or None when there is none locally."""
    spec = get_spec(name)
    for folder in _search_dirs(weights_dir):
        if found := _file_in_dir(spec, folder):
            return found
    path = _package_file(spec)
    if path is not None:
        return WeightFile(path, spec.source.key_style)
    return None


def missing_weights_message(name: str, weights_dir: str | os.PathLike | None = None) -> str:
    """What to do when ``name`` has no local weights: which package to install, which file to place where."""
    spec = get_spec(name)
    searched = [str(d) for d in _search_dirs(weights_dir)]
    lines = [f"no local pretrained weights for backbone {name!r}."]
    if spec.source is not None:
        lines.append(f"Install them with: {spec.source.install_command}")
        file_names = f"{name}.safetensors, {name}.pt or {Path(spec.source.file_glob).name}"
    else:
        file_names = f"{name}.safetensors or {name}.pt"
    lines.append(f"or put {file_names} in a folder given as weights_dir= or ${WEIGHTS_DIR_ENV}"
                 + (f" (searched: {', '.join(searched)})" if searched else ""))
    lines.append("(export_weights() writes such files), or pass allow_download=True to fetch "
                 f"timm's {spec.hub_tag or spec.timm_arch!r} weights (needs internet), or pretrained=False.")
    return "\n".join(lines)


def weight_file_path(name: str, weights_dir: str | os.PathLike | None = None) -> Path:
    """Path of the local weight file for ``name``; raises WeightsNotFoundError naming the package to install."""
    found = find_weight_file(name, weights_dir)
    if found is None:
        raise WeightsNotFoundError(missing_weights_message(name, weights_dir))
    return found.path


def weight_file_size(name: str, weights_dir: str | os.PathLike | None = None) -> int:
    """Size in bytes of the weight file ``create_backbone`` would load (for the packager's size budget)."""
    return weight_file_path(name, weights_dir).stat().st_size


def weights_available(name: str, weights_dir: str | os.PathLike | None = None) -> bool:
    """True when a weight file for ``name`` is found locally (no network is ever used)."""
    return find_weight_file(name, weights_dir) is not None


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors (floats upcast to fp32) and metadata of a .safetensors or torch-pickled state dict, on CPU."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                metadata = dict(handle.metadata() or {})
                state = {key: handle.get_tensor(key) for key in handle.keys()}
        except Exception as error:  # safetensors raises its own SafetensorError for a corrupt header
            raise UnreadableWeightsError(f"{path}: not a readable safetensors file ({error})") from None
    else:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:  # weights_only refuses globals other than tensors and plain containers
            raise UnreadableWeightsError(f"{path}: not a weight file of tensors: it holds pickled Python objects, "
                                         "which torch.load(weights_only=True) refuses (unpickling them could run "
                                         "code)") from None
        except Exception as error:  # EOFError (cut short), RuntimeError (not a torch file)...
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UnreadableWeightsError(f"{path}: not a readable torch weight file ({first})") from None
        metadata = {}
        if isinstance(loaded, Mapping) and "state_dict" in loaded and isinstance(loaded["state_dict"], Mapping):
            metadata = {str(k): str(v) for k, v in loaded.get("metadata", {}).items()}
            loaded = loaded["state_dict"]
        if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
            bad = next((k for k, v in loaded.items() if not isinstance(v, torch.Tensor)), None) \
                if isinstance(loaded, Mapping) else None
            raise UnreadableWeightsError(f"{path}: not a state dict of tensors"
                                         + (f" (entry {bad!r} is a {type(loaded[bad]).__name__})" if bad else ""))
        state = dict(loaded)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    return state, metadata


def write_state_dict(state: Mapping[str, torch.Tensor], folder: Path, stem: str, metadata: Mapping[str, str]) -> Path:
    """Write ``state`` as ``folder/stem.safetensors`` when safetensors is installed, else ``.pt`` (torch.save)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    try:
        from safetensors.torch import save_file
    except ImportError:
        path = folder / f"{stem}.pt"
        torch.save({"state_dict": tensors, "metadata": dict(metadata)}, path)
        return path
    path = folder / f"{stem}.safetensors"
    save_file(tensors, str(path), metadata=dict(metadata))
    return path
