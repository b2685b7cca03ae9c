"""The solver's stages, in the order a run goes through them.

Each stage has `step(deadline) -> str` (one train call's work; returns the stage for the next
call) and a predictor the next test call runs when the step made a new prediction ready.
  thumbnails: a linear head on raw-pixel thumbnails: the first prediction within seconds;
  probe:      frozen pretrained features and a linear head, refitted as more data is read;
  finetune:   LP-FT of the backbone (or its top blocks) in growing time slices; on a CPU, any-time
              steps of growing strength (probes and fine-tuning at larger sizes, other backbones).
"""
from autodl_core.stages.finetune import FinetuneStage
from autodl_core.stages.probe import ProbeStage
from autodl_core.stages.steps import StepsStage
from autodl_core.stages.thumbnails import ThumbnailStage

__all__ = ["ThumbnailStage", "ProbeStage", "FinetuneStage", "StepsStage"]
