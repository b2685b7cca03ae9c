"""Split a backbone into a frozen trunk and a trainable top, and cache the trunk's activations.

On a CPU, fine-tuning the whole network is too slow to pay off within minutes. The early,
high-resolution layers are generic and cost most of the compute, so they run once per image
(their activations cached in fp16 at the working resolution), while the later blocks and the
head are fine-tuned on the cache: several times more steps, and predictions that only run the
top. The probe's pooled features are the top's output, so the probe stage fills the cache.
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn as nn

from autodl_core.engines import Runner
from autodl_core.images import Preprocessor
from autodl_core.memory import TRIM_INTERVAL_S, trim_heap
from autodl_core.planner import RateMeter


class Top(nn.Module):
    """The backbone's blocks after the split, its last conv and pooling: activations -> pooled features."""

    def __init__(self, blocks: list[nn.Module], conv_head: nn.Module, bn2: nn.Module, global_pool: nn.Module):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.conv_head, self.bn2, self.global_pool = conv_head, bn2, global_pool

    def forward(self, x):
        return self.global_pool(self.bn2(self.conv_head(self.blocks(x))))


class Trunk(nn.Module):
    def __init__(self, conv_stem: nn.Module, bn1: nn.Module, blocks: list[nn.Module]):
        super().__init__()
        self.conv_stem, self.bn1, self.blocks = conv_stem, bn1, nn.Sequential(*blocks)

    def forward(self, x):
        return self.blocks(self.bn1(self.conv_stem(x)))


def split_backbone(backbone: nn.Module, trunk_blocks: int) -> tuple[Trunk, Top]:
    """Trunk = stem + blocks[:trunk_blocks]; Top = the rest (shares the backbone's modules, no copy).

    Works for timm's EfficientNet family (MobileNetV2, EfficientNet-Lite): conv_stem, bn1,
    blocks, conv_head, bn2, global_pool.
    """
    for name in ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "global_pool"):
        if not hasattr(backbone, name):
            raise ValueError(f"backbone {type(backbone).__name__} has no '{name}': cannot split it")
    blocks = list(backbone.blocks)
    k = int(np.clip(trunk_blocks, 0, len(blocks)))
    trunk = Trunk(backbone.conv_stem, backbone.bn1, blocks[:k])
    top = Top(blocks[k:], backbone.conv_head, backbone.bn2, backbone.global_pool)
    return trunk, top


