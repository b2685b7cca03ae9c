"""The data readers the solver calls: the reader follows the dataset it is handed.

Under the kit the datasets are tf.data datasets, read by `autodl_core.tfreader`; on a host without
TensorFlow (`tools run-npz`) they are `autodl_core.arrays.ArrayDataset`s, read by `arrays`. Choosing
per call, from the object itself, keeps one solver for both hosts with no global switch to forget,
lets one process hold both kinds (the equivalence tests do), and keeps this module free of
TensorFlow: tfreader imports it only when a tf.data dataset is actually read.
"""
from __future__ import annotations

from autodl_core import arrays, tfreader
from autodl_core.tfreader import PeekResult, value_transform  # noqa: F401  (one value mapping for both readers)


def _reader_module(dataset):
    return arrays if isinstance(dataset, arrays.ArrayDataset) else tfreader


def peek(dataset, n: int = 48, deadline: float | None = None) -> PeekResult:
    return _reader_module(dataset).peek(dataset, n, deadline)


def ChunkReader(dataset, storage_hw: tuple[int, int], offset: float = 0.0, scale: float = 255.0,  # noqa: N802
                batch_size: int = 64):
    """A chunk reader of the dataset's kind (same constructor and `read`/`exhausted`/`n_read` for both)."""
    return _reader_module(dataset).ChunkReader(dataset, storage_hw, offset, scale, batch_size)


def count_examples(dataset, batch_size: int = 256) -> int:
    if isinstance(dataset, arrays.ArrayDataset):
        return arrays.count_examples(dataset)
    return tfreader.count_examples(dataset, batch_size)


def declared_test_count(metadata) -> int | None:
    """The kit's declared test size; None for in-memory metadata (one split only; counting is free there)."""
    if isinstance(metadata, arrays.ArrayMetadata):
        return None
    return tfreader.declared_test_count(metadata)
