"""Deterministic, resumable batching: the batches of an epoch depend only on (seed, epoch), so a run restarted
at any batch continues with exactly the samples the uninterrupted run would have seen."""

from __future__ import annotations

from collections.abc import Iterator

import torch


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A per-sample seed for augmentation, stable across restarts, ranks and worker counts."""
    return (seed * 1_000_003 + epoch * 7_919 + index) % (2**63 - 1)


class ResumableBatchSampler:
    """Yields lists of ``(sample_index, augmentation_seed)`` for this rank, forever, epoch after epoch.

    Every epoch is a fresh permutation drawn from ``(seed, epoch)``, truncated to whole global batches
    (drop_last), and dealt to ranks in contiguous per-rank slices of each global batch: global batch b holds
    ``perm[b*G:(b+1)*G]`` and rank r takes the r-th slice of it, so each sample is seen exactly once per epoch
    across all ranks. ``start_batch`` skips batches already consumed (counted over all epochs).
    """

    def __init__(
        self,
        dataset_size: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        start_batch: int = 0,
    ) -> None:
        self.dataset_size, self.batch_size = dataset_size, batch_size
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.global_batch = batch_size * world_size
        self.batches_per_epoch = dataset_size // self.global_batch
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"dataset of {dataset_size} samples is smaller than one global batch of {self.global_batch}"
            )
        self.start_batch = start_batch

    def epoch_order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.dataset_size)
        g = torch.Generator().manual_seed(self.seed * 10_007 + epoch)
        return torch.randperm(self.dataset_size, generator=g)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        batch = self.start_batch
        while True:
            epoch, offset = divmod(batch, self.batches_per_epoch)
            order = self.epoch_order(epoch)
            for b in range(offset, self.batches_per_epoch):
                start = b * self.global_batch + self.rank * self.batch_size
                idx = order[start : start + self.batch_size].tolist()
                yield [(i, sample_seed(self.seed, epoch, i)) for i in idx]
            batch = (epoch + 1) * self.batches_per_epoch