class ActivationCache:
    """fp16 trunk activations of the examples of one split, filled on demand, by position.

    `runner` computes them (autodl_core/engines.py: torch, or the faster engine the warm-up chose).
    With flip=True it holds the activations of the horizontally flipped images (flip TTA).
    """

    def __init__(self, runner: Runner, preprocess: Preprocessor, size, rate: RateMeter | None = None,
                 batch_size: int = 128, flip: bool = False, store_device: str | torch.device = "cpu"):
        self.runner, self.preprocess, self.size, self.rate = runner, preprocess, tuple(size), rate
        self.flip = flip
        self.batch_size = batch_size
        # On a GPU the cache stays there (pooled features when the "trunk" is the whole backbone).
        self.store_device = torch.device(store_device)
        self.store: torch.Tensor | None = None
        self.has = np.zeros(0, bool)
        self._seconds_per_image = 0.0  # measured at the last batch (0: not yet)

    def _grow(self, n: int, shape):
        if self.store is None:
            self.store = torch.empty((n,) + tuple(shape), dtype=torch.float16, device=self.store_device)
            self.has = np.zeros(n, bool)
        elif n > len(self.store):
            extra = torch.empty((n - len(self.store),) + tuple(self.store.shape[1:]), dtype=torch.float16,
                                device=self.store_device)
            self.store = torch.cat([self.store, extra])
            self.has = np.concatenate([self.has, np.zeros(n - len(self.has), bool)])

    def _batch_limit(self, deadline: float | None) -> int:
        """Examples in the next batch: the full batch, or, near the deadline, what fits in the time left at
        the last measured speed (at least 8): the first batch of a call is computed even when little
        time is left, and a full batch of 128 took ~2 s on a 2-core CPU shared with another process."""
        if deadline is None or not self._seconds_per_image:
            return self.batch_size
        left = deadline - time.monotonic()
        return int(np.clip(left / self._seconds_per_image, 8, self.batch_size))

    def ensure(self, images, positions: np.ndarray, deadline: float | None = None) -> int:
        """Compute missing activations for `positions` (in order) until done or the deadline; returns how many.

        `images`: uint8 (N, H, W, C), numpy or a tensor on the device. On a GPU every batch is padded
        to the full batch size (one shape: cuDNN's tuned algorithms are reused, not tuned again).
        """
        positions = np.asarray(positions)
        if len(self.has) < len(images):
            if self.store is not None:
                self._grow(len(images), self.store.shape[1:])
        missing = positions if self.store is None else positions[~self.has[positions]]
        done = 0
        on_device = isinstance(images, torch.Tensor)
        pad = self.preprocess.device.type == "cuda"
        last = 0.0  # seconds of the previous batch: a batch that would end past the deadline is not begun
        start = 0
        with torch.inference_mode():
            while start < len(missing):
                if deadline is not None and done > 0 and time.monotonic() + last > deadline:
                    break
                idx = missing[start:start + self._batch_limit(deadline)]
                start += len(idx)
                started = time.monotonic()
                chosen = images[torch.from_numpy(idx).to(images.device)] if on_device else images[idx]
                x = self.preprocess(chosen, self.size)
                if self.flip:
                    x = torch.flip(x, dims=[3])
                n = x.shape[0]
                if pad and n < self.batch_size:
                    x = torch.cat([x, x[:1].expand(self.batch_size - n, *x.shape[1:])])
                out = self.runner(x)[:n].to(self.store_device).to(torch.float16)
                self._grow(len(images), out.shape[1:])
                self.store[torch.from_numpy(idx).to(self.store_device)] = out
                self.has[idx] = True
                del x, out
                trim_heap(TRIM_INTERVAL_S)  # the batches' freed temporaries, handed back (autodl_core/memory.py)
                done += len(idx)
                last = time.monotonic() - started
                self._seconds_per_image = last / len(idx)
                if self.rate is not None:
                    self.rate.update(len(idx) * self.size[0] * self.size[1], last)
        return done

    def get(self, positions: np.ndarray, device) -> torch.Tensor:
        positions = np.asarray(positions)
        if not self.has[positions].all():
            raise RuntimeError("activations requested before they were computed")
        x = self.store[torch.from_numpy(positions).to(self.store_device)].to(device, non_blocking=True).float()
        return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x

    def bytes_per_example(self) -> int:
        if self.store is None:
            return 0
        return int(np.prod(self.store.shape[1:])) * 2


def top_features(runner: Runner, cache: ActivationCache, positions: np.ndarray, device,
                 batch_size: int = 256, out_device: str | torch.device = "cpu",
                 deadline: float | None = None) -> torch.Tensor | None:
    """Pooled features of the frozen top (its `runner`) over cached activations, gathered on
    `out_device` (the GPU keeps them there for the probe's head). None when the deadline would pass first (no batch is begun that would end past it, at the last batch's speed): the top
    over 10,000 cached cifar10 activations took seconds, and a test call whose trunk activations were
    done just in time ended > 6 s past its deadline."""
    outs = []
    last = 0.0
    with torch.inference_mode():
        for start in range(0, len(positions), batch_size):
            if deadline is not None and time.monotonic() + last > deadline:
                return None
            began = time.monotonic()
            x = cache.get(positions[start:start + batch_size], device)
            outs.append(runner(x).float().to(out_device))
            del x
            trim_heap(TRIM_INTERVAL_S)
            last = time.monotonic() - began
    return torch.cat(outs) if outs else torch.zeros(0, device=out_device)
