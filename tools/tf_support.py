"""TensorFlow for the `tools` commands that write or read TFRecords or run the kit's ingestion.

TensorFlow is the `[kit]` extra, not a core dependency: `require_tensorflow` turns its absence into
a UserInputError (exit 2) at the command's entry, and `import_tensorflow` is the one way the tools
import it: after torch (the reverse order segfaults), in the kit's graph mode when asked, and without the
lines its native libraries print on every import (absl's "All log messages before
absl::InitializeLog() ..." and the oneDNN notice; TF_CPP_MIN_LOG_LEVEL does not silence them in
TF 2.21), in this process only: the kit's processes and our ingestion child log as they always do.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import tempfile

from tools.errors import UserInputError

MISSING_MESSAGE = "this command needs TensorFlow: pip install 'autodl-solver[kit]'"

# Start-up lines of TensorFlow's native libraries, printed to file descriptor 2 on every import.
IMPORT_NOISE = (
    "All log messages before absl::InitializeLog() is called are written to STDERR",
    "oneDNN custom operations are on",
    "This TensorFlow binary is optimized to use available CPU instructions",
    "To enable the following instructions",
    "Unable to register cuDNN factory",
    "Unable to register cuFFT factory",
    "Unable to register cuBLAS factory",
    "computation placer already registered",
    "TF-TRT Warning: Could not find TensorRT",
)


def tensorflow_available() -> bool:
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"] is not None
    try:
        return importlib.util.find_spec("tensorflow") is not None
    except (ImportError, ValueError):
        return False


def require_tensorflow(why: str | None = None) -> None:
    """UserInputError (exit 2) naming the `[kit]` extra when TensorFlow cannot be imported."""
    if not tensorflow_available():
        raise UserInputError(MISSING_MESSAGE + (f" ({why})" if why else ""))


def load_torch_first() -> None:
    """torch, and triton through torch._dynamo, before TensorFlow: loading triton after TensorFlow 2.21
    segfaults, and any later code in the process (the solver, the test suite) may load it."""
    try:
        import torch  # noqa: F401
        import torch._dynamo  # noqa: F401
    except ImportError:
        pass


def import_tensorflow(why: str | None = None, mode: str | None = None, quiet: bool = True):
    """The one way the tools import TensorFlow: torch first (`load_torch_first`), graph-capable Keras 2
    and TF1 semantics for `mode="graph"` (as the challenge platform runs the kit), and with `quiet` its
    start-up lines on stderr filtered out (environment untouched; the kit's ingestion child logs as the
    kit always does: `quiet=False`). Returns the module; a UserInputError naming the extra without it."""
    require_tensorflow(why)
    load_torch_first()
    if mode == "graph" and importlib.util.find_spec("tf_keras") is not None:
        os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    tf = sys.modules.get("tensorflow") or (_import_quietly() if quiet else importlib.import_module("tensorflow"))
    if mode == "graph":
        tf.compat.v1.disable_v2_behavior()
    return tf


def _import_quietly():
    """`import tensorflow` with its start-up lines (IMPORT_NOISE) filtered out of stderr."""
    try:
        saved = os.dup(2)
    except OSError:  # no file descriptor 2: nothing to filter
        import tensorflow as tf

        return tf
    with tempfile.TemporaryFile() as capture:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(capture.fileno(), 2)
        try:
            import tensorflow as tf
        finally:
            try:
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            _replay(capture.read())
    return tf


def _replay(captured: bytes) -> None:
    """What TensorFlow printed while importing, less IMPORT_NOISE, back to stderr (a real warning or error)."""
    kept = [line for line in captured.decode(errors="replace").splitlines(keepends=True)
            if not any(noise in line for noise in IMPORT_NOISE)]
    if kept:
        sys.stderr.write("".join(kept))
        sys.stderr.flush()
