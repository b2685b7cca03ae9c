"""Tests of `tools package`: zip contents, weights loadable from the unpacked copy, the size cap, and
(with the official kit) a scored run of the unpacked zip in an environment without the weight packages."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch

import pretrained
from autodl_core.config import PipelineConfig
from tools import package
from tools.shared_paths import default_kit_run
from tools.cli import main

DEFAULT_BACKBONE = PipelineConfig().backbone
KIT_RUN = Path(default_kit_run())

pytestmark = pytest.mark.skipif(not pretrained.weights_available(DEFAULT_BACKBONE),
                                reason=f"{DEFAULT_BACKBONE}: weight package not installed")


@pytest.fixture(autouse=True)
def _no_weights_env(monkeypatch):
    monkeypatch.delenv(pretrained.WEIGHTS_DIR_ENV, raising=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One default submission zip (vendored timm, default backbones) and its unpacked copy."""
    folder = tmp_path_factory.mktemp("submission")
    result = package.build_submission(folder / "submission.zip")
    unzipped = folder / "unzipped"
    with zipfile.ZipFile(result.path) as archive:
        archive.extractall(unzipped)
    return result, unzipped


def test_backbones_needed_includes_the_default_pipeline():
    assert DEFAULT_BACKBONE in package.backbones_needed()


def test_backbones_needed_reads_the_store(tmp_path):
    """The store's pipelines in use count; a retired pipeline, one measured only by a retired code version
    and one with only harness errors do not (efficientnet_lite1: no default step uses it)."""
    store_module = pytest.importorskip("meta_db.store")
    path = tmp_path / "store.sqlite"
    with store_module.Store(path) as store:
        store.upsert_dataset(store_module.DatasetRecord("toy", {"n_classes": 2}))
        measured = store.upsert_pipeline(PipelineConfig(backbone="efficientnet_lite0"), "lite0")
        store.upsert_pipeline(PipelineConfig(backbone="efficientnet_lite1"), "never run")
        store.upsert_pipeline(PipelineConfig(backbone="no_such_net"), "unregistered")
        retired = store.upsert_pipeline(PipelineConfig(backbone="efficientnet_lite1", top_lr=0.004), "retired")
        old_code = store.upsert_pipeline(PipelineConfig(backbone="efficientnet_lite1", top_lr=0.008), "old code")
        broken = store.upsert_pipeline(PipelineConfig(backbone="efficientnet_lite1", top_lr=0.001), "harness")
        store.record_run(store_module.RunRecord("toy", measured, 60.0, "cpu2", "ok", alc=0.5))
        store.record_run(store_module.RunRecord("toy", retired, 60.0, "cpu2", "ok", alc=0.6))
        store.record_run(store_module.RunRecord("toy", old_code, 60.0, "cpu2", "ok", alc=0.6, code_version="abc1234"))
        store.record_run(store_module.RunRecord("toy", broken, 60.0, "cpu2", store_module.HARNESS_ERROR))
        store.retire_pipelines([retired], "worse everywhere")
        store.retire_code(["abc1234"], "a solver that no longer exists")
        assert [pipeline_id for pipeline_id, _, _ in store.pipelines_in_use()] == [measured]
    steps = PipelineConfig().step_backbone_names()
    assert "efficientnet_lite1" not in steps
    assert package.backbones_needed(store_path=path) == list(dict.fromkeys(steps + ["efficientnet_lite0"]))
    with store_module.Store(path) as store:  # restored, the selector can choose it again: its weights ship
        store.restore_pipelines([retired])
    assert "efficientnet_lite1" in package.backbones_needed(store_path=path)


def test_backbones_needed_includes_every_backbone_of_the_default_steps(tmp_path):
    """An empty store still ships the steps' backbones: the default pipeline moves on to them."""
    needed = package.backbones_needed(store_path=tmp_path / "absent.sqlite")
    assert needed[0] == DEFAULT_BACKBONE
    assert set(PipelineConfig().step_backbone_names()) <= set(needed)


def test_zip_has_the_entry_point_packages_weights_and_vendor(built):
    result, _ = built
    with zipfile.ZipFile(result.path) as archive:
        names = archive.namelist()
        manifest = json.loads(archive.read(package.MANIFEST_NAME))
    assert "model.py" in names
    for required in ("autodl_core/solver.py", "meta_db/selector.py", "pretrained/loaders.py",
                     f"weights/{DEFAULT_BACKBONE}.pt", "vendor/timm/__init__.py"):
        assert required in names
    for name in names:
        parts = name.split("/")
        assert not {"tests", "tools", ".git", "__pycache__"} & set(parts), name
        assert not name.endswith((".pyc", ".so", ".pyd")), name
    assert not any(name.startswith("vendor/") and "huggingface_hub" in name for name in names)
    assert manifest["backbones"] == package.backbones_needed()
    assert {entry["name"] for entry in manifest["files"]} | {package.MANIFEST_NAME} == set(names)
    assert manifest["vendor"]["timm"]
    assert manifest["created"]
    assert "LICENSE" in names
    assert not any(name.startswith("vendor/timm/data/_info/") for name in names)
    assert manifest["left_out"]["vendor"] and all(name.startswith("vendor/timm/data/_info/")
                                                  for name in manifest["left_out"]["vendor"])
    assert result.size_bytes == result.path.stat().st_size < package.DEFAULT_MAX_MB * 1e6


