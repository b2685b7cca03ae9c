"""Linear heads on fixed features (frozen backbone features or raw thumbnails): fast, strong early predictions.

One implementation for every stage: L2-regularised logistic regression (softmax for
single-label, per-label sigmoid for multi-label) fitted full-batch with L-BFGS on
standardised features. Its weights also initialise the fine-tuned classifier (LP-FT).
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F


MIN_EVALUATIONS = 2  # loss evaluations a fit makes even past its deadline (a first step off the prior)


class _DeadlinePassed(Exception):
    """Raised inside the L-BFGS closure to leave a step when the fit's deadline has passed."""


class _BestPoint:
    """The lowest-loss parameters evaluated so far (L-BFGS's trial points during a line search can be worse)."""

    def __init__(self):
        self.evaluations, self.loss, self.w, self.b = 0, float("inf"), None, None

    def offer(self, loss: float, w: torch.Tensor, b: torch.Tensor):
        self.evaluations += 1
        if loss < self.loss:
            self.loss, self.w, self.b = loss, w.detach().clone(), b.detach().clone()


class LinearHead:
    def __init__(self, multilabel: bool, l2: float = 1e-3):
        self.multilabel = multilabel
        self.l2 = l2
        self.mean = None
        self.std = None
        self.weight = None
        self.bias = None
        self.evaluations = 0  # loss evaluations of the last fit

    def fit(self, features, labels, max_iter: int = 100, deadline: float | None = None,
            init: "LinearHead | None" = None) -> "LinearHead":
        x = _as_float_tensor(features)
        y = torch.as_tensor(np.asarray(labels), dtype=torch.float32).to(x.device)
        self.mean = x.mean(0, keepdim=True)
        std = x.std(0, keepdim=True)
        # Near-constant features (dead units) must not be blown up into noise or huge weights.
        self.std = std.clamp_min(max(1e-3, 0.05 * float(std.median())))
        x = (x - self.mean) / self.std
        n, d = x.shape
        k = y.shape[1]
        w = torch.zeros(d, k, device=x.device, requires_grad=True)
        b = torch.zeros(k, device=x.device, requires_grad=True)
        with torch.no_grad():
            if init is not None and init.weight is not None and init.weight.shape == (d, k):
                w.copy_(init.weight)
                b.copy_(init.bias)
            else:
                prior = y.mean(0).clamp(1e-4, 1 - 1e-4)
                b.copy_(torch.log(prior / (1 - prior)) if self.multilabel else torch.log(prior))
        targets = y if self.multilabel else y.argmax(1)
        optimizer = torch.optim.LBFGS([w, b], lr=1.0, max_iter=20, history_size=10,
                                      line_search_fn="strong_wolfe")
        best = _BestPoint()

        def closure():
            # The deadline is checked at every loss evaluation, not every L-BFGS step: one step runs up
            # to 20 iterations (25 evaluations), ~10 s with 1,200 classes on a slow 2-core CPU.
            if deadline is not None and best.evaluations >= MIN_EVALUATIONS and time.monotonic() > deadline:
                raise _DeadlinePassed
            optimizer.zero_grad()
            logits = x @ w + b
            if self.multilabel:
                loss = F.binary_cross_entropy_with_logits(logits, targets)
            else:
                loss = F.cross_entropy(logits, targets)
            loss = loss + self.l2 * (w * w).sum()
            loss.backward()
            best.offer(float(loss.detach()), w, b)
            return loss

        try:
            for _ in range(max(1, max_iter // 20)):
                optimizer.step(closure)
                if deadline is not None and time.monotonic() > deadline:
                    break
            self.weight, self.bias = w.detach(), b.detach()
        except _DeadlinePassed:  # stopped inside a line search: the best point evaluated so far
            self.weight, self.bias = (best.w, best.b) if best.w is not None else (w.detach(), b.detach())
        self.evaluations = best.evaluations
        return self

    def logits(self, features) -> torch.Tensor:
        x = _as_float_tensor(features).to(self.weight.device)
        return ((x - self.mean) / self.std) @ self.weight + self.bias

    def predict_proba(self, features) -> np.ndarray:
        with torch.no_grad():
            z = self.logits(features)
            p = torch.sigmoid(z) if self.multilabel else torch.softmax(z, dim=1)
        return p.cpu().numpy()

    def as_linear(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight (k, d), bias (k,)) of the same map on raw (unstandardised) features, for an nn.Linear."""
        weight = (self.weight / self.std.T).T
        bias = self.bias - (self.mean / self.std) @ self.weight
        return weight.contiguous(), bias.view(-1).contiguous()


def _as_float_tensor(features) -> torch.Tensor:
    """Features as a float32 tensor where they are (a GPU keeps the probe's features there); a copy,
    so that features computed under inference mode can take part in the fit's autograd."""
    if isinstance(features, torch.Tensor):
        return features.detach().float().clone()
    return torch.as_tensor(np.asarray(features), dtype=torch.float32)


THUMBNAIL_CHUNK = 256  # images converted to float at a time


def thumbnails(images: np.ndarray, side: int = 12, positions: np.ndarray | None = None) -> np.ndarray:
    """Raw-pixel features: images (those at `positions`, default all) shrunk to side x side (area),
    flattened, for the very first head. A chunk of images at a time: converting all of a large set to
    float at once took 1.5 GB for blood cells' 9,957 images at 96 x 128 (the run's memory peak)."""
    positions = np.arange(len(images)) if positions is None else np.asarray(positions)
    h, w, c = images.shape[1:4]
    out = np.empty((len(positions), min(side, h) * min(side, w) * c), np.float32)
    for start in range(0, len(positions), THUMBNAIL_CHUNK):
        chunk = images[positions[start:start + THUMBNAIL_CHUNK]]
        x = torch.from_numpy(np.ascontiguousarray(chunk)).permute(0, 3, 1, 2).float()
        if h > side or w > side:
            x = F.adaptive_avg_pool2d(x, (min(side, h), min(side, w)))
        out[start:start + len(chunk)] = x.reshape(len(chunk), -1).numpy()
    return out
