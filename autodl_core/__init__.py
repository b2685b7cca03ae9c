"""autodl_core: the any-time AutoDL image-classification solver (data, profile, learner, schedule, solver, metrics).

`AutoDLClassifier` (autodl_core/estimator.py) is the solver for numpy arrays, scikit-learn style.
"""

__version__ = "1.0.7"

__all__ = ["AutoDLClassifier", "__version__"]


def __getattr__(name):
    """`from autodl_core import AutoDLClassifier` without importing the estimator's modules on every
    `import autodl_core` (the kit path never needs them)."""
    if name == "AutoDLClassifier":
        from autodl_core.estimator import AutoDLClassifier

        return AutoDLClassifier
    raise AttributeError(f"module 'autodl_core' has no attribute {name!r}")
