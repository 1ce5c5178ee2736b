"""Metrics without host syncs: device-side accumulators read once per log interval, then written to
``metrics.jsonl`` and TensorBoard by the main rank."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch
from torch import Tensor


class DeferredMeter:
    """Sums of per-step scalars kept on the device; ``take()`` hands them over and starts a new window."""

    def __init__(self, names: tuple[str, ...], device: torch.device) -> None:
        self.names, self.device = names, device
        self.reset()

    def reset(self) -> None:
        # Zeros made on the host and copied over are plain device data; zeros made on an XLA device would be
        # constants inside the next step's graph and give the step after each log a graph of its own.
        self.sums = {n: torch.zeros(()).to(self.device) for n in self.names}
        self.nonfinite = torch.zeros((), dtype=torch.int32).to(self.device)
        self.count = 0

    def add(self, **values: Tensor) -> None:
        for name, value in values.items():
            value = value.detach().float()
            self.sums[name] = self.sums[name] + value
            self.nonfinite = self.nonfinite + (~torch.isfinite(value)).int()
        self.count += 1

    def take(self) -> tuple[list[Tensor], int]:
        """(sums in ``names`` order followed by the non-finite count, number of steps); then reset."""
        tensors, count = [*(self.sums[n] for n in self.names), self.nonfinite], self.count
        self.reset()
        return tensors, count


class MetricsWriter:
    """Append-only JSONL plus TensorBoard in the run directory (main rank only: others get a no-op)."""

    def __init__(self, run_dir: str, enabled: bool, resume_step: int | None = None) -> None:
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._tb = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self._truncate_after(resume_step)
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=resume_step)

    def _truncate_after(self, step: int | None) -> None:
        """On resume, drop records past the checkpoint: a hard-killed run may have logged steps it lost."""
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            records = [json.loads(line) for line in f if line.strip()]
        keep = [r for r in records if step is not None and r.get("step", 0) <= step]
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in keep)

    def write(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                   for k, v in values.items()}}  # fmt: skip
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in values.items():
            if isinstance(value, (int, float)) and self._tb is not None:
                self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]
