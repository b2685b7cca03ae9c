"""Zero-shot pipeline choice from metadata alone (called in Model.__init__, must answer fast).

v0: the default pipeline; the meta-knowledge store replaces this with a nearest-neighbour
choice over meta-features (see issue 'Meta-knowledge store v1').
"""
from __future__ import annotations

from autodl_core.config import PipelineConfig


def select_pipeline(metadata) -> tuple[PipelineConfig, str]:
    """Returns (pipeline, a short reason for the log)."""
    return PipelineConfig(), "default pipeline (no meta-knowledge store yet)"
