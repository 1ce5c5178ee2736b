"""A thread pool whose threads never keep a process alive.

``concurrent.futures.ThreadPoolExecutor`` joins its workers when the interpreter exits, so one read stuck on a
stalled object store (or a FIFO posing as a manifest) kept a failed run alive for good after it had printed its
error. These workers are daemon threads: a process that is done exits, whatever they are blocked in.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any


class DaemonPool:
    """``submit(fn, *args) -> Future`` on up to ``workers`` daemon threads, started as work arrives."""

    def __init__(self, workers: int, name: str) -> None:
        self.workers, self.name = workers, name
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        self._queue.put((future, fn, args))
        with self._lock:
            if self._idle:  # a waiting worker takes it
                self._idle -= 1
            elif len(self._threads) < self.workers:
                thread = threading.Thread(target=self._work, name=f"{self.name}-{len(self._threads)}", daemon=True)
                self._threads.append(thread)
                thread.start()
        return future

    def _work(self) -> None:
        while True:
            future, fn, args = self._queue.get()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the future
                    future.set_exception(e)
            with self._lock:
                self._idle += 1


def in_background(fn: Callable[..., Any], *args: Any, name: str = "digpt-background") -> Future:
    """Run ``fn(*args)`` on a daemon thread of its own; its result or exception arrives in the Future."""
    return DaemonPool(1, name).submit(fn, *args)
