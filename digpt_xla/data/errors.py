"""Bad input: a clear error when a source cannot be used, a warning and a count when one sample cannot."""

from __future__ import annotations

import logging

from ..errors import UserError

log = logging.getLogger("digpt_xla.data")


class DataError(UserError, RuntimeError):
    """A data source that cannot be used at all (nothing readable, missing shard, empty folder, stalled read)."""


class SkipCounter:
    """Samples skipped since the last ``take()``, in this process (each DataLoader worker has its own); the count
    travels to the trainer inside the next batch as ``batch["skipped"]``."""

    def __init__(self, record: bool = False) -> None:
        self.count = 0
        self.events: list[tuple[str, str, str]] | None = [] if record else None

    def skip(self, where: str, key: str, reason: object) -> None:
        self.count += 1
        if self.events is not None:
            self.events.append((where, key, str(reason)))
        log.warning("%s: sample %s skipped: %s", where, key, reason)

    def take(self) -> int:
        count, self.count = self.count, 0
        return count
