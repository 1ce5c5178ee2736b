"""Mixup / CutMix with label smoothing (the release's finetuning: mixup 0.8, cutmix 1.0, switch prob 0.5,
smoothing 0.1), in fixed shapes: the random draws happen on the host and reach the device as a pixel mask and
one mixing weight, so XLA sees the same graph every step (timm's Mixup slices a data-dependent box instead).
"""

from __future__ import annotations

import math
import random

import torch
from torch import Tensor


class FixedShapeMixup:
    def __init__(
        self,
        num_classes: int,
        mixup: float = 0.8,
        cutmix: float = 1.0,
        smoothing: float = 0.1,
        switch_prob: float = 0.5,
        seed: int = 0,
    ) -> None:
        if mixup < 0 or cutmix < 0:
            raise ValueError(f"mixup and cutmix alphas must be >= 0, got {mixup}, {cutmix}")
        self.num_classes, self.mixup, self.cutmix, self.smoothing = num_classes, mixup, cutmix, smoothing
        self.switch_prob = switch_prob
        self.rng = random.Random(seed)

    def draw(self, img_size: int) -> tuple[Tensor, float]:
        """(pixel mask (H, W), 1 = keep this image; the share of the batch's own image in the targets)."""
        use_cutmix = self.cutmix > 0 and (self.mixup == 0 or self.rng.random() < self.switch_prob)
        if use_cutmix:
            lam = self.rng.betavariate(self.cutmix, self.cutmix)
            cut = math.sqrt(1 - lam)  # box side as a fraction of the image: its area is 1 - lam
            h = w = int(img_size * cut)
            cy, cx = self.rng.randrange(img_size), self.rng.randrange(img_size)
            y0, y1 = max(cy - h // 2, 0), min(cy + h // 2, img_size)
            x0, x1 = max(cx - w // 2, 0), min(cx + w // 2, img_size)
            mask = torch.ones(img_size, img_size)
            mask[y0:y1, x0:x1] = 0
            return mask, float(mask.mean())  # lam corrected for the box clipped at the border
        if self.mixup > 0:
            lam = self.rng.betavariate(self.mixup, self.mixup)
            return torch.full((img_size, img_size), lam), lam
        return torch.ones(img_size, img_size), 1.0

    def targets(self, labels: Tensor) -> Tensor:
        off = self.smoothing / self.num_classes
        one_hot = torch.full((labels.shape[0], self.num_classes), off, device=labels.device)
        return one_hot.scatter_(1, labels[:, None], 1.0 - self.smoothing + off)

    def __call__(self, images: Tensor, labels: Tensor, mask: Tensor, lam: Tensor) -> tuple[Tensor, Tensor]:
        """Mix each sample with the batch's flipped order: pixels by ``mask``, targets by ``lam`` (both on the
        images' device, from ``draw``)."""
        mixed = images * mask + images.flip(0) * (1 - mask)
        y = self.targets(labels)
        return mixed, y * lam + y.flip(0) * (1 - lam)
