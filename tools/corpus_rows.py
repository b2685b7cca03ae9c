"""What the per-dataset measuring commands share (`tools frozen-probe`, `tools split-check`): corpus folders
checked up front, and their rows printed as a markdown table and kept as JSON."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from autodl_core.errors import UserInputError


def require_corpus_folders(folders: list[str]) -> None:
    """Every folder holds a corpus data.npz: a clear error before minutes of work, naming the first that does not."""
    for folder in folders:
        if not os.path.isfile(os.path.join(folder, "data.npz")):
            raise UserInputError(f"not a corpus dataset folder (no data.npz): {folder}")


def finish(rows: list[dict], markdown: Callable[[list[dict]], str], out: str | None) -> int:
    print()
    print(markdown(rows))
    if out:
        Path(out).write_text(json.dumps(rows, indent=1))
    return 0
