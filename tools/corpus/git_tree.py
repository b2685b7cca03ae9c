"""Read a repository's files at one commit straight from its git folder (no work tree needed).

Snapshots brought with `fetch`, a `git clone --bare` or an ordinary clone all work: the recipe names
the repository (`github.com/owner/name`) and the commit; `find_git_dir` looks for it under the
mirror folders a user passes (`owner+name/repo/.git`, `owner+name/.git`, `owner+name.git`,
`owner/name/.git`, `owner/name.git`).
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tools.errors import UserInputError


def repo_slug(repo: str) -> str:
    """'github.com/owner/name' or 'owner/name' -> 'owner/name'."""
    parts = repo.strip("/").split("/")
    if len(parts) < 2:
        raise UserInputError(f"repository '{repo}' is not of the form [github.com/]owner/name")
    return "/".join(parts[-2:])


def find_git_dir(repo: str, mirrors: list[Path]) -> Path:
    owner, name = repo_slug(repo).split("/")
    candidates = []
    for root in mirrors:
        candidates += [root / f"{owner}+{name}" / "repo" / ".git", root / f"{owner}+{name}" / ".git",
                       root / f"{owner}+{name}.git", root / owner / name / ".git", root / owner / f"{name}.git",
                       root / f"{owner}+{name}" / "repo"]
    for path in candidates:
        if (path / "HEAD").is_file() and (path / "objects").is_dir():
            return path
    shown = ", ".join(str(m) for m in mirrors) or "(none given: pass --mirrors)"
    raise UserInputError(f"no git snapshot of {owner}/{name} under {shown}; bring one with "
                         f"`git clone --bare https://github.com/{owner}/{name} <mirror>/{owner}+{name}.git`")


NO_LAZY_FETCH = {**os.environ, "GIT_NO_LAZY_FETCH": "1"}  # a partial clone must not go to the network for a blob


@dataclass(frozen=True)
class Blob:
    path: str
    size: int
    sha: str


class GitTree:
    """The files of `commit` in `git_dir`: listed once, read through one `git cat-file --batch`."""

    def __init__(self, git_dir: Path, commit: str):
        self.git_dir, self.commit = Path(git_dir), commit
        listing = self._git("ls-tree", "-r", "-z", commit)
        entries = []
        for entry in listing.split(b"\0"):
            if entry:
                meta, path = entry.split(b"\t", 1)
                _mode, kind, sha = meta.split()
                if kind == b"blob":
                    entries.append((path.decode(), sha.decode()))
        # Sizes from the objects themselves; an object the snapshot lacks (large files, LFS) is left out.
        checked = subprocess.run(["git", f"--git-dir={self.git_dir}", "cat-file", "--batch-check"],
                                 input="".join(sha + "\n" for _, sha in entries).encode(), capture_output=True,
                                 env=NO_LAZY_FETCH)
        lines = checked.stdout.decode().splitlines()
        if checked.returncode != 0 or len(lines) != len(entries):
            raise UserInputError(f"git cat-file --batch-check in {self.git_dir}: {checked.stderr.decode().strip()}")
        self.blobs: dict[str, Blob] = {}
        self.missing: list[str] = []
        for (path, sha), line in zip(entries, lines):
            fields = line.split()
            if len(fields) == 3 and fields[1] == "blob":
                self.blobs[path] = Blob(path, int(fields[2]), sha)
            else:
                self.missing.append(path)
        self._reader = None

    def _git(self, *args) -> bytes:
        done = subprocess.run(["git", f"--git-dir={self.git_dir}", *args], capture_output=True)
        if done.returncode != 0:
            raise UserInputError(f"git {' '.join(args[:2])} in {self.git_dir}: {done.stderr.decode().strip()} "
                                 f"(is commit {self.commit} in this snapshot?)")
        return done.stdout

    def read(self, path: str) -> bytes:
        blob = self.blobs.get(path)
        if blob is None:
            why = ("is absent from this snapshot (files of 4 MiB and more and LFS content may be left out)"
                   if path in self.missing else "is not in it")
            raise UserInputError(f"{path} {why}: {self.git_dir} at {self.commit[:12]}")
        if self._reader is None:
            self._reader = subprocess.Popen(["git", f"--git-dir={self.git_dir}", "cat-file", "--batch"],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=NO_LAZY_FETCH)
        self._reader.stdin.write(blob.sha.encode() + b"\n")
        self._reader.stdin.flush()
        header = self._reader.stdout.readline().split()
        if len(header) != 3 or header[1] != b"blob":
            raise UserInputError(f"{path}: object {blob.sha} missing from {self.git_dir} (a partial snapshot: "
                                 "files of 4 MiB and more or LFS content may be absent)")
        data = self._reader.stdout.read(int(header[2]))
        self._reader.stdout.read(1)  # the newline after the content
        if len(data) != int(header[2]):
            raise UserInputError(f"{path}: git cat-file ended after {len(data)} of {header[2]} bytes")
        return data

    def close(self) -> None:
        if self._reader is not None:
            self._reader.stdin.close()
            try:
                self._reader.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._reader.kill()
                self._reader.wait()
            self._reader.stdout.close()
            self._reader = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
