"""Which code produced a result: the git commit of a checkout and whether its work tree differs."""
from __future__ import annotations

import subprocess
from pathlib import Path


def git_head(root: str | Path) -> tuple[str, bool] | None:
    """(full HEAD commit, tracked files modified?) of the checkout at `root`; None outside git."""
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip(), bool(dirty.stdout.strip())


def code_version(root: str | Path) -> str | None:
    """Short commit, '+dirty' when tracked files differ from it (recorded with every run)."""
    head = git_head(root)
    if head is None:
        return None
    return head[0][:7] + ("+dirty" if head[1] else "")
