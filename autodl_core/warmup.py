"""The backbone, made ready before the clock starts: weights loaded, split for the chosen
strategy, every kernel warmed up, and the rates the planner starts from measured.

The kit does not time `Model.__init__`; whatever is slow on first use (oneDNN kernels, cuDNN's
per-shape tuning) is paid here instead of inside the scored run.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from autodl_core.config import PipelineConfig
from autodl_core.device_plan import DevicePlan
from autodl_core.engines import EngineChoice, TorchRunner, choose_runner, images_per_s
from autodl_core.images import Preprocessor, working_size
from autodl_core.learner import Classifier, FineTuner, inference_autocast
from autodl_core.planner import RateMeter, in_seconds
from autodl_core.planner import SideRate
from autodl_core.trunk import split_backbone

log = logging.getLogger("autodl_core.warmup")

# The fine-tuning's resident memory over its training step's saved tensors alone (gradients, optimiser
# temporaries, the validation and test predictions between slices), as the process grew through the kit
# at batch 32: EfficientNet-Lite2's top at 288 x 296 px on DTD 1.7x, MobileNetV2's at 344 x 256 on trashnet
# 1.65x and at 160 x 216 on blood cells 1.55x (1.0.4-1.0.6 used 1.2, from one step of Lite2 at batch 64:
# their peaks passed the cap by 0.3-0.6 GB while tuning).
TRAINING_OVERHEAD = 1.7


@dataclass
class Backbone:
    """The pretrained network and what the warm-up measured about it on this device."""
    network: nn.Module
    trunk: nn.Module  # cached as activations (top mode), or the whole network (full fine-tuning)
    top: nn.Module  # what is trained on the cached activations (nn.Identity in full fine-tuning)
    n_features: int
    mean: tuple
    std: tuple
    strategy: str  # "finetune" (full) or "finetune_top" (the top blocks on cached activations) or "probe"
    rate: RateMeter  # feature extraction, pixels/s
    cpu_bf16: bool = False
    warmup_rates: list = field(default_factory=list)  # (resolution, images/s)
    warm_step_seconds: float | None = None  # a full fine-tuning step at the expected size and batch (GPU)
    # How frozen passes of the trunk and of the frozen top run (autodl_core/engines.py): torch, or the
    # faster inference engine the warm-up measured and checked.
    trunk_engine: EngineChoice | None = None
    top_engine: EngineChoice | None = None
    name: str = ""
    # Images/s of a training step of the top (CPU recipe, batch 32) by working side, measured at two sides:
    # per pixel it is faster at larger sides (MobileNetV2: 528 img/s at 64 px, 88 at 224, not 44).
    train_rate: "SideRate | None" = None
    # The trunk's output: channels, and its stride (0: pooled features, whatever the size); what one
    # example's cached activations take at a size (fp16), for the memory cap.
    trunk_channels: int = 0
    trunk_stride: int = 0
    # What the top's training step keeps for its backward pass, per training example and input pixel
    # (measured by the warm-up: the autograd graph's saved tensors): a step's working set beside its caches.
    # EfficientNet-Lite2's top at 256 x 264 px took 1.5 GB on DTD that the caches' count had not foreseen.
    train_bytes_per_pixel: float = 0.0

    def activation_bytes(self, size) -> int:
        """Bytes of one example's cached (fp16) trunk activations at working size `size`."""
        if not self.trunk_stride:
            return 2 * self.trunk_channels
        h, w = (-(-int(side) // self.trunk_stride) for side in size)
        return 2 * self.trunk_channels * h * w

    def training_bytes(self, size, batch_size: int) -> int:
        """Bytes the top's training step at working size `size` holds for its backward pass, with the
        temporaries beside it (TRAINING_OVERHEAD); 0 before the warm-up measured it."""
        return int(TRAINING_OVERHEAD * self.train_bytes_per_pixel * batch_size * size[0] * size[1])

    @property
    def trunk_runner(self):
        return self.trunk_engine.runner if self.trunk_engine else TorchRunner(self.trunk, "cpu", self.cpu_bf16)

    @property
    def top_runner(self):
        return self.top_engine.runner if self.top_engine else TorchRunner(self.top, "cpu", self.cpu_bf16)

    def frozen_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled frozen features of a preprocessed batch: the trunk's runner, then the top's."""
        return self.top_runner(self.trunk_runner(x))

    def engines(self) -> dict:
        """{"trunk": engine, "top": engine} for reports."""
        return {part: (choice.name if choice else "torch") for part, choice in
                (("trunk", self.trunk_engine), ("top", self.top_engine))}

    def set_threads(self, threads: int) -> None:
        """The engines' thread count (torch's own is process-wide): the run's load may change it."""
        for choice in (self.trunk_engine, self.top_engine):
            if choice is not None:
                choice.runner.set_threads(threads)


def prepare_backbone(config: PipelineConfig, metadata, device: torch.device, plan: DevicePlan,
                     name: str | None = None) -> Backbone:
    """The backbone `name` (default: the pipeline's) built, split, warmed up and measured."""
    from pretrained import create_backbone, get_spec

    name = name or config.backbone
    spec = get_spec(name)
    network = create_backbone(name, pretrained=True, num_classes=0)
    network.to(device).eval()
    network = network.to(memory_format=torch.channels_last)
    strategy = config.resolved_strategy(device.type)
    if strategy == "finetune":
        # Full fine-tuning needs no trunk-activation cache: the probe caches pooled features.
        trunk, top = network, nn.Identity()
    else:
        trunk, top = split_backbone(network, config.trunk_blocks)
    net = Backbone(network, trunk, top, int(network.num_features), spec.mean, spec.std, strategy, RateMeter(1.0),
                   name=name)
    net.trunk_channels, net.trunk_stride = _trunk_output(trunk, device)
    if device.type == "cuda":
        _warm_up_gpu(net, config, metadata, device, plan)
    else:
        _warm_up_cpu(net, config, metadata, device)
    log.info("backbone %s ready on %s; warm-up throughput %s%s", name, device, net.warmup_rates,
             "" if net.train_rate is None else f"; top training {net.train_rate.points}, "
             f"{net.training_bytes((192, 192), 32) / 1e9:.2f} GB at 192 px, batch 32")
    return net


def _trunk_output(trunk: nn.Module, device: torch.device, side: int = 64) -> tuple[int, int]:
    """(channels, stride) of the trunk's output, from one small image (stride 0: a pooled output)."""
    with torch.inference_mode():
        out = trunk.eval()(torch.zeros(1, 3, side, side, device=device))
    if out.dim() == 4:
        return int(out.shape[1]), max(1, side // max(1, int(out.shape[2])))
    return int(out.shape[-1]), 0


def _warm_up_cpu(net: Backbone, config: PipelineConfig, metadata, device: torch.device):
    """First calls of oneDNN kernels are slow; choose torch's precision (bf16 where measured faster),
    then the engine of each frozen part (autodl_core/engines.py), and measure the throughput the
    planner starts from with what was chosen."""
    rows, cols = metadata.get_matrix_size(0)
    guess = 64 if rows <= 0 or cols <= 0 else min(config.max_resolution, max(32, min(rows, cols)))
    net.cpu_bf16, _ = _choose_cpu_bf16(net, device)
    net.trunk_engine, net.top_engine = _frozen_engines(net, config, device, guess)
    for res in sorted({guess, 64}):
        x = torch.randn(64, 3, res, res, device=device).contiguous(memory_format=torch.channels_last)
        rate = images_per_s(net.frozen_features, x, repeats=1)
        net.warmup_rates.append((res, rate))
    net.rate = RateMeter(rate * res * res)
    if net.strategy == "finetune_top" and config.uses_steps(device.type):
        key = (net.name, config.trunk_blocks, torch.get_num_threads())
        if key not in _TRAIN_RATE_CACHE:
            _TRAIN_RATE_CACHE[key] = _top_train_rate(net, device)
        net.train_rate, net.train_bytes_per_pixel = _TRAIN_RATE_CACHE[key]


# The top's training rate and memory measured in this process, by (backbone, split, threads): properties of
# the machine and the network, measured once (a few seconds per backbone) rather than by every Solver.
_TRAIN_RATE_CACHE: dict[tuple, tuple["SideRate", float]] = {}


def _top_train_rate(net: Backbone, device: torch.device) -> tuple[SideRate, float]:
    """(images/s of the top's training step (batch 32, on activations as the cache holds them) at 96 and
    192 px, the bytes its backward pass keeps per example and input pixel at 192 px). The steps' planner
    sizes its epochs from the rate (below ~96 px fixed costs dominate a step: the rate at 64 and 128 px
    would extrapolate to large sizes 5x too fast), the memory cap its sides from the bytes."""
    model = Classifier(copy.deepcopy(net.top), net.n_features, 10)
    tuner = FineTuner(model, Preprocessor(net.mean, net.std, device=device), False, batch_size=32,
                      freeze_fraction=0.0, freeze_bn=True)
    labels = np.eye(10, dtype=np.float32)[np.arange(64) % 10]
    points, saved = [], SavedTensorBytes()
    for side in (96, 192):
        with torch.inference_mode():
            activations = net.trunk_runner(torch.randn(64, 3, side, side, device=device)).clone()

        def batch(idx, activations=activations):
            return activations[idx].contiguous(memory_format=torch.channels_last)

        with saved.counting() if side == 192 else contextlib.nullcontext():  # the untimed first step
            tuner.train_until(batch, labels, np.arange(64), deadline=in_seconds(5), max_steps=1)
        started, steps = time.monotonic(), tuner.steps
        tuner.train_until(batch, labels, np.arange(64), deadline=in_seconds(5), max_steps=2)
        points.append((side, 32 * (tuner.steps - steps) / max(1e-6, time.monotonic() - started)))
    return SideRate(points), saved.nbytes / (32 * 192 * 192)


class SavedTensorBytes:
    """The bytes the autograd graph saves for the backward pass while `counting()` is on: each storage once,
    at its size (views of one tensor share it)."""

    def __init__(self):
        self._storages: dict[int, int] = {}

    @property
    def nbytes(self) -> int:
        return sum(self._storages.values())

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        self._storages[storage.data_ptr()] = max(self._storages.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    def counting(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)


# Engines chosen in this process, by (backbone, split, threads, forced engine): the pretrained frozen parts
# are the same network whichever run builds them, so a second Solver reuses the export and the measurement.
_ENGINE_CACHE: dict[tuple, tuple[EngineChoice, EngineChoice]] = {}


def _frozen_engines(net: Backbone, config: PipelineConfig, device: torch.device,
                    guess: int) -> tuple[EngineChoice, EngineChoice]:
    split = config.trunk_blocks if net.strategy != "finetune" else "whole"
    key = (net.name, split, torch.get_num_threads(), os.environ.get("AUTODL_ENGINE", "auto"),
           os.environ.get("AUTODL_WEIGHTS_DIR", ""), net.cpu_bf16)
    if key in _ENGINE_CACHE:
        for choice in _ENGINE_CACHE[key]:  # an earlier run of this process may have changed its threads
            if getattr(choice.runner, "threads", None) not in (None, torch.get_num_threads()):
                choice.runner.set_threads(torch.get_num_threads())
        return _ENGINE_CACHE[key]
    example = torch.randn(8, 3, 64, 64, device=device)
    timing = torch.randn(32, 3, max(64, guess), max(64, guess), device=device)
    trunk = choose_runner(net.trunk, example, device, net.cpu_bf16, label=f"{net.name} trunk",
                          timing_input=timing)
    if isinstance(net.top, nn.Identity):
        top = EngineChoice(TorchRunner(net.top, device))
    else:
        with torch.inference_mode():
            top_example, top_timing = net.trunk(example).clone(), net.trunk(timing).clone()
        top = choose_runner(net.top, top_example, device, net.cpu_bf16, label=f"{net.name} top",
                            timing_input=top_timing)
    _ENGINE_CACHE[key] = (trunk, top)
    return trunk, top


def expected_storage_hw(metadata, max_resolution: int) -> tuple[int, int]:
    """The storage shape the data will most likely get (metadata only: no example seen yet)."""
    rows, cols = (int(v) for v in metadata.get_matrix_size(0))
    if rows <= 0 or cols <= 0:
        return (max_resolution, max_resolution)
    scale = min(1.0, max_resolution / max(rows, cols))
    return max(8, int(round(rows * scale))), max(8, int(round(cols * scale)))


def _warm_up_gpu(net: Backbone, config: PipelineConfig, metadata, device: torch.device, plan: DevicePlan):
    """Run, before the clock starts, every kernel the run will use at the shapes it will use them:
    cuDNN (benchmark mode) tunes its algorithms per shape on first use, which took seconds per
    call when it happened inside the timed run. Then measure, synchronised, the steady-state
    feature rate and the seconds of a full fine-tuning step (a throwaway copy of the network)."""
    # Benchmark mode only where every shape is warmed up here and batches are padded to one shape
    # (full fine-tuning); the top mode's varied shapes would each be tuned inside the timed run.
    torch.backends.cudnn.benchmark = net.strategy == "finetune"
    storage = expected_storage_hw(metadata, config.max_resolution)
    size = working_size(storage, plan.probe_resolution(min(storage)))
    batch = plan.feature_batch
    x = torch.randn(batch, 3, *size, device=device).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), inference_autocast(device):
        for _ in range(3):
            net.network(x)
        torch.cuda.synchronize(device)
        started = time.monotonic()
        for _ in range(3):
            net.network(x)
        torch.cuda.synchronize(device)
    rate = 3 * batch / max(1e-6, time.monotonic() - started)
    net.trunk_engine = EngineChoice(TorchRunner(net.trunk, device))
    net.top_engine = EngineChoice(TorchRunner(net.top, device))
    net.warmup_rates.append((min(size), rate))
    net.rate = RateMeter(rate * size[0] * size[1])
    if net.strategy != "finetune":
        return
    n_classes = max(2, int(metadata.get_output_size()))
    n_train = max(1, int(metadata.size()))
    train_batch = plan.train_batch(int(0.9 * n_train), config.batch_size, config.gpu_batch_size)
    model = Classifier(copy.deepcopy(net.network), net.n_features, n_classes)
    preprocess = Preprocessor(net.mean, net.std, device=device)
    tuner = FineTuner(model, preprocess, False, batch_size=train_batch, freeze_bn=True, random_crops=True,
                      freeze_fraction=config.freeze_fraction)
    channels = int(metadata.get_num_channels(0)) if hasattr(metadata, "get_num_channels") else 3
    images = torch.randint(0, 256, (train_batch, *storage, max(1, channels)), dtype=torch.uint8, device=device)
    labels = np.eye(n_classes, dtype=np.float32)[np.arange(train_batch) % n_classes]
    tuner.train_until(tuner.image_batches(images, size), labels, np.arange(train_batch),
                      deadline=in_seconds(120), max_steps=12)
    tuner.predict(images, size, batch_size=plan.predict_batch)
    net.warm_step_seconds = tuner.seconds_per_step
    log.info("warm-up: full fine-tuning step at %s, batch %d: %.4fs", size, train_batch,
             net.warm_step_seconds or float("nan"))
    del tuner, model, images
    torch.cuda.empty_cache()


def _forward_rate(net: Backbone, x: torch.Tensor, device: torch.device, bf16: bool) -> float:
    """Images/s of one frozen forward pass over `x` (after a short untimed one: first calls are slow)."""
    with torch.inference_mode(), inference_autocast(device, bf16):
        net.network(x[:8])
        started = time.monotonic()
        net.network(x)
        return len(x) / max(1e-6, time.monotonic() - started)


def _choose_cpu_bf16(net: Backbone, device: torch.device) -> tuple[bool, float | None]:
    """(bf16 for frozen forward passes, the 64 px rate in the chosen precision if measured here).

    On a CPU bf16 is used when measured clearly faster (CPUs without bf16 units emulate it, slower);
    AUTODL_CPU_BF16=0/1 forces the choice."""
    if device.type != "cpu":
        return False, None
    forced = os.environ.get("AUTODL_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1", None
    x = torch.randn(64, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    fp32 = _forward_rate(net, x, device, False)
    try:
        bf16 = _forward_rate(net, x, device, True)
    except Exception:  # no bf16 kernels on this build/CPU
        return False, fp32
    log.info("frozen forward at 64 px: fp32 %.0f img/s, bf16 %.0f img/s", fp32, bf16)
    return (True, bf16) if bf16 > 1.2 * fp32 else (False, fp32)
