"""Torch side of the solver: frozen-feature extraction and any-time fine-tuning of a pretrained backbone.

Fine-tuning starts from the linear probe's head (LP-FT), keeps an exponential moving
average of the weights (good any-time checkpoints without waiting for a decayed
learning rate) and trains in time slices so the solver can stop, validate and
predict between them.
"""
from __future__ import annotations

import copy
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from autodl_core.images import Preprocessor, random_augment
from autodl_core.schedule import CosineSchedule, StepClock


def batched_forward(module: nn.Module, preprocess: Preprocessor, images, size, batch_size: int,
                    deadline: float | None = None, flip: bool = False) -> torch.Tensor | None:
    """Outputs of `module` over uint8 images (numpy or a device tensor), in eval mode; None when the
    deadline passes first. `flip`: of the horizontally flipped images (flip TTA).

    On a GPU every batch is padded to the full batch size: one shape, so cuDNN's tuned algorithms
    (benchmark mode, tuned in the warm-up) are reused instead of tuned again for each remainder.
    """
    was_training = module.training
    module.eval()
    outputs = []
    pad = preprocess.device.type == "cuda"
    last = 0.0  # seconds of the previous batch: give up before a batch that would end past the deadline
    try:
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                if deadline is not None and time.monotonic() + last > deadline:
                    return None
                began = time.monotonic()
                x = preprocess(images[start:start + batch_size], size)
                if flip:
                    x = torch.flip(x, dims=[3])
                n = x.shape[0]
                if pad and n < batch_size:
                    x = torch.cat([x, x[:1].expand(batch_size - n, *x.shape[1:])])
                with autocast_for(preprocess.device):
                    outputs.append(module(x)[:n].float().cpu())
                last = time.monotonic() - began
    finally:
        module.train(was_training)
    return torch.cat(outputs) if outputs else None


def autocast_for(device: torch.device):
    """Mixed precision on a GPU (bf16 where supported), nothing on the CPU: there bf16 autocast makes
    training steps slower (backward ~2x slower, measured on an AVX512-BF16 Xeon)."""
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast("cpu", enabled=False)


def inference_autocast(device: torch.device, cpu_bf16: bool = False):
    """For frozen forward passes (trunk activations, probe features). On a CPU with bf16 units,
    bf16 inference is ~2x faster with the same probe quality (MobileNetV2, 64 px: 2,224 vs 982 img/s;
    probe test NAUC eurosat 0.9894 vs 0.9884, cifar10 0.8294 vs 0.8291); the solver measures whether
    this CPU gains before turning it on (`cpu_bf16`)."""
    if device.type == "cuda":
        return autocast_for(device)
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(cpu_bf16))


