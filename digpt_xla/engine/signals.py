"""Preemption: SIGTERM (what a TPU VM or a scheduler sends before taking the machine) sets a flag; the training
loop checkpoints at the next step boundary and exits cleanly. A second SIGTERM stops the process at once, without
a checkpoint (for a step that never ends: a stalled read, a hung collective)."""

from __future__ import annotations

import logging
import signal
from types import FrameType

log = logging.getLogger(__name__)


class PreemptionFlag:
    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)) -> None:
        self.requested = False
        self._previous = {}
        for sig in signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some launchers): rely on hard-kill resume
                log.warning("cannot install a handler for signal %s outside the main thread", sig)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            log.warning("received signal %d again: stopping now, without a checkpoint", signum)
            raise SystemExit(128 + signum)
        log.warning("received signal %d: will checkpoint and stop at the next step boundary", signum)
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
