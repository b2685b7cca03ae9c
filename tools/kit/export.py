"""A fresh copy of the starting kit for every run, taken from where the user keeps it.

The kit is never edited and never shared between runs: each run gets its own export in a new folder,
so that a run cannot see files an earlier one wrote into the kit. The kit may be given as
- a bare git repository (`git clone --bare ...`) or a checkout's `.git` folder: `git archive REV`;
- a checkout's folder with a `.git` folder inside: the same, from that `.git` (the committed kit);
- a plain folder holding the kit's files (a checkout without git, an earlier export): copied.
"""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from dataclasses import dataclass

from tools.kit.errors import KitRunError

# The two kit programs a run starts, relative to the kit's root.
INGESTION = os.path.join("AutoDL_ingestion_program", "ingestion.py")
SCORING = os.path.join("AutoDL_scoring_program", "score.py")


@dataclass(frozen=True)
class KitSource:
    """Where the kit comes from: a git directory (`git_dir`) or a plain folder (`folder`)."""

    git_dir: str | None = None
    folder: str | None = None


def is_git_dir(path: str) -> bool:
    """True when `path` is a git directory (bare repository or `.git`); False also when git is missing."""
    try:
        out = subprocess.run(["git", "--git-dir=" + path, "rev-parse", "--git-dir"], capture_output=True, text=True)
        return out.returncode == 0
    except OSError:
        return False


def locate(kit: str | None) -> KitSource:
    """What `--kit` points at. A git directory wins over the files beside it (the committed kit is the
    reference); a folder holding the kit's files and no git is copied as it is."""
    if not kit:  # also an empty $AUTODL_KIT_GIT
        raise KitRunError("no kit given: pass --kit GITDIR or set AUTODL_KIT_GIT")
    kit = os.path.abspath(kit)
    if not os.path.exists(kit):
        raise KitRunError("--kit %s does not exist (a git dir of the starting kit, or its folder)" % kit)
    dot_git = os.path.join(kit, ".git")
    if os.path.isdir(dot_git) and is_git_dir(dot_git):
        return KitSource(git_dir=dot_git)
    if is_git_dir(kit) and not os.path.isdir(os.path.join(kit, "AutoDL_ingestion_program")):
        return KitSource(git_dir=kit)
    if os.path.isfile(os.path.join(kit, INGESTION)):
        return KitSource(folder=kit)
    raise KitRunError("--kit %s is neither a git repository of the starting kit nor an exported kit directory"
                      % kit)


def resolve_commit(git_dir: str, rev: str) -> str:
    """The commit `rev` names in `git_dir` (a KitRunError when it names none)."""
    commit = subprocess.run(["git", "--git-dir=" + git_dir, "rev-parse", rev + "^{commit}"], capture_output=True,
                            text=True)
    if commit.returncode != 0:
        raise KitRunError("cannot resolve %s in %s: %s" % (rev, git_dir, commit.stderr))
    return commit.stdout.strip()


def check(kit: str | None, rev: str = "HEAD") -> str:
    """Check, without exporting anything, that `kit` holds the kit's two programs at `rev`; returns the
    description a run would print. For `tools kit`, which names the problem before starting a run."""
    source = locate(kit)
    if source.git_dir is not None:
        commit = resolve_commit(source.git_dir, rev)
        for program in (INGESTION, SCORING):
            found = subprocess.run(["git", "--git-dir=" + source.git_dir, "cat-file", "-e",
                                    "%s:%s" % (commit, program.replace(os.sep, "/"))], capture_output=True)
            if found.returncode != 0:
                raise KitRunError("%s @ %s has no %s: not the AutoDL starting kit" % (source.git_dir, commit, program))
        return "git %s @ %s" % (source.git_dir, commit)
    for program in (INGESTION, SCORING):
        if not os.path.isfile(os.path.join(source.folder, program)):
            raise KitRunError("kit folder %s has no %s" % (source.folder, program))
    return "directory %s" % source.folder


def export(kit: str | None, rev: str, dest: str) -> str:
    """Export the kit into `dest`; return a description of what was exported (the summary's `kit`)."""
    source = locate(kit)
    if source.git_dir is not None:
        commit = resolve_commit(source.git_dir, rev)
        tar_bytes = subprocess.run(["git", "--git-dir=" + source.git_dir, "archive", "--format=tar", commit],
                                   capture_output=True, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as tar:
            try:
                tar.extractall(dest, filter="data")
            except TypeError:  # Python without extraction filters
                tar.extractall(dest)
        return "git %s @ %s" % (source.git_dir, commit)
    shutil.copytree(source.folder, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".git", "__pycache__"))
    return "directory %s" % source.folder
