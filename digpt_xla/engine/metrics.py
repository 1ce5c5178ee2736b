"""Metrics without host syncs: device-side accumulators read once per log interval, then written to
``metrics.jsonl`` and TensorBoard by the main rank."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..rundir import RunDir, RunDirError

if TYPE_CHECKING:
    from ..backend import Backend


log = logging.getLogger(__name__)


class DeferredMeter:
    """Sums of per-step scalars kept on the device; ``take()`` hands them over and starts a new window.

    One vector holds every sum plus the count of non-finite values among the ``guard`` names (the losses: a
    non-finite gradient norm is a step the fp16 loss scaler skips, not a failure): separate 0-dim zeros would be
    deduplicated by value on XLA and give the first step of each window a graph of its own.
    """

    def __init__(self, names: tuple[str, ...], device: torch.device, guard: tuple[str, ...] = ("loss",)) -> None:
        self.names, self.device = names, device
        # A 0/1 weight per name, so the count needs no indexing inside the step's graph.
        self.guard = torch.tensor([float(n in guard) for n in names]).to(device)
        self.last: dict[str, Tensor] = {}
        self.reset()

    def reset(self) -> None:
        # Made on the host and copied: plain device data, not a constant inside the next step's graph.
        self.sums = torch.zeros(len(self.names) + 1).to(self.device)
        self.count = 0

    def add(self, **values: Tensor) -> None:
        self.last = {n: values[n].detach() for n in self.names}  # this step's own values, still on the device
        step = torch.stack([values[n].detach().float().reshape(()) for n in self.names])
        nonfinite = ((~torch.isfinite(step)).float() * self.guard).sum().reshape(1)
        self.sums = self.sums + torch.cat([step, nonfinite])
        self.count += 1

    def take(self) -> tuple[Tensor, int]:
        """(the device vector: sums in ``names`` order, then the non-finite count; number of steps); resets."""
        sums, count = self.sums, self.count
        self.reset()
        return sums, count

    def flush(self, backend: Backend, fn: Callable[[dict[str, float], float], None]) -> None:
        """Hand the window's means by name and its non-finite count to ``fn`` on the host (after the step on XLA)
        and start a new window; nothing when the window is empty."""
        if self.count == 0:
            return
        sums, count = self.take()

        def record(values: Tensor) -> None:
            *totals, nonfinite = values.tolist()
            fn({n: t / count for n, t in zip(self.names, totals, strict=True)}, nonfinite)

        backend.on_host(record, sums)


class MetricsWriter:
    """Append-only ``metrics.jsonl`` plus TensorBoard events in the run directory, main rank only (others get a
    no-op). Both are written locally (staged, for a remote run directory) and reach the URL through ``sync``."""

    def __init__(
        self,
        run_dir: RunDir,
        enabled: bool,
        resume_step: int | None = None,
        still_held: Callable[[], bool] | None = None,
    ) -> None:
        # still_held: asked before every record; a run whose directory was taken over adds nothing to its new log.
        self.run_dir, self.enabled, self.still_held = run_dir, enabled, still_held
        self._tb = None
        if not enabled:
            return
        run_dir.pull("metrics.jsonl")
        run_dir.pull("tb")
        self.path = run_dir.staged("metrics.jsonl")
        self._truncate_after(resume_step)
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(run_dir.staged("tb"), purge_step=resume_step)

    def _truncate_after(self, step: int | None) -> None:
        """On resume, drop records past the checkpoint: a hard-killed run may have logged steps it lost. A new run
        (``step`` None) starts an empty log."""
        records = []
        if os.path.exists(self.path):
            with open(self.path) as f:
                records = parse_records(f.read(), self.path)
        keep = [r for r in records if step is not None and r.get("step", 0) <= step]
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in keep)

    def write(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled or (self.still_held is not None and not self.still_held()):
            return
        record = {
            "step": step,
            **{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()},
        }
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and self._tb is not None:
                    self._tb.add_scalar(key, value, step)
        except OSError as e:  # a full disk or a file-size limit: the records before this one are whole
            raise RunDirError(f"could not log step {step} in {self.run_dir.url}: {e.strerror or e}") from None
        self.sync()

    def sync(self, force: bool = False) -> None:
        """Copy both logs to a remote run directory (throttled unless ``force``), flushing TensorBoard first; a
        local run directory needs neither (TensorBoard flushes its events itself)."""
        if not self.run_dir.sync_due(force):
            return
        if self._tb is not None:
            self._tb.flush()
        self.run_dir.sync(force=True)

    def close(self) -> None:
        if self._tb is not None:
            tb, self._tb = self._tb, None
            try:
                tb.close()
            except OSError as e:  # the events it could write are kept; the error that stopped the run was reported
                log.warning("TensorBoard events in %s not all written: %s", self.run_dir.url, e.strerror or e)
        if self.enabled:
            self.run_dir.close()


def read_metrics(run_dir: str | RunDir) -> list[dict[str, Any]]:
    """The records of a run's ``metrics.jsonl`` (local path or URL of the run directory)."""
    run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    return parse_records(run_dir.read_text("metrics.jsonl"), run_dir.url_of("metrics.jsonl"), warn=False)


def parse_records(text: str, source: str, warn: bool = True) -> list[dict[str, Any]]:
    """The JSON records of a metrics log. A line that does not parse (the torn last write of a killed process) is
    dropped, with a warning naming it when the log is about to be rewritten."""
    records = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if warn:
                log.warning(
                    "%s:%d: dropping a line that is not a whole record (a write cut short): %.60r", source, n, line
                )
            continue
        if isinstance(record, dict):
            records.append(record)
    return records
