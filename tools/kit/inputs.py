"""The dataset and code folders a run is given, as the kit's programs expect them.

`kit:` names point into the run's export of the kit, so that the kit's own samples and baselines can
be used without knowing where the export lands: `kit:NAME` is the dataset AutoDL_sample_data/NAME
(`kit:miniciao`, `kit:Monkeys`), `kit:RELPATH` any folder of the kit (a dataset path with a `/`, or
a code dir such as `kit:AutoDL_simple_baseline_models/linear`).
"""
from __future__ import annotations

import os

from tools.kit.errors import KitRunError

KIT_PREFIX = "kit:"
SAMPLE_DATA = "AutoDL_sample_data"


def resolve(path: str, kit_dir: str, what: str) -> str:
    """The absolute folder `path` names (`what`: "dataset" or "code"); a KitRunError when there is none."""
    if path.startswith(KIT_PREFIX):
        rel = path[len(KIT_PREFIX):].strip("/")
        if what == "dataset" and "/" not in rel:
            rel = os.path.join(SAMPLE_DATA, rel)
        path = os.path.join(kit_dir, rel)
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise KitRunError("%s dir not found: %s" % (what, path))
    return path


def dataset_task(dataset_dir: str) -> str:
    """The task name of a kit-style dataset folder: exactly one `<name>.data/` (with train/ and test/, each
    holding metadata.textproto) and one `<name>.solution`, as the kit's ingestion and scoring look for."""
    datas = [d for d in os.listdir(dataset_dir) if d.endswith(".data")]
    sols = [d for d in os.listdir(dataset_dir) if d.endswith(".solution")]
    if len(datas) != 1 or len(sols) != 1:
        raise KitRunError("dataset dir %s must contain exactly one *.data folder and one *.solution file "
                          "(found %s, %s)" % (dataset_dir, datas, sols))
    task = datas[0][:-len(".data")]
    for sub in ("train", "test"):
        if not os.path.isfile(os.path.join(dataset_dir, datas[0], sub, "metadata.textproto")):
            raise KitRunError("missing %s/%s/metadata.textproto" % (datas[0], sub))
    return task


def check_code_dir(code_dir: str) -> None:
    """The kit's ingestion imports `model.py` from the code dir: refuse a folder without one."""
    if not os.path.isfile(os.path.join(code_dir, "model.py")):
        raise KitRunError("no model.py in code dir %s" % code_dir)
