"""Pretrained backbones for the solver: a registry of specs and offline loading of genuine ImageNet weights.

Typical use::

    from pretrained import create_backbone, normalizer, list_backbones
    model = create_backbone("efficientnet_lite0")          # pooled 1280-d features, weights from the pip package
    mean, std = normalizer("efficientnet_lite0")            # apply to images scaled to [0, 1]
    features = model((images - mean) / std)

See docs/pretrained.md for the weight packages, the search order and the packaging story.
"""
from .key_maps import KeyMappingError
from .loaders import IncompatibleWeightsError, create_backbone, export_weights, load_weights
from .registry import (
    BackboneSpec,
    WeightSource,
    get_spec,
    list_backbones,
    normalizer,
    register_backbone,
)
from .weight_files import (
    WEIGHTS_DIR_ENV,
    UnreadableWeightsError,
    WeightsNotFoundError,
    find_weight_file,
    weight_file_path,
    weight_file_size,
    weights_available,
)

__all__ = [
    "BackboneSpec", "WeightSource", "register_backbone", "list_backbones", "get_spec", "normalizer",
    "create_backbone", "export_weights", "load_weights", "weights_available", "weight_file_path",
    "weight_file_size", "UnreadableWeightsError", "find_weight_file", "WEIGHTS_DIR_ENV", "WeightsNotFoundError",
    "IncompatibleWeightsError", "KeyMappingError",
]
