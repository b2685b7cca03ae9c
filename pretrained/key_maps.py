"""Rename the state dicts that ship in weight packages to timm's parameter names.

Each weight package stores its tensors under the names of the library that trained or exported them
(lukemelas ``efficientnet_pytorch``, torchvision). timm's architectures are the same networks with other
names, so a name-for-name translation lets us load them strictly: every tensor must find its place, and
anything left over or missing fails loudly in ``load_state_dict(strict=True)``.

The flat block index of the source (``_blocks.7``, ``features.8``) is turned into timm's
``blocks.<stage>.<index>`` from the stage depths of the target timm model, so one rule serves every
width/depth variant (Lite0..Lite2 have different depths).
"""
from __future__ import annotations

import re
from typing import Callable, Mapping, Sequence

import torch

StateDict = dict[str, torch.Tensor]

# Key styles a weight file may use; "timm" means already renamed (e.g. a file from export_weights).
TIMM = "timm"
EFFICIENTNET_PYTORCH = "efficientnet_pytorch"
TORCHVISION_MOBILENET_V2 = "torchvision_mobilenet_v2"


class KeyMappingError(ValueError):
    """A source tensor name has no timm counterpart: the file is not the architecture we expect."""


def stage_depths(model: torch.nn.Module) -> list[int]:
    """Number of blocks in each stage of a timm EfficientNet-family model (``model.blocks``)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise KeyMappingError(f"{type(model).__name__} has no 'blocks' attribute; not an EfficientNet-family model")
    return [len(stage) for stage in blocks]


def _flat_to_stage(depths: Sequence[int]) -> list[tuple[int, int]]:
    return [(stage, index) for stage, depth in enumerate(depths) for index in range(depth)]


def _block_name(flat_index: int, positions: Sequence[tuple[int, int]], source_key: str) -> str:
    if not 0 <= flat_index < len(positions):
        raise KeyMappingError(
            f"{source_key!r}: block {flat_index} does not exist in the target model ({len(positions)} blocks)"
        )
    stage, index = positions[flat_index]
    return f"blocks.{stage}.{index}"


# --- lukemelas efficientnet_pytorch -> timm tf_efficientnet_lite* -------------------------------------------
_EFFNET_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Inside a block the names depend on whether the block expands (InvertedResidual) or not (DepthwiseSeparable).
_EFFNET_EXPANDING = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                     "_project_conv": "conv_pwl", "_bn2": "bn3",
                     "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand"}
_EFFNET_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2",
                     "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand"}
_EFFNET_BLOCK = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(\w+)$")
_EFFNET_TOP_KEY = re.compile(r"^(_\w+)\.(\w+)$")


def efficientnet_pytorch_to_timm(state: Mapping[str, torch.Tensor], depths: Sequence[int]) -> StateDict:
    """lukemelas ``efficientnet_pytorch`` names (``_blocks.3._depthwise_conv.weight``) -> timm names."""
    positions = _flat_to_stage(depths)
    expanding = {int(m.group(1)) for k in state if (m := _EFFNET_BLOCK.match(k)) and m.group(2) == "_expand_conv"}
    renamed: StateDict = {}
    for key, tensor in state.items():
        if match := _EFFNET_BLOCK.match(key):
            flat, module, param = int(match.group(1)), match.group(2), match.group(3)
            table = _EFFNET_EXPANDING if flat in expanding else _EFFNET_SEPARABLE
            if module not in table:
                raise KeyMappingError(f"{key!r}: unknown EfficientNet block module {module!r}")
            new_key = f"{_block_name(flat, positions, key)}.{table[module]}.{param}"
        elif (match := _EFFNET_TOP_KEY.match(key)) and match.group(1) in _EFFNET_TOP:
            new_key = f"{_EFFNET_TOP[match.group(1)]}.{match.group(2)}"
        else:
            raise KeyMappingError(f"{key!r}: not an efficientnet_pytorch parameter name")
        renamed[new_key] = tensor
    return renamed


# --- torchvision mobilenet_v2 -> timm mobilenetv2_100 --------------------------------------------------------
# features.0 is the stem, features.1..17 the inverted-residual blocks, features.18 the 1x1 head conv.
_TV_STEM = {"features.0.0": "conv_stem", "features.0.1": "bn1"}
_TV_HEAD_INDEX = 18
_TV_HEAD = {"0": "conv_head", "1": "bn2"}
_TV_EXPANDING = {"conv.0.0": "conv_pw", "conv.0.1": "bn1", "conv.1.0": "conv_dw", "conv.1.1": "bn2",
                 "conv.2": "conv_pwl", "conv.3": "bn3"}
_TV_SEPARABLE = {"conv.0.0": "conv_dw", "conv.0.1": "bn1", "conv.1": "conv_pw", "conv.2": "bn2"}
_TV_FEATURE = re.compile(r"^features\.(\d+)\.(.+)\.(\w+)$")


def torchvision_mobilenet_v2_to_timm(state: Mapping[str, torch.Tensor], depths: Sequence[int]) -> StateDict:
    """torchvision ``mobilenet_v2`` names (``features.4.conv.1.0.weight``) -> timm ``mobilenetv2_100`` names."""
    positions = _flat_to_stage(depths)
    # A block without expansion (t=1) has 'conv.0.0' as depthwise conv and no 'conv.3'.
    expanding = {int(m.group(1)) for k in state if (m := _TV_FEATURE.match(k)) and m.group(2) == "conv.3"}
    renamed: StateDict = {}
    for key, tensor in state.items():
        if key.startswith("classifier.1."):
            new_key = "classifier." + key.removeprefix("classifier.1.")
        elif (match := _TV_FEATURE.match(key)) is None:
            raise KeyMappingError(f"{key!r}: not a torchvision mobilenet_v2 parameter name")
        else:
            index, module, param = int(match.group(1)), match.group(2), match.group(3)
            stem_module = f"features.{index}.{module}"
            if stem_module in _TV_STEM:
                new_key = f"{_TV_STEM[stem_module]}.{param}"
            elif index == _TV_HEAD_INDEX and module in _TV_HEAD:
                new_key = f"{_TV_HEAD[module]}.{param}"
            else:
                table = _TV_EXPANDING if index in expanding else _TV_SEPARABLE
                if module not in table:
                    raise KeyMappingError(f"{key!r}: unknown MobileNetV2 block module {module!r}")
                new_key = f"{_block_name(index - 1, positions, key)}.{table[module]}.{param}"
        renamed[new_key] = tensor
    return renamed


_RENAMERS: dict[str, Callable[[Mapping[str, torch.Tensor], Sequence[int]], StateDict]] = {
    EFFICIENTNET_PYTORCH: efficientnet_pytorch_to_timm,
    TORCHVISION_MOBILENET_V2: torchvision_mobilenet_v2_to_timm,
}


def to_timm_names(state: Mapping[str, torch.Tensor], key_style: str, model: torch.nn.Module) -> StateDict:
    """Return ``state`` under timm's names for ``model``, translating from ``key_style``."""
    if key_style == TIMM:
        return dict(state)
    if key_style not in _RENAMERS:
        raise KeyMappingError(f"unknown key style {key_style!r}; known: {', '.join([TIMM, *_RENAMERS])}")
    return _RENAMERS[key_style](state, stage_depths(model))
