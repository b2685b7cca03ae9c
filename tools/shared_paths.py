"""Where the project's shared folder and the official kit's runner are, without machine-specific paths.

The shared folder (dev corpus, kit samples) lies beside the checkout as `../shared`; AUTODL_SHARED
overrides it. The kit's runner is the repository's own tools/kit/run.py; AUTODL_KIT_RUN overrides it
(another runner with the same command line).
"""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    return Path(os.environ.get("AUTODL_SHARED", REPO_ROOT.parent / "shared"))


KIT_RUN = REPO_ROOT / "tools" / "kit" / "run.py"


def default_kit_run() -> str:
    """The runner `tools bench`, `tools faults` and `tools package --verify` start as `python RUNNER ...`."""
    return os.environ.get("AUTODL_KIT_RUN", str(KIT_RUN))


def kit_samples_dir() -> Path:
    return shared_dir() / "datasets" / "autodl_samples"
