"""Data sources and the resumable training loader."""

from __future__ import annotations

from torch.utils.data import DataLoader, Dataset

from ..config import DataConfig
from .digits import DigitsDataset, split_indices
from .sampler import ResumableBatchSampler
from .synthetic import SyntheticDataset


def build_train_dataset(cfg: DataConfig, img_size: int) -> Dataset:
    if cfg.source == "digits":
        train_idx, _ = split_indices(1797, cfg.train_fraction)
        return DigitsDataset(img_size, train_idx, augment=True, min_scale=cfg.min_scale)
    if cfg.source == "synthetic":
        return SyntheticDataset(cfg.synthetic_size, img_size)
    raise ValueError(f"data.source: unknown source {cfg.source!r}")


def build_eval_datasets(cfg: DataConfig, img_size: int) -> tuple[Dataset, Dataset] | None:
    """(reference, query) labelled sets for kNN, or None for sources without meaningful labels."""
    if cfg.source != "digits":
        return None
    train_idx, test_idx = split_indices(1797, cfg.train_fraction)
    return DigitsDataset(img_size, train_idx, augment=False), DigitsDataset(img_size, test_idx, augment=False)


def build_train_loader(
    dataset: Dataset, batch_size: int, rank: int, world_size: int, seed: int, start_batch: int, num_workers: int
) -> tuple[DataLoader, ResumableBatchSampler]:
    """An endless loader of this rank's batches starting ``start_batch`` batches into the stream."""
    sampler = ResumableBatchSampler(len(dataset), batch_size, rank, world_size, seed, start_batch=start_batch)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, persistent_workers=num_workers > 0)
    return loader, sampler


__all__ = [
    "DigitsDataset",
    "ResumableBatchSampler",
    "SyntheticDataset",
    "build_eval_datasets",
    "build_train_dataset",
    "build_train_loader",
]
