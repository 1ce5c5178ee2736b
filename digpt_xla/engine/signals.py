"""Preemption: SIGTERM (what a TPU VM or a scheduler sends before taking the machine) or SIGINT (Ctrl-C) sets a
flag; the training loop agrees on it with every other rank at the next step boundary, checkpoints and exits
cleanly. A second signal ends the process at once, without a checkpoint, even while it waits inside a collective
or a stalled read; so does the first, before the run's first step has finished (during set-up, or the first step's
compilation, minutes on XLA): there is nothing new to save, and waiting for that step would only delay the stop.

Python runs signal handlers only between bytecodes of the main thread, so a handler alone cannot stop a process
blocked in C (a gloo all-reduce waiting for a rank that is gone). The signal is therefore also delivered through
``signal.set_wakeup_fd`` to a daemon thread that counts it: that thread runs whatever the main thread is doing.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class PreemptionFlag:
    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS) -> None:
        self.requested = False
        self.progress = False  # set by the trainer once a step of this run has finished: from then on, checkpoint
        self.signals = signals
        self._count = 0
        self._lock = threading.Lock()
        self._previous: dict[int, Any] = {}
        self._wakeup: tuple[int, int] | None = None
        self._previous_fd = -1
        try:
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)
            read_fd, write_fd = os.pipe()
            os.set_blocking(write_fd, False)
            self._previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
            self._wakeup = (read_fd, write_fd)
            threading.Thread(target=self._watch, args=(read_fd,), name="digpt-signals", daemon=True).start()
        except ValueError:  # not the main thread (e.g. some launchers): the handler alone, or hard-kill resume
            log.warning("cannot install signal handlers outside the main thread")

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._wakeup is None:  # no watcher thread: count here (between bytecodes only)
            self._received(signum)

    def _watch(self, read_fd: int) -> None:
        try:
            while True:
                data = os.read(read_fd, 64)
                if not data or 0 in data:  # closed, or the stop byte of restore()
                    return
                for signum in data:
                    if signum in self.signals:
                        self._received(signum)
        finally:
            os.close(read_fd)

    def _received(self, signum: int) -> None:
        with self._lock:
            self._count += 1
            again = self._count > 1
            self.requested = True
        name = signal.Signals(signum).name
        if again or not self.progress:
            why = "again" if again else "before the run's first step finished (nothing new to checkpoint)"
            # Straight to stderr: a logging handler's lock may be held by the blocked main thread.
            os.write(2, f"received {name} {why}: stopping now, without a checkpoint\n".encode())
            os._exit(128 + signum)  # from this thread, whatever the main thread is blocked in
        log.warning("received %s: will checkpoint and stop at the next step boundary (again to stop at once)", name)

    def ignore_further(self) -> None:
        """After a stop that has been carried out: ignore these signals while the run cleans up (``restore`` ends
        that); a command that exits next keeps ignoring them with ``ignore_stop_signals``."""
        self.restore()
        ignore_stop_signals(self.signals)

    def restore(self) -> None:
        """The dispositions from before: a process that goes on (a study, a notebook) stops on them again."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._wakeup is not None:
            _, write_fd = self._wakeup
            self._wakeup = None
            signal.set_wakeup_fd(self._previous_fd)
            os.write(write_fd, b"\0")  # the watcher stops and closes its end
            os.close(write_fd)


def ignore_stop_signals(signals: tuple[int, ...] = STOP_SIGNALS) -> None:
    """Ignore stop signals for the rest of this process: a command whose run has stopped on one and only exits now.
    The notice reaches other ranks' processes late; one arriving during the shutdown must not turn a clean stop
    into a failed one (an ignored signal stays ignored while the interpreter finalizes, unlike a Python handler)."""
    for sig in signals:
        signal.signal(sig, signal.SIG_IGN)
