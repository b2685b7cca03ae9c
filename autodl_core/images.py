"""uint8 image arrays -> normalised torch batches at a working resolution (channels, range, size).

All conversions happen per batch, so the cache stays uint8 at the storage size and any
working resolution (progressive resizing) is one interpolate away.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


class Preprocessor:
    """Maps (N, H, W, C) uint8 to (N, 3, r, r') float tensors normalised for a backbone."""

    def __init__(self, mean, std, pixel_max: float = 255.0, device: str | torch.device = "cpu",
                 channels_last: bool = True, dtype=torch.float32):
        self.device = torch.device(device)
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        # Data whose brightest value is far below 255 (e.g. 0..16 counts) is stretched to [0, 1].
        self.pixel_max = float(pixel_max) if pixel_max > 0 else 255.0
        self.channels_last = channels_last
        self.dtype = dtype

    def __call__(self, images, size: tuple[int, int]) -> torch.Tensor:
        """`images`: a numpy array or a torch tensor (on any device) of uint8 (N, H, W, C)."""
        if self.device.type == "cpu" and self.pixel_max == 255.0:
            x = self._resized_uint8(images, size)
            x = to_three_channels(x.float().div_(255.0))
            return self.normalize(x)
        x = self.unit_range(images)
        if tuple(x.shape[-2:]) != tuple(size):
            downscale = x.shape[-2] > size[0] or x.shape[-1] > size[1]
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=downscale)
        return self.normalize(x)

    @staticmethod
    def _resized_uint8(images, size: tuple[int, int]) -> torch.Tensor:
        """uint8 (N, H, W, C) -> uint8 (N, C, h, w) resized, on the CPU.

        Why in uint8: torch's bilinear (antialiased) resize of channels-last uint8 images has vectorised
        kernels, 4-20x faster than the same resize in float32 (64 images 384 px -> 128 px: 7,300 vs 430
        img/s on a 2-core EPYC), and with large storage sizes and a fast inference engine the float
        resize was slower than the network itself. Values differ by at most one grey level."""
        x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))
        x = x.to("cpu").permute(0, 3, 1, 2)  # a channels-last view, no copy
        if tuple(x.shape[-2:]) != tuple(size):
            downscale = x.shape[-2] > size[0] or x.shape[-1] > size[1]
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=downscale)
        return x

    def unit_range(self, images) -> torch.Tensor:
        """uint8 (N, H, W, C) -> float (N, 3, H, W) in [0, 1] on the device."""
        if isinstance(images, torch.Tensor):
            x = images.to(self.device, non_blocking=True)
        else:
            x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float().div_(self.pixel_max).clamp_(0.0, 1.0)
        return to_three_channels(x)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x.to(self.dtype)

    def augmented(self, images, size: tuple[int, int], flip: bool, min_scale: float = 0.5,
                  generator: torch.Generator | None = None) -> torch.Tensor:
        """Random resized crops (area share in [min_scale, 1], aspect 3/4..4/3) with random horizontal
        flips, resized to `size`: one affine grid-sample on the device for the whole batch.

        Why: per-example crops are the augmentation full fine-tuning needs, and doing them as one
        kernel on the GPU keeps it busy (a CPU loop per image left a large GPU idle). Images larger
        than `size` are first shrunk with antialiasing (grid sampling alone would alias).
        """
        x = self.unit_range(images)
        if x.shape[-2] > size[0] or x.shape[-1] > size[1]:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        n = x.shape[0]
        rand = torch.rand(n, 4, device=x.device, generator=generator)
        area = min_scale + (1.0 - min_scale) * rand[:, 0]
        log_ratio = (rand[:, 1] * 2 - 1) * math.log(4 / 3)
        ratio = torch.exp(log_ratio)
        crop_w = torch.sqrt(area * ratio).clamp(max=1.0)
        crop_h = torch.sqrt(area / ratio).clamp(max=1.0)
        shift_x = (rand[:, 2] * 2 - 1) * (1 - crop_w)
        shift_y = (rand[:, 3] * 2 - 1) * (1 - crop_h)
        sign = torch.ones(n, device=x.device)
        if flip:
            sign = torch.where(torch.rand(n, device=x.device, generator=generator) < 0.5, -sign, sign)
        theta = torch.zeros(n, 2, 3, device=x.device)
        theta[:, 0, 0] = crop_w * sign
        theta[:, 0, 2] = shift_x
        theta[:, 1, 1] = crop_h
        theta[:, 1, 2] = shift_y
        grid = F.affine_grid(theta, (n, x.shape[1], size[0], size[1]), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        return self.normalize(x)


def to_three_channels(x: torch.Tensor) -> torch.Tensor:
    """Backbones want RGB: repeat grey, pad 2-channel data with its mean, keep the first 3 of more."""
    c = x.shape[1]
    if c == 3:
        return x
    if c == 1:
        return x.expand(-1, 3, -1, -1)
    if c == 2:
        return torch.cat([x, x.mean(dim=1, keepdim=True)], dim=1)
    return x[:, :3]


def working_size(storage_hw: tuple[int, int], short_side: int) -> tuple[int, int]:
    """Working (H, W) whose shorter side is `short_side`, keeping the storage aspect ratio (rounded to 8)."""
    h, w = storage_hw
    scale = short_side / max(1, min(h, w))
    return (max(8, int(round(h * scale / 8)) * 8), max(8, int(round(w * scale / 8)) * 8))


def random_augment(x: torch.Tensor, flip: bool = True, max_shift: float = 0.1) -> torch.Tensor:
    """Cheap batch augmentation for CPU fine-tuning: random flips and random translations (reflect-padded crops)."""
    n, _, h, w = x.shape
    if flip:
        mask = torch.rand(n, device=x.device) < 0.5
        if mask.any():
            x = torch.where(mask.view(n, 1, 1, 1), torch.flip(x, dims=[3]), x)
    if max_shift > 0:
        ph, pw = max(1, int(h * max_shift)), max(1, int(w * max_shift))
        padded = F.pad(x, (pw, pw, ph, ph), mode="reflect")
        dy = int(torch.randint(0, 2 * ph + 1, (1,)))
        dx = int(torch.randint(0, 2 * pw + 1, (1,)))
        x = padded[:, :, dy:dy + h, dx:dx + w]
    return x
