"""autodl_core: the any-time AutoDL image-classification solver (data, profile, learner, schedule, solver, metrics)."""

__version__ = "0.1.0"
