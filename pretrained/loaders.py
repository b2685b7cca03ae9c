"""Build timm backbones with genuine pretrained weights from local files, and export those weights.

Loading is strict: every tensor of the file must land in the network and every parameter of the network
(except a newly sized classifier) must come from the file, else we raise. A silently half-loaded backbone
would look like a working model and train badly.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import timm
import torch

from . import key_maps
from .registry import BackboneSpec, get_spec
from .weight_files import (
    WeightFile,
    WeightsNotFoundError,
    find_weight_file,
    missing_weights_message,
    read_state_dict,
    write_state_dict,
)

IMAGENET_CLASSES = 1000


class IncompatibleWeightsError(RuntimeError):
    """A weight file does not fit the architecture (names or shapes differ)."""


def _classifier_prefix(model: torch.nn.Module) -> str:
    return str(model.pretrained_cfg.get("classifier", "classifier")) + "."


def _looks_like_timm_names(state: Mapping[str, torch.Tensor], model: torch.nn.Module) -> bool:
    own = set(model.state_dict())
    return len(own & set(state)) * 2 >= len(state)


def load_weights(model: torch.nn.Module, weight_file: WeightFile, spec: BackboneSpec) -> torch.nn.Module:
    """Strictly load ``weight_file`` into the timm ``model`` built for ``spec`` (classifier kept if it fits)."""
    state, metadata = read_state_dict(weight_file.path)
    arch = metadata.get("timm_arch")
    if arch and arch != spec.timm_arch:
        raise IncompatibleWeightsError(f"{weight_file.path}: written for {arch!r}, not {spec.timm_arch!r}")
    style = key_maps.TIMM if _looks_like_timm_names(state, model) else weight_file.key_style
    try:
        state = key_maps.to_timm_names(state, style, model)
    except key_maps.KeyMappingError as error:
        raise IncompatibleWeightsError(f"{weight_file.path}: {error}") from error

    prefix = _classifier_prefix(model)
    file_head = {k: v for k, v in state.items() if k.startswith(prefix)}
    model_head = {k: v for k, v in model.state_dict().items() if k.startswith(prefix)}
    head_fits = bool(model_head) and set(file_head) == set(model_head) and all(
        file_head[k].shape == model_head[k].shape for k in model_head)
    if model_head and not file_head and getattr(model, "num_classes", 0) == IMAGENET_CLASSES:
        raise IncompatibleWeightsError(
            f"{weight_file.path} has no ImageNet classifier (exported with include_classifier=False); "
            "use num_classes=0 or another file")
    if not head_fits:  # new head (num_classes=0 or another class count): drop the ImageNet one
        state = {k: v for k, v in state.items() if not k.startswith(prefix)}

    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches
        raise IncompatibleWeightsError(f"{weight_file.path} does not fit {spec.timm_arch}: {error}") from error
    missing = [k for k in result.missing_keys if head_fits or not k.startswith(prefix)]
    if missing or result.unexpected_keys:
        raise IncompatibleWeightsError(
            f"{weight_file.path} does not fit {spec.timm_arch}: {len(missing)} missing "
            f"(e.g. {missing[:3]}), {len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:3]})")
    return model


def _download_pretrained(spec: BackboneSpec, num_classes: int, **timm_kwargs: Any) -> torch.nn.Module:
    """Let timm fetch hub weights (needs internet; never used by tests or the offline solver)."""
    model_name = spec.hub_tag if spec.hub_tag else spec.timm_arch
    if not model_name.startswith(spec.timm_arch):
        raise ValueError(f"{spec.name}: hub_tag {spec.hub_tag!r} is not a tag of {spec.timm_arch!r}")
    return timm.create_model(model_name, pretrained=True, num_classes=num_classes, **timm_kwargs)


def create_backbone(
    name: str,
    pretrained: bool = True,
    num_classes: int = 0,
    allow_download: bool = False,
    weights_dir: str | os.PathLike | None = None,
    weights_file: str | os.PathLike | None = None,
    **timm_kwargs: Any,
) -> torch.nn.Module:
    """A timm model for backbone ``name``, with its genuine pretrained weights loaded offline.

    num_classes=0 returns pooled features (B, feature_dim); 1000 keeps the ImageNet classifier; any other
    count adds a freshly initialised head on pretrained features. Weights come from ``weights_file``, else
    ``weights_dir`` / $AUTODL_WEIGHTS_DIR, else the installed weight package; if none is found, raise
    WeightsNotFoundError naming the pip package, unless allow_download=True (timm's hub, needs internet).
    Extra keyword arguments (drop_rate, drop_path_rate...) go to ``timm.create_model``. Inputs must be
    normalised with ``normalizer(name)``.
    """
    spec = get_spec(name)
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0, got {num_classes}")
    if pretrained and timm_kwargs.get("in_chans", 3) != 3:
        raise ValueError("pretrained backbones take 3 input channels; repeat grey channels instead of in_chans")
    if weights_file is not None:
        path = Path(weights_file)
        if not path.is_file():
            raise WeightsNotFoundError(f"weights_file={str(weights_file)!r} does not exist")
        source_style = spec.source.key_style if spec.source else key_maps.TIMM
        found: WeightFile | None = WeightFile(path, source_style)
    else:
        found = find_weight_file(name, weights_dir) if pretrained else None

    if pretrained and found is None:
        if allow_download:
            return _download_pretrained(spec, num_classes, **timm_kwargs)
        raise WeightsNotFoundError(missing_weights_message(name, weights_dir))

    model = timm.create_model(spec.timm_arch, pretrained=False, num_classes=num_classes, **timm_kwargs)
    if found is not None:
        load_weights(model, found, spec)
    return model


def export_weights(
    name: str,
    dest_dir: str | os.PathLike,
    *,
    half: bool = False,
    include_classifier: bool = True,
    weights_dir: str | os.PathLike | None = None,
    allow_download: bool = False,
) -> Path:
    """Write ``name``'s weights under timm names to ``dest_dir/<name>.safetensors`` (or .pt); return the path.

    ``create_backbone(name, weights_dir=dest_dir)`` loads the result. half=True stores floating tensors as
    fp16 (half the size; they are upcast to fp32 on load, so outputs differ from the original by ~1e-3
    relative). include_classifier=False drops the ImageNet head (1.28 M parameters, 5 MB in fp32), enough
    for feature extraction and fine-tuning with a new head.
    """
    spec = get_spec(name)
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    model = create_backbone(name, pretrained=True, num_classes=IMAGENET_CLASSES if include_classifier else 0,
                            allow_download=allow_download, weights_dir=weights_dir)
    state = model.state_dict()
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    metadata = {"backbone": name, "timm_arch": spec.timm_arch, "key_style": key_maps.TIMM,
                "dtype": "float16" if half else "float32", "classifier": str(include_classifier)}
    return write_state_dict(state, dest, name, metadata)