def test_zip_ships_the_meta_db_modules_the_submission_imports_and_no_other(built):
    result, _ = built
    with zipfile.ZipFile(result.path) as archive:
        names = set(archive.namelist())
        manifest = json.loads(archive.read(package.MANIFEST_NAME))
    needed = {path.relative_to(package.REPO_ROOT).as_posix() for path in package.submission_modules().values()}
    for required in ("meta_db/__init__.py", "meta_db/selector.py", "meta_db/knowledge.py", "meta_db/selectors.py",
                     "meta_db/second_choice.py", "meta_db/store.py", "meta_db/metafeatures.py", "meta_db/portfolio.py",
                     "meta_db/store.sqlite"):
        assert required in names
    assert {name for name in needed if name.startswith("meta_db/")} <= names
    offline = package.offline_only_modules()
    assert "meta_db/evaluate.py" in offline
    assert not set(offline) & names
    assert manifest["left_out"]["offline_modules"] == offline


def test_manifest_names_a_license_for_the_project_timm_and_every_weight_file(built):
    result, _ = built
    with zipfile.ZipFile(result.path) as archive:
        names = set(archive.namelist())
        licenses = json.loads(archive.read(package.MANIFEST_NAME))["licenses"]
    assert licenses["project"] == {"license": "Apache-2.0", "file": "LICENSE"}
    timm = licenses["vendor"]["timm"]
    assert timm["license"] and not timm["license"].startswith("unknown")
    assert timm["files"] and set(timm["files"]) <= names
    weight_files = {name for name in names if name.startswith("weights/")}
    assert weight_files and set(licenses["weights"]) == weight_files
    for name, origin in licenses["weights"].items():
        assert origin["license"], name
        assert origin["backbone"] == Path(name).stem
        spec = pretrained.get_spec(origin["backbone"])
        if spec.source is not None:
            assert origin["pip_package"] == spec.source.pip_package
            assert origin["license"] == (spec.source.license or origin["package_license"])
            assert set(origin["license_files"]) <= names
    assert result.size_bytes == result.path.stat().st_size < package.DEFAULT_MAX_MB * 1e6


def test_shipped_weights_load_and_match_the_package_weights(built):
    _, unzipped = built
    weights_dir = unzipped / "weights"
    found = pretrained.find_weight_file(DEFAULT_BACKBONE, weights_dir)
    assert found.path.parent == weights_dir
    shipped = pretrained.create_backbone(DEFAULT_BACKBONE, weights_dir=weights_dir).eval()
    original = pretrained.create_backbone(DEFAULT_BACKBONE).eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(shipped(images), original(images))


def test_unpacked_copy_runs_on_its_own_files(built, tmp_path):
    """Weight packages, huggingface_hub and safetensors hidden: model.py's set-up must still build the backbone
    from weights/ with the vendored timm, and an unshipped backbone must fail (proves the packages are hidden)."""
    _, unzipped = built
    log_path = tmp_path / "imports.jsonl"
    env = package.isolated_env(tmp_path / "guard", log_path)
    unshipped = next((name for name in pretrained.list_backbones() if name not in package.backbones_needed()), None)
    script = textwrap.dedent(f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("model", {str(unzipped / "model.py")!r})
        model = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(model)
        import meta_db.selector, meta_db.second_choice
        from pretrained import create_backbone, WeightsNotFoundError
        create_backbone({DEFAULT_BACKBONE!r})
        if {unshipped!r} is not None:
            try:
                create_backbone({unshipped!r})
            except WeightsNotFoundError:
                print("unshipped backbone refused")
    """)
    completed = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True,
                               text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    origins, hidden = package.import_origins(log_path)
    assert package.foreign_imports(origins, unzipped) == []
    if unshipped is not None:
        assert "unshipped backbone refused" in completed.stdout
        assert pretrained.get_spec(unshipped).source.module in hidden


def test_size_cap_refuses_and_leaves_no_file(tmp_path, capsys):
    out = tmp_path / "small.zip"
    code = main(["package", "--out", str(out), "--max-mb", "0.5", "--no-vendor"])
    assert code == 2
    assert list(tmp_path.iterdir()) == []
    message = capsys.readouterr().err
    assert "over the 0.5 MB cap" in message and f"weights/{DEFAULT_BACKBONE}.pt" in message


def test_bad_input_is_refused(tmp_path, capsys):
    assert main(["package", "--out", str(tmp_path / "a.zip"), "--backbones", "no_such_net", "--no-vendor"]) == 2
    assert "unknown backbone 'no_such_net'" in capsys.readouterr().err
    assert main(["package", "--out", str(tmp_path / "a.tar")]) == 2
    assert main(["package", "--out", str(tmp_path / "a.zip"), "--max-mb", "0"]) == 2
    assert list(tmp_path.iterdir()) == []


def test_score_line_parsing():
    assert package.parse_score_line("ALC=0.25 NAUC=0.5 n_predictions=3 duration=4.1") == {
        "ALC": 0.25, "NAUC": 0.5, "n_predictions": 3, "duration": 4.1}
    assert package.parse_score_line("Traceback (most recent call last):") == {}


@pytest.mark.slow  # 45-75 s on 2 busy cores: kit start-up + a 30 s budget
@pytest.mark.skipif(not os.environ.get("AUTODL_KIT_GIT") or not KIT_RUN.is_file(),
                    reason="needs the official kit ($AUTODL_KIT_GIT) and kit_run")
def test_unpacked_zip_scores_in_the_official_kit(built, tmp_path):
    result, _ = built
    started = time.monotonic()
    verification = package.verify_submission(result.path, "kit:miniciao", 30, tmp_path)
    assert verification.ok, (verification.score_line, verification.problems, verification.stderr_tail)
    assert verification.scores["ALC"] > 0
    assert verification.scores["n_predictions"] >= 1
    assert time.monotonic() - started < 300
