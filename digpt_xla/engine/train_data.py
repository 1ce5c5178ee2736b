"""A trainer's training data as one stateful object: this rank's loader, started where the current step's data
begins, its device batches, the samples it skipped, and where it stands (``state_dict`` / ``load_state_dict``, as a
checkpoint's ``data`` entry)."""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import Dataset

from ..backend import Backend
from ..config import DataConfig
from ..data import WebDatasetSource, build_train_loader
from .run_plan import RunPlan

log = logging.getLogger(__name__)

# A resume with another value of one of these reads the data in another order than the uninterrupted run would.
_ORDER_KEYS = ("source", "process_batch", "world_size", "num_workers")


class TrainData:
    """``step``: the trainer's completed steps (the data of step ``s`` starts at micro-batch ``s x accumulation``)."""

    def __init__(
        self,
        dataset: Dataset | WebDatasetSource,
        cfg: DataConfig,
        order_seed: int,
        backend: Backend,
        plan: RunPlan,
        step: Callable[[], int],
    ) -> None:
        self.dataset, self.cfg, self.order_seed, self.backend = dataset, cfg, order_seed, backend
        self.plan, self._step = plan, step
        self.process_batch = cfg.batch_size * backend.devices_per_process
        self.skipped = 0  # unreadable samples this rank's loader skipped (a checkpoint holds rank 0's)
        self._stream: Iterator[dict[str, Any]] | None = None
        self._skip_counts: _CountSkipped | None = None

    def next_batch(self) -> dict[str, Any]:
        """The next device batch, from a loader opened (at the first call) where the current step's data begins."""
        if self._stream is None:
            self._stream = self._open()
        batch = next(self._stream)
        assert self._skip_counts is not None
        self.skipped += self._skip_counts.pending.popleft()
        return batch

    def _open(self) -> Iterator[dict[str, Any]]:
        b = self.backend
        loader = build_train_loader(
            self.dataset,
            self.process_batch,
            b.data_rank,
            b.data_world_size,
            self.order_seed,
            start_batch=self._step() * self.plan.accumulation,
            num_workers=self.cfg.num_workers,
        )
        self._skip_counts = _CountSkipped(loader)
        return iter(b.prepare_loader(self._skip_counts))

    def state_dict(self) -> dict[str, Any]:
        """Where this rank's data stream stands; a resume restarts the loader at ``consumed_batches``."""
        plan, world = self.plan, self.backend.data_world_size
        consumed = self._step() * plan.accumulation
        return {
            "source": self.cfg.source,
            "consumed_batches": consumed,
            "process_batch": self.process_batch,
            "world_size": world,
            "num_workers": self.cfg.num_workers,
            "epoch": consumed // (plan.steps_per_epoch * plan.accumulation),
            "samples_consumed": consumed * self.process_batch * world,
            "skipped_samples": self.skipped,
        }

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Restore the skipped count; the position itself follows the restored step. A changed layout is a warning."""
        now = self.state_dict()
        for key in _ORDER_KEYS:
            if key in saved and saved[key] != now[key]:
                log.warning(
                    "resuming with data %s=%s where the checkpoint has %s: the data order after the resume differs "
                    "from the uninterrupted run's",
                    key,
                    now[key],
                    saved[key],
                )
        self.skipped = saved.get("skipped_samples", 0)


class _CountSkipped:
    """Host-side pass over the loader's batches: takes each batch's ``skipped`` count (a CPU tensor, so no device
    sync) and the bookkeeping ``index`` out before the batch moves to the device. The counts wait in a queue until
    the trainer consumes their batch (``next_batch``): a device loader reads batches ahead (MpDeviceLoader by
    several), and a count must not be reported for a batch that has not been trained on."""

    def __init__(self, loader) -> None:
        self.loader = loader
        self.pending: collections.deque[int] = collections.deque()

    def __iter__(self):
        for batch in self.loader:
            skipped = batch.pop("skipped", None)
            batch.pop("index", None)
            self.pending.append(int(skipped.sum()) if skipped is not None else 0)
            yield batch

    def __len__(self) -> int:
        return len(self.loader)
