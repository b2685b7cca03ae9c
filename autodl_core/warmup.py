"""The backbone, made ready before the clock starts: weights loaded, split for the chosen
strategy, every kernel warmed up, and the rates the planner starts from measured.

The kit does not time `Model.__init__`; whatever is slow on first use (oneDNN kernels, cuDNN's
per-shape tuning) is paid here instead of inside the scored run.
"""
from __future__ import annotations

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
from autodl_core.images import Preprocessor, working_size
from autodl_core.learner import Classifier, FineTuner, RateMeter, inference_autocast
from autodl_core.trunk import split_backbone

log = logging.getLogger("autodl_core.warmup")


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


def prepare_backbone(config: PipelineConfig, metadata, device: torch.device, plan: DevicePlan) -> Backbone:
    from pretrained import create_backbone, get_spec

    spec = get_spec(config.backbone)
    network = create_backbone(config.backbone, pretrained=True, num_classes=0)
    network.to(device).eval()
    network = network.to(memory_format=torch.channels_last)
    strategy = config.resolved_strategy(device.type)
    if strategy == "finetune":
        # Full fine-tuning needs no trunk-activation cache: the probe caches pooled features.
        trunk, top = network, nn.Identity()
    else:
        trunk, top = split_backbone(network, config.trunk_blocks)
    net = Backbone(network, trunk, top, int(network.num_features), spec.mean, spec.std, strategy, RateMeter(1.0))
    if device.type == "cuda":
        _warm_up_gpu(net, config, metadata, device, plan)
    else:
        _warm_up_cpu(net, config, metadata, device)
    log.info("backbone %s ready on %s; warm-up throughput %s", config.backbone, device, net.warmup_rates)
    return net


def _warm_up_cpu(net: Backbone, config: PipelineConfig, metadata, device: torch.device):
    """First calls of oneDNN kernels are slow; also measure throughput (and choose bf16)."""
    rows, cols = metadata.get_matrix_size(0)
    guess = 64 if rows <= 0 or cols <= 0 else min(config.max_resolution, max(32, min(rows, cols)))
    net.cpu_bf16, rate_64 = _choose_cpu_bf16(net, device)
    for res in sorted({guess, 64}):
        if res == 64 and rate_64 is not None:  # measured in the precision just chosen
            rate = rate_64
        else:
            x = torch.randn(64, 3, res, res, device=device).contiguous(memory_format=torch.channels_last)
            rate = _forward_rate(net, x, device, net.cpu_bf16)
        net.warmup_rates.append((res, rate))
    net.rate = RateMeter(rate * res * res)


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
                      deadline=time.monotonic() + 120, max_steps=12)
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
