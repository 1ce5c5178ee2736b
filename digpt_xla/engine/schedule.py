"""Per-iteration learning-rate schedule: linear warmup, then half-cosine to ``min_lr`` (the release's)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import OptimConfig, ScheduleConfig


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


def base_lr(optim: OptimConfig, effective_batch: int) -> float:
    """The peak lr of a run: ``optim.lr`` when set, else ``scaled_lr(optim.blr, effective_batch)``."""
    return optim.lr if optim.lr is not None else scaled_lr(optim.blr, effective_batch)


@dataclass(frozen=True)
class StepPlan:
    steps_per_epoch: int
    total_steps: int
    warmup_steps: float
    end_step: int  # where this run stops: total_steps, or schedule.max_steps if smaller


def plan_steps(sched: ScheduleConfig, samples: int, global_batch: int, accum: int) -> StepPlan:
    """Optimizer steps of a run over ``samples`` per epoch (drop_last) at ``global_batch`` per micro-step."""
    steps_per_epoch = sched.steps_per_epoch or max(1, samples // global_batch // accum)
    total = max(1, round(sched.epochs * steps_per_epoch))
    end = min(total, sched.max_steps) if sched.max_steps is not None else total
    return StepPlan(steps_per_epoch, total, sched.warmup_epochs * steps_per_epoch, end)
