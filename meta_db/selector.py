"""Zero-shot pipeline choice in Model.__init__: nearest neighbours (or a learned ridge ranking) over
metadata meta-features.

`select_pipeline(metadata) -> (PipelineConfig, reason)` always answers with a valid pipeline:
- AUTODL_PIPELINE_JSON set (a JSON PipelineConfig dict, or a path to a JSON file): that pipeline,
  no questions asked (meta-training forces each run's pipeline this way). An invalid value raises:
  measuring a different pipeline than the one recorded would poison the store.
- otherwise the store (meta_db/store.sqlite, or AUTODL_META_STORE) is read once per process; the
  runs in use (not of a retired code version) of one stratum (the hardware kind of this machine,
  the time budget closest to the expected one: AUTODL_TIME_BUDGET, default 1200 s) form a
  dataset x pipeline ALC matrix (`meta_db.knowledge`); each entry becomes its gap to the best
  pipeline of its dataset, and a selector (`meta_db.selectors`) estimates the gap of each pipeline
  on this dataset from its `zero_shot_vector`: the k nearest datasets vote with their gaps, or
  (AUTODL_SELECTOR=ridge) a ridge regression predicts them; the smallest expected gap wins.
- far from every stored dataset (distance beyond what the store's own datasets show), the
  best fixed pipeline (`best_fixed`); no usable store: PipelineConfig() defaults.
Stored pipelines this code cannot run (unknown fields; when torch is loaded: a backbone not
registered or without local weights), and those the store retired (`tools meta-train
--retire-pipeline`), are left out.
"""
from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path

from autodl_core.config import PipelineConfig
# ENV_BUDGET: what a run is told its time budget by, beside ENV_PIPELINE (meta-training sets both)
from meta_db.knowledge import ENV_BUDGET, expected_time_budget, load_knowledge  # noqa: F401
from meta_db.metafeatures import current_device_kind, zero_shot_of
from meta_db.selectors import ENV_SELECTOR, GapSelector, make_selector
from meta_db.store import DEFAULT_STORE_PATH

ENV_PIPELINE = "AUTODL_PIPELINE_JSON"
ENV_STORE = "AUTODL_META_STORE"

log = logging.getLogger("meta_db.selector")


# ---------------------------------------------------------------------- forced pipeline


def forced_pipeline(value: str) -> PipelineConfig:
    """AUTODL_PIPELINE_JSON's value: a JSON object or a path to a JSON file holding one."""
    text = value.strip()
    if not text.startswith("{"):
        path = Path(text)
        if not path.is_file():
            raise ValueError(f"{ENV_PIPELINE}={value!r} is neither a JSON object nor an existing JSON file")
        text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{ENV_PIPELINE}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{ENV_PIPELINE}: expected a JSON object of PipelineConfig fields, got {type(data).__name__}")
    try:
        return PipelineConfig.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{ENV_PIPELINE}: not a valid PipelineConfig ({exc})") from None


# ---------------------------------------------------------------------- entry point


_CACHE: dict = {}


def _backbone_ok():
    """A pipeline is runnable here when its backbone is registered and its weights are found locally.

    Checked only when cheap, i.e. torch is already loaded (model.py loads it first): importing
    `pretrained` then costs only what the solver pays right after anyway.
    """
    if "torch" not in sys.modules:
        return None
    try:
        from pretrained import list_backbones, weights_available

        names = set(list_backbones())
    except Exception:
        return None
    verdicts: dict = {}

    def ok(name: str) -> bool:
        if name not in verdicts:
            try:
                verdicts[name] = name in names and bool(weights_available(name))
            except Exception:
                verdicts[name] = False
        return verdicts[name]

    return ok


def selector_for(path: Path) -> GapSelector:
    """The selector of the store at `path`, built once per process (and per store file, device, budget)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, current_device_kind(), expected_time_budget(),
           os.environ.get(ENV_SELECTOR))
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = make_selector(load_knowledge(path, backbone_ok=_backbone_ok()))
    return _CACHE[key]


def store_path() -> Path:
    return Path(os.environ.get(ENV_STORE) or DEFAULT_STORE_PATH)


CHOICE_LOG_RE = re.compile(r"model INFO: pipeline ([0-9a-f]{12}) \((.*)\)\s*$", re.MULTILINE)


def choice_log_line(config: PipelineConfig, reason: str) -> str:
    """What model.py logs about its pipeline; `parse_choice_log` reads it back (bench, meta-train import)."""
    return f"pipeline {config.pipeline_id()} ({reason})"


def parse_choice_log(text: str) -> tuple[str, str] | None:
    """(pipeline_id, reason) of the first pipeline line model.py logged, or None."""
    match = CHOICE_LOG_RE.search(text)
    return (match.group(1), match.group(2)) if match else None


def select_pipeline(metadata, store: str | os.PathLike | None = None) -> tuple[PipelineConfig, str]:
    """Returns (pipeline, a short reason for the log); see the module docstring."""
    forced = os.environ.get(ENV_PIPELINE)
    if forced:
        config = forced_pipeline(forced)
        return config, f"forced by {ENV_PIPELINE}"
    path = Path(store) if store is not None else store_path()
    try:
        vector = zero_shot_of(metadata)
    except Exception as exc:
        return PipelineConfig(), f"default pipeline (metadata unusable: {exc})"
    if not path.is_file():
        return PipelineConfig(), f"default pipeline (no meta-knowledge store at {path})"
    try:
        selector = selector_for(path)
        if selector.empty:
            return PipelineConfig(), (f"device default pipeline (store {path.name} holds no usable run "
                                      f"measured on this kind of hardware, {current_device_kind()})")
        pipeline_id, reason = selector.choose(vector)
    except Exception as exc:  # a broken store must never stop the solver
        log.warning("meta-knowledge store unusable (%s): default pipeline", exc)
        return PipelineConfig(), f"default pipeline (store unusable: {exc})"
    if pipeline_id is None:
        return PipelineConfig(), f"default pipeline ({reason})"
    knowledge = selector.knowledge
    return knowledge.configs[pipeline_id], f"{reason} [T={knowledge.time_budget:g}s, {knowledge.hardware}]"


def pipeline_for_run(metadata, store: str | os.PathLike | None = None) -> tuple[PipelineConfig, str]:
    """What model.py runs: `select_pipeline`'s answer, where the store chose it, as the first step of the
    any-time steps (the shipped store measured its members as single stages, before the steps; its choice
    sets the backbone and the first sizes, the steps go on from there). A forced pipeline runs as given."""
    config, reason = select_pipeline(metadata, store)
    if os.environ.get(ENV_PIPELINE) or config.anytime_steps:
        return config, reason
    return config.as_steps(), f"{reason}; {config.pipeline_id()} as the first of the any-time steps"
