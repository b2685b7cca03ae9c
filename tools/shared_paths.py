"""Where the project's shared folder and the official kit's runner are, without machine-specific paths.

The shared folder (dev corpus, kit_run) lies beside the checkout as `../shared`; AUTODL_SHARED
overrides it, AUTODL_KIT_RUN overrides the kit_run path.
"""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    return Path(os.environ.get("AUTODL_SHARED", REPO_ROOT.parent / "shared"))


def default_kit_run() -> str:
    return os.environ.get("AUTODL_KIT_RUN", str(shared_dir() / "tools" / "kit_run"))


def kit_samples_dir() -> Path:
    return shared_dir() / "datasets" / "autodl_samples"
