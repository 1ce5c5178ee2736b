"""Per-iteration learning-rate schedule: linear warmup, then half-cosine to ``min_lr`` (the release's)."""

from __future__ import annotations

import math


def cosine_lr(step: float, total_steps: float, warmup_steps: float, base_lr: float, min_lr: float = 0.0) -> float:
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    if total_steps <= warmup_steps:
        return base_lr
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def scaled_lr(blr: float, effective_batch: int) -> float:
    """lr = blr x effective batch / 256 (the MAE / D-iGPT rule)."""
    return blr * effective_batch / 256
