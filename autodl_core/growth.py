"""Progressive resizing: when fine-tuning has converged at one resolution and time is left,
go on at a larger one from the best weights (the fine-tuning stage makes the move; this module
says whether there is a next size)."""
from __future__ import annotations

from autodl_core.config import PipelineConfig
from autodl_core.images import working_size

SATURATED_VAL = 0.9995  # a validation score above this leaves nothing for a larger resolution to win


class ResolutionGrowth:
    def __init__(self, config: PipelineConfig):
        self.config = config
        self.growths = 0  # resolution growths so far
        self.refused_at = None  # working size at which a growth was refused for lack of time

    def next_size(self, size, storage_hw, best_score: float, has_best_weights: bool):
        """The next working size, or None: growths used up, no best weights to go on from, validation
        saturated, refused at this size before (time only shrinks), or no larger size within the
        storage shape and the maximum resolution."""
        cfg = self.config
        if self.growths >= cfg.max_resolution_growths or not has_best_weights \
                or best_score > SATURATED_VAL or self.refused_at == size:
            return None
        target = int(round(min(size) * cfg.resolution_growth))
        new_size = working_size(storage_hw, min(target, cfg.max_resolution))
        if min(new_size) <= min(size):
            return None
        return new_size

    def refuse(self, size):
        """No time for a growth at `size`: do not ask again there."""
        self.refused_at = size

    def grew(self):
        self.growths += 1
