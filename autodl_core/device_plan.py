"""How big the units of work are on this device: batch sizes, resolutions, where the images live.

Why one place: a 2-core CPU and a large GPU want opposite things. On the CPU small batches and
small resolutions keep steps short enough to predict often; on a GPU, batches of 64 images leave
the device ~99% idle (launch-bound), so features are computed in batches of hundreds, fine-tuning
uses hundreds of images per step with a learning rate scaled to match, the images stay on the
device as uint8, and the frozen probe can afford an upsampled resolution whose ImageNet features
are much better on small images (32 px CIFAR at 128 px instead of 64).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


CPU_BATCH_PIXELS = 128 * 96 * 96  # a CPU frozen pass's batch: 128 images at 96 px, 23 at 224 px


@dataclass(frozen=True)
class DevicePlan:
    device_type: str
    feature_batch: int  # frozen forward passes (probe features, trunk activations)
    predict_batch: int  # forward passes of the fine-tuned model (validation, test)
    images_on_device: bool  # keep the uint8 training/test arrays on the device

    def feature_batch_for(self, size) -> int:
        """Images per frozen pass at `size`: on a CPU, as many as CPU_BATCH_PIXELS allows (at most
        `feature_batch`). Why: activation memory grows with batch x pixels; 120 images at 288 x 376 px
        took 2.2 GB in OpenVINO and 10 GB in ONNX Runtime (and ran slower than 10 at a time). On a GPU one
        fixed batch (every batch padded to it: cuDNN tunes per shape)."""
        if self.device_type == "cuda":
            return self.feature_batch
        return int(np.clip(CPU_BATCH_PIXELS // max(1, size[0] * size[1]), 8, self.feature_batch))

    def probe_resolution(self, short_side: int) -> int:
        """Shorter side for the frozen probe (and, on a GPU, full fine-tuning): small images are
        upsampled since ImageNet features need ~64 px (CPU) and gain up to ~128-160 px (GPU)."""
        if self.device_type == "cuda":
            return int(np.clip(4 * short_side, 96, 160))
        return int(np.clip(2 * short_side, 48, 64))

    def train_batch(self, n_fit: int, base_batch: int, gpu_batch: int) -> int:
        """Images per fine-tuning step: `base_batch` on a CPU; on a GPU up to `gpu_batch`, but at least
        ~8 steps per epoch on small sets (fewer, larger steps would see each image too rarely)."""
        if self.device_type != "cuda":
            return base_batch
        return int(max(min(base_batch, n_fit), min(gpu_batch, n_fit // 8)))

    @staticmethod
    def scaled_lr(lr: float, batch: int, base_batch: int) -> float:
        """Square-root scaling of the learning rate with the batch size (gentler than linear: the
        network is pretrained and fine-tuning must not wash its features out)."""
        return lr * math.sqrt(max(1, batch) / max(1, base_batch))


def plan_for(device: torch.device) -> DevicePlan:
    if device.type == "cuda":
        return DevicePlan("cuda", feature_batch=512, predict_batch=512, images_on_device=True)
    return DevicePlan(device.type, feature_batch=128, predict_batch=128, images_on_device=False)
