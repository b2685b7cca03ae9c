"""The any-time solver behind model.py: stages timed for ALC, budgets held, never a crash.

Each `train` call advances the current stage by one step; each `test` call returns the best
predictions so far (running the predictor the last step made ready, if any):

    thumbnails -> probe -> finetune        (autodl_core/stages/)

What the stages share (data, caches, candidates, the time planner) is in `RunContext`; every
time decision is the planner's (autodl_core/planner.py). This module is the kit-facing loop:
call deadlines, the stage dispatch, and degrading, never crashing, when something fails.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Callable

import numpy as np
import torch

from autodl_core import readers
from autodl_core.caches import FeatureCaches
from autodl_core.config import PipelineConfig
from autodl_core.device_plan import DevicePlan, plan_for
from autodl_core.ensemble import CandidatePool
from autodl_core.memory import MemoryBudget, release_freed_memory
from autodl_core.planner import MIN_STEP_SECONDS, SAFETY_SECONDS, TimePlanner, min_gain  # noqa: F401 (re-exported)
from autodl_core.run_context import RunContext, score
from autodl_core.run_data import RunData
from autodl_core.stages import FinetuneStage, ProbeStage, StepsStage, ThumbnailStage
from autodl_core.threads import ThreadGovernor
from autodl_core.warmup import Backbone, prepare_backbone

log = logging.getLogger("autodl_core.solver")

# (probe features, images, labels of the first examples) -> (a pipeline to fine-tune with instead, or None; why)
SecondChoiceCallback = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[PipelineConfig | None, str]]


class Solver:
    def __init__(self, metadata, config: PipelineConfig | None = None, device: str | None = None,
                 plan: DevicePlan | None = None, second_choice: SecondChoiceCallback | None = None):
        config = config or PipelineConfig()
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        plan = plan or plan_for(device)
        torch.set_num_threads(max(1, os.cpu_count() or 1))
        self.governor = ThreadGovernor()  # threads from the load other processes put on the machine
        self.governor.reading()
        memory = MemoryBudget(config.memory_cap_gb)  # the cap counts all the solver adds from here on
        net = prepare_backbone(config, metadata, device, plan)  # before the clock starts: the kit does not time it
        release_freed_memory()  # the warm-up's scratch, freed but still counted in the process's memory
        self.nets = {net.name: net}
        if config.uses_steps(device.type):
            self.nets.update(_step_backbones(config, metadata, device, plan, memory))
        log.info("backbones %s ready: %s", ", ".join(self.nets), memory.line())
        planner = TimePlanner(net.rate)
        data = RunData(metadata, config, device, planner, net.mean, net.std, plan, memory=memory)
        self.ctx = RunContext(config, metadata, device, plan, net, planner, data, FeatureCaches(net, data, plan, device),
                              CandidatePool(score, max_checkpoints=config.ensemble_checkpoints,
                                            single_noise_z=config.val_noise_z if config.uses_steps(device.type)
                                            else None), memory=memory)
        self.thumbnails = ThumbnailStage(self.ctx)
        self.probe = ProbeStage(self.ctx, self.thumbnails)
        if config.uses_steps(device.type):
            self.steps: StepsStage | None = StepsStage(self.ctx, self.thumbnails, self.probe, self.nets)
            last = self.steps
        else:
            self.steps, self._finetune = None, FinetuneStage(self.ctx, self.thumbnails, self.probe)
            last = self._finetune
        self.stages = {stage.name: stage for stage in (self.thumbnails, self.probe, last)}
        self.stage = "thumbnails"
        self.calls = self.test_calls = 0
        if device.type == "cpu":
            self._follow_load(trust_one=True)  # the warm-up's seconds are one long reading
        self.second_choice = second_choice

    # ------------------------------------------------------------------ what callers read
    @property
    def done_training(self) -> bool:
        return self.ctx.done_training

    @property
    def data(self) -> RunData:
        return self.ctx.data

    @property
    def candidates(self) -> CandidatePool:
        return self.ctx.candidates

    @property
    def strategy(self) -> str:
        return self.ctx.net.strategy

    @property
    def finetune(self) -> FinetuneStage | None:
        """The fine-tuning stage, or within the any-time steps the latest fine-tuning step (None before one)."""
        return self.steps.tune if self.steps is not None else self._finetune

    # ------------------------------------------------------------------ kit API
    def train(self, dataset, remaining_time_budget: float) -> None:
        ctx, started = self.ctx, time.monotonic()
        deadline = ctx.planner.call_deadline(started, remaining_time_budget)
        self.calls += 1
        if self.calls == 1:
            ctx.planner.clock_start = started
        try:
            if ctx.device.type == "cpu":
                self._follow_load()
            if deadline - time.monotonic() < MIN_STEP_SECONDS:
                # Not even a first look at the data: a budget below the safety margin (T = 2 s) or the end
                # of the run. test() still returns predictions of the right shape.
                log.info("train call %d: %.1fs left, too little for a step", self.calls, deadline - time.monotonic())
                ctx.done_training = True
            else:
                if ctx.data.train_reader is None:
                    ctx.data.open_train(dataset)
                self._step(deadline)
        except Exception:  # degrade, never crash: keep the last good predictions
            log.exception("train step failed in stage %s; keeping the last good predictions", self.stage)
            self._fallback_after_error()
        finally:
            log.info("train call %d (%s) took %.1fs; remaining %.1fs; %s", self.calls, self.stage,
                     time.monotonic() - started, deadline - time.monotonic(), ctx.memory.call_line())
            ctx.planner.returned()

    def test(self, dataset, remaining_time_budget: float):
        ctx, started = self.ctx, time.monotonic()
        data, predictions = ctx.data, ctx.predictions
        deadline = ctx.planner.call_deadline(started, remaining_time_budget)
        self.test_calls += 1
        try:
            if data.test_x is None and deadline <= started and readers.declared_test_count(ctx.metadata) is not None:
                # Begun past its deadline with no test example read: the prior, of the declared size, at once.
                data.n_test = readers.declared_test_count(ctx.metadata)
            elif data.test_x is None:
                data.read_test(dataset, deadline)
            if data.test_x is not None and predictions.pending is None and deadline - time.monotonic() > 0.5:
                predictions.pending = predictions.predictor(deadline) if predictions.predictor else None
            if predictions.pending is not None:
                predictions.last_good = data.sanitize(predictions.pending)
        except Exception:
            log.exception("test failed in stage %s; returning the last good predictions", self.stage)
            if data.test_x is None and data.n_test is None:
                data.n_test = data.count_test(dataset)
        predictions.pending = None
        result = predictions.last_good if predictions.last_good is not None else data.prior_predictions()
        if deadline - time.monotonic() < 1.0:
            ctx.done_training = True
        log.info("test call %d took %.1fs; remaining %.1fs; %s", self.test_calls, time.monotonic() - started,
                 deadline - time.monotonic(), ctx.memory.call_line())
        ctx.planner.returned()
        return result

    def _step(self, deadline: float):
        stage = self.stages.get(self.stage)
        if stage is None:
            self.ctx.done_training = True
            return
        self.stage = stage.step(deadline)
        if stage is self.probe and self.stage == "finetune" and self.second_choice is not None:
            self._second_look()

    def _follow_load(self, trust_one: bool = False):
        """Compute with the cores other processes leave (autodl_core/threads.py): torch and the engines."""
        threads = self.governor.update(trust_one=trust_one)
        if threads is None:
            return
        torch.set_num_threads(threads)
        for net in self.nets.values():
            net.set_threads(threads)

    def _second_look(self):
        """Once, between the probe and fine-tuning: the caller (model.py: the meta-knowledge store) may
        exchange the fine-tuning stage's settings for others, given what the probe has seen. Fine-tuning
        has not started, so its stage is simply made anew; a failing callback changes nothing."""
        callback, self.second_choice = self.second_choice, None
        started = time.monotonic()
        try:
            config, reason = callback(*self.probe.first_examples())
        except Exception as exc:  # the first choice stands
            log.warning("second look at the pipeline failed (%s): keeping %s", exc, self.ctx.config.pipeline_id())
            return
        log.info("second look (%.2fs): %s", time.monotonic() - started, reason)
        if config is None or config == self.ctx.config:
            return
        if not self.ctx.config.same_until_finetuning(config, self.ctx.device.type):
            log.warning("second look proposed %s, which differs before fine-tuning: ignored", config.pipeline_id())
            return
        self.ctx.config = config
        if self.steps is not None:
            self.steps = StepsStage(self.ctx, self.thumbnails, self.probe, self.nets)
            self.stages["finetune"] = self.steps
        else:
            self._finetune = FinetuneStage(self.ctx, self.thumbnails, self.probe)
            self.stages["finetune"] = self._finetune

    def _fallback_after_error(self):
        """After an internal error, stop the stage that failed; the next test returns the last good predictions."""
        ctx = self.ctx
        ctx.predictions.nothing_new()
        if self.stage == "finetune" or self.calls > 50:
            ctx.done_training = True
        elif self.stage == "probe" and ctx.caches.train_features is None:
            self.stage = "done"
            ctx.done_training = True

    # ------------------------------------------------------------------ reports
    def stats(self) -> dict:
        """What this run measured, for reports: device, strategy, sizes, step counts and rates."""
        ctx = self.ctx
        finetune = self.finetune
        tuner = finetune.tuner if finetune is not None else None
        per_step = tuner.seconds_per_step if tuner is not None else None
        return {
            "device": torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu",
            "pipeline_id": ctx.config.pipeline_id(), "pipeline": ctx.config.to_dict(),
            "strategy": ctx.net.strategy, "stage": self.stage,
            "probe_size": list(self.probe.size or ()),
            "finetune_size": list((finetune.size if finetune is not None else None) or ()),
            "feature_images_per_s": round(ctx.planner.feature_rate(self.probe.size or (64, 64)), 1),
            "warmup_rates": [(int(r), round(v, 1)) for r, v in ctx.net.warmup_rates],
            "train_batch": tuner.batch_size if tuner is not None else None,
            "train_steps": tuner.steps if tuner is not None else 0,
            "train_seconds_per_step": round(per_step, 5) if per_step else None,
            "train_images_per_s": round(tuner.batch_size / per_step, 1) if per_step else None,
            "flip_tta": finetune.tta.on if tuner is not None else None,
            "n_train_read": ctx.data.n_read,
            "threads": self.governor.threads,
            "engines": {name: net.engines() for name, net in self.nets.items()},
            "storage_hw": list(ctx.data.profile.storage_hw) if ctx.data.profile else [],
            "steps": list(self.steps.history) if self.steps is not None else [],
            "memory_held_peak_gb": round(ctx.memory.peak_held_gb, 2),  # the most the solver held at its checks
            "validation": (self.steps.split_report.line() if self.steps is not None and self.steps.split_report
                           else None),
        }


def _step_backbones(config: PipelineConfig, metadata, device: torch.device, plan: DevicePlan,
                    memory: MemoryBudget) -> dict[str, Backbone]:
    """The other backbones the any-time steps may use, built and measured before the clock starts; one that
    cannot be loaded (weights not installed) is left out, saying why.

    Each backbone with its inference engines holds memory (0.45-0.5 GB each on a 2-core EPYC with
    OpenVINO, once the warm-up's freed scratch is handed back): one is left out when what the solver holds
    so far, plus what the last backbone took, would pass the memory cap (`memory`).
    """
    nets = {}
    grown = memory.held_gb()
    cost = grown  # the first backbone with its engines: about what one more takes
    for name in config.step_backbone_names()[1:]:
        if grown + cost > memory.cap_gb:
            log.info("step backbone %s left out: the backbones built hold %.2f GB and one more takes about %.2f GB, "
                     "beyond the memory cap of %.2f GB", name, grown, cost, memory.cap_gb)
            continue
        try:
            nets[name] = prepare_backbone(config, metadata, device, plan, name=name)
        except Exception as exc:  # missing weight package, unknown name: the steps go on without it
            log.warning("step backbone %s left out: %s", name, exc)
            continue
        release_freed_memory()
        now = memory.held_gb()
        cost, grown = (now - grown) if now > grown else cost, now
    return nets
