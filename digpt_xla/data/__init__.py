"""Data sources and the resumable training loader.

``data.source`` chooses: ``digits`` (scikit-learn's embedded set), ``synthetic`` (random tensors, benchmarks),
``imagefolder`` (ImageNet layout) or ``webdataset`` (tar shards on any fsspec filesystem). Every source yields
fixed-size batches of ImageNet-normalised images (drop_last) and, where samples were unreadable, a ``skipped``
count.
"""

from __future__ import annotations

from collections.abc import Sized
from typing import Any, cast

import torch
from torch.utils.data import DataLoader, Dataset

from ..config import DataConfig
from .digits import DigitsDataset
from .errors import DataError
from .imagefolder import ImageFolderDataset
from .labelled import build_eval_datasets, check_num_classes, digits_dataset, finetune_datasets, probe_datasets
from .sampler import ResumableBatchSampler
from .shards import WebDatasetSource
from .synthetic import SyntheticDataset
from .transforms import pretrain_transform, timm_transform

RELEASE_MIN_SCALE = 0.2


def build_train_dataset(cfg: DataConfig, img_size: int) -> Dataset | WebDatasetSource:
    if cfg.source == "digits":
        return digits_dataset(cfg, img_size, "train", augment=True)
    if cfg.source == "synthetic":
        return SyntheticDataset(cfg.synthetic_size, img_size)
    transform = pretrain_transform(
        img_size, cfg.min_scale if cfg.min_scale is not None else RELEASE_MIN_SCALE, hflip=cfg.hflip
    )
    if cfg.source == "imagefolder":
        if not cfg.root:
            raise DataError("data.source=imagefolder needs data.root (a directory root/<class>/<image>)")
        return ImageFolderDataset(cfg.root, transform)
    if cfg.source == "webdataset":
        if not cfg.urls:
            raise DataError("data.source=webdataset needs data.urls (e.g. gs://bucket/train-{000000..001023}.tar)")
        return WebDatasetSource(
            cfg.urls,
            transform,
            resampled=cfg.resampled,
            shuffle_buffer=cfg.shuffle_buffer,
            samples_per_epoch=cfg.samples_per_epoch,
            num_classes=cfg.num_classes,
            read_timeout=cfg.read_timeout,
        )
    raise DataError(f"data.source: unknown source {cfg.source!r}")


def build_train_loader(
    dataset: Dataset | WebDatasetSource,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    start_batch: int,
    num_workers: int,
) -> DataLoader:
    """An endless loader of this rank's fixed-size batches, starting ``start_batch`` batches into the stream
    (counted over all epochs): the same batches an uninterrupted run would have reached there."""
    # Its own generator: creating the loader draws a seed, which must not move the global RNG a step depends on
    # (a resumed run creates its loader at another point of the stream than the uninterrupted one).
    common: dict[str, Any] = dict(
        num_workers=num_workers, persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(seed)
    )
    if isinstance(dataset, WebDatasetSource):
        batches = dataset.batches(batch_size, rank, world_size, seed, start_batch, workers=num_workers)
        return DataLoader(batches, batch_size=None, **common)
    sampler = ResumableBatchSampler(
        len(cast(Sized, dataset)), batch_size, rank, world_size, seed, start_batch=start_batch
    )
    return DataLoader(dataset, batch_sampler=sampler, **common)


__all__ = [
    "DataError",
    "DigitsDataset",
    "ImageFolderDataset",
    "ResumableBatchSampler",
    "SyntheticDataset",
    "WebDatasetSource",
    "build_eval_datasets",
    "build_train_dataset",
    "build_train_loader",
    "check_num_classes",
    "finetune_datasets",
    "probe_datasets",
    "pretrain_transform",
    "timm_transform",
]
