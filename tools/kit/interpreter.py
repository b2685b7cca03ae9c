"""Does the interpreter that will run the kit's programs have what they import?

Probed in a child process (the runner's own interpreter may differ, and must not import TensorFlow),
so that a missing module is reported before the run instead of as a crash inside the kit's log.
"""
from __future__ import annotations

import subprocess

from tools.kit.errors import KitRunError

# What the kit's ingestion and scoring import (sklearn for the metrics, yaml for the metadata, psutil
# for the process checks, matplotlib for the learning curve, protobuf for data_pb2).
REQUIRED_MODULES = ("tensorflow", "numpy", "scipy", "pandas", "sklearn", "yaml", "psutil", "matplotlib",
                    "google.protobuf")

_PROBE = ("import importlib.util as u\n"
          "def has(m):\n"
          "  try:\n"
          "    return u.find_spec(m) is not None\n"
          "  except ImportError:\n"
          "    return False\n"
          "print(','.join(m for m in %r if not has(m)))\n"
          "print(has('tf_keras'))\n" % (REQUIRED_MODULES,))


def check_python(python: str) -> bool:
    """KitRunError when `python` cannot run or lacks a module the kit needs; else whether it has tf_keras
    (graph-mode tf.layers / tf.keras for TF1-style models)."""
    try:
        out = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise KitRunError("cannot run --python %s: %s" % (python, e))
    lines = out.stdout.splitlines()
    if out.returncode != 0 or len(lines) != 2:
        raise KitRunError("cannot probe --python %s: %s" % (python, out.stderr.strip()))
    if lines[0]:
        raise KitRunError("python %s lacks modules needed by the kit: %s (pip install tensorflow-cpu scipy "
                          "pandas scikit-learn pyyaml psutil matplotlib)" % (python, lines[0]))
    return lines[1] == "True"