class Classifier(nn.Module):
    """Backbone (pooled features) + linear head."""

    def __init__(self, backbone: nn.Module, n_features: int, n_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(n_features, n_classes)

    def forward(self, x):
        return self.head(self.backbone(x))


# Fine-tuning from a probe's head whose rows are large (features of small variance, weighted up by a head
# fitted on standardised features) starts at LARGE_HEAD_LR_FACTOR of the learning rate: each class's logit
# moves by its head row times the features' change, so the same step turns into a large jump of the logits.
# Measured on a CPU (MobileNetV2's top on cached 96-px activations, top_lr 0.016, 450 steps): heads with
# root-mean-square row norms 36-63 (knee X-rays, RetinaMNIST, blood cells) saturated to constant predictions
# (validation NAUC 0.00) within 100 steps and never came back, where at 0.005 they climbed steadily (knee
# 0.27 -> 0.54, blood cells 0.73 -> 0.95); in the solver the first fall cut the rate x0.3 after a lost slice.
# Heads with row norms 3-11 (CIFAR-10, PneumoniaMNIST) keep the full rate (CIFAR-10 at 0.005: -0.046).
# Scaling the body's rate alone (x12/row norm) was tried: blood cells' tuning crawled (ALC 0.667 -> 0.562).
LARGE_HEAD_ROW_NORM = 12.0
LARGE_HEAD_LR_FACTOR = 0.3


def head_row_norm(head_weight: torch.Tensor) -> float:
    """Root-mean-square row norm of a linear head's weight (classes, features)."""
    return float(head_weight.float().norm()) / max(1, head_weight.shape[0]) ** 0.5


def lp_ft_learning_rate(lr: float, head_weight: torch.Tensor) -> float:
    """The learning rate a fine-tuning from a probe's head starts at: `lr`, or LARGE_HEAD_LR_FACTOR of it
    where the head's rows are large (one rule for the solver and `tools lp-ft-start`)."""
    return lr * LARGE_HEAD_LR_FACTOR if head_row_norm(head_weight) > LARGE_HEAD_ROW_NORM else lr


def freeze_early_layers(backbone: nn.Module, fraction: float) -> list[nn.Module]:
    """Freeze the first `fraction` of the backbone's top-level blocks (stem included); returns the frozen modules.

    On 2 CPU cores the backward pass through the high-resolution early layers is the
    most expensive part and helps least on small data.
    """
    if fraction <= 0:
        return []
    stem = [m for name, m in backbone.named_children() if name in ("conv_stem", "bn1")]
    blocks = list(getattr(backbone, "blocks", []))
    n_frozen = int(round(len(blocks) * fraction))
    frozen = stem + blocks[:n_frozen]
    for module in frozen:
        for p in module.parameters():
            p.requires_grad_(False)
    return frozen


class FineTuner:
    """Fine-tunes a Classifier in time slices with SGD + EMA; predictions come from the EMA weights."""

    def __init__(self, model: Classifier, preprocess: Preprocessor, multilabel: bool, lr: float = 0.01,
                 batch_size: int = 64, weight_decay: float = 5e-5, freeze_fraction: float = 0.3,
                 ema_decay: float = 0.99, label_smoothing: float = 0.1, flip: bool = True, max_shift: float = 0.1,
                 total_steps_hint: int = 1000, freeze_bn: bool = False, body_lr_factor: float = 1.0,
                 max_grad_norm: float = 2.0, random_crops: bool = False, step_seconds_prior: float | None = None):
        self.device = preprocess.device
        self.model = model.to(self.device)
        if self.device.type != "cpu" or preprocess.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.preprocess = preprocess
        self.multilabel = multilabel
        self.batch_size = batch_size
        self.flip = flip
        self.max_shift = max_shift
        self.label_smoothing = label_smoothing
        self.frozen = freeze_early_layers(self.model.backbone, freeze_fraction)
        if freeze_bn:
            # Keep the pretrained normalisation statistics: with small CPU batches, batch statistics
            # would shift the features the linear-probe head was fitted on.
            self.frozen += [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        head_params = list(self.model.head.parameters())
        body_params = [p for p in self.model.backbone.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(
            [{"params": body_params, "lr": lr}, {"params": head_params, "lr": lr}],
            lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
        self.base_lrs = [lr * body_lr_factor, lr]
        self.max_grad_norm = max_grad_norm
        self.ema = copy.deepcopy(self.model).eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.ema_decay = ema_decay
        # EMA over the trainable parameters (frozen ones never change) with fused foreach kernels:
        # a Python loop over ~160 tensors per step was a large share of a GPU step.
        trainable = [(e, p) for e, p in zip(self.ema.parameters(), self.model.parameters()) if p.requires_grad]
        self._ema_params = [e for e, _ in trainable]
        self._model_params = [p for _, p in trainable]
        self._ema_buffers = list(self.ema.buffers())
        self._model_buffers = list(self.model.buffers())
        self.steps = 0
        self.schedule = CosineSchedule(total_steps_hint, warmup_steps=20)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.device.type == "cuda"
                                           and not torch.cuda.is_bf16_supported())
        self.clock = StepClock(self.device, prior=step_seconds_prior)
        self.random_crops = random_crops
        self._rng = np.random.default_rng(0)

    @property
    def total_steps_hint(self) -> int:
        return self.schedule.total_steps

    @total_steps_hint.setter
    def total_steps_hint(self, total: int) -> None:
        self.schedule.replan(self.steps, total)

    @property
    def seconds_per_step(self) -> float | None:
        """Steady-state seconds per training step (see StepClock); None before any measurement."""
        return self.clock.seconds_per_step

    def _set_lr(self):
        factor = self.schedule.factor(self.steps)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor

    def _loss(self, logits, targets):
        if self.multilabel:
            return F.binary_cross_entropy_with_logits(logits.float(), targets)
        return F.cross_entropy(logits.float(), targets.argmax(1), label_smoothing=self.label_smoothing)

    def train_until(self, make_batch, labels: np.ndarray, pool: np.ndarray, deadline: float,
                    max_steps: int | None = None) -> int:
        """Train on random batches drawn from `pool` (positions) until the deadline (checked before each step).

        `make_batch(positions)` returns the model's input for those positions, augmented if wanted.
        """
        self.model.train()
        for module in self.frozen:
            module.eval()
        done = 0
        pool = np.asarray(pool)
        n = len(pool)
        batch = min(self.batch_size, n)
        self.clock.start()
        while n > 0:
            step_time = self.seconds_per_step or 0.0
            if time.monotonic() + step_time > deadline:
                break
            if max_steps is not None and done >= max_steps:
                break
            idx = np.sort(pool[self._rng.choice(n, size=batch, replace=False)])
            x = make_batch(idx)
            y = torch.as_tensor(labels[idx], dtype=torch.float32).to(self.device, non_blocking=True)
            self._set_lr()
            with autocast_for(self.device):
                logits = self.model(x)
            loss = self._loss(logits, y)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            # LP-FT: the probe head's weights can be large, so early gradients into the body are too.
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self._update_ema()
            self.steps += 1
            done += 1
            self.clock.step_done()
        self.clock.stop()
        return done

    def image_batches(self, images, size):
        """make_batch for raw uint8 images (numpy, or a tensor already on the device): random resized
        crops and flips (`random_crops`), else flips and shifts of the whole batch."""
        on_device = isinstance(images, torch.Tensor)

        def make_batch(idx):
            chosen = images[torch.from_numpy(idx).to(images.device)] if on_device else images[idx]
            if self.random_crops:
                return self.preprocess.augmented(chosen, size, flip=self.flip)
            x = self.preprocess(chosen, size)
            return random_augment(x, flip=self.flip, max_shift=self.max_shift)
        return make_batch

    @torch.no_grad()
    def _update_ema(self):
        decay = min(self.ema_decay, (1 + self.steps) / (10 + self.steps))
        if self._ema_params:
            torch._foreach_lerp_(self._ema_params, self._model_params, 1 - decay)
        for ema_b, b in zip(self._ema_buffers, self._model_buffers):
            ema_b.copy_(b)

    def predict(self, images, size, batch_size: int = 128, deadline: float | None = None,
                flip: bool = False) -> np.ndarray | None:
        logits = batched_forward(self.ema, self.preprocess, images, size, batch_size, deadline=deadline, flip=flip)
        return None if logits is None else probabilities(logits, self.multilabel)

    def predict_batches(self, get_inputs, n: int, batch_size: int = 256,
                        deadline: float | None = None) -> np.ndarray | None:
        """Probabilities of the EMA model over inputs get_inputs(positions) for positions 0..n-1."""
        self.ema.eval()
        outs = []
        last = 0.0  # seconds of the previous batch (see batched_forward)
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                if deadline is not None and time.monotonic() + last > deadline:
                    return None
                began = time.monotonic()
                x = get_inputs(np.arange(start, min(n, start + batch_size)))
                with autocast_for(self.device):
                    outs.append(self.ema(x).float().cpu())
                last = time.monotonic() - began
        if not outs:
            return np.zeros((0, self.model.head.out_features))
        return probabilities(torch.cat(outs), self.multilabel)


def probabilities(logits: torch.Tensor, multilabel: bool) -> np.ndarray:
    p = torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=1)
    return p.numpy().astype(np.float64)
