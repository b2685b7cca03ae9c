"""Loaded by pytest before any test module: triton (through torch._dynamo) before TensorFlow.

Loading triton after TensorFlow segfaults with the CUDA wheels (model.py and tools.ingestion take the
same care). In the whole suite a test module that imports torch._dynamo at collection made the order
right by chance; a subset of test files (e.g. tests/test_convert.py, which imports TensorFlow, then
tests/test_arrays.py) crashed. Importing it here makes every selection safe.
"""
try:
    import torch._dynamo  # noqa: F401
except Exception:  # pragma: no cover - torch without dynamo, or no torch: nothing to order
    pass
