"""Labelled (training, held-out) pairs for finetuning and probing, and the check that labels fit the classifier."""

from __future__ import annotations

from torch.utils.data import Dataset

from ..config import Config, DataConfig
from .digits import DIGITS_MIN_SCALE, DigitsDataset, split_indices
from .errors import DataError
from .imagefolder import ImageFolderDataset
from .transforms import timm_transform

DIGITS_SIZE = 1797


def digits_dataset(cfg: DataConfig, img_size: int, split: str, augment: bool) -> DigitsDataset:
    """The ``train`` or ``held_out`` side of the fixed digits split (``data.train_fraction``)."""
    train_idx, held_out = split_indices(DIGITS_SIZE, cfg.train_fraction)
    min_scale = cfg.min_scale if cfg.min_scale is not None else DIGITS_MIN_SCALE
    return DigitsDataset(img_size, train_idx if split == "train" else held_out, augment=augment, min_scale=min_scale)


def _digits(cfg: DataConfig, img_size: int, augment_train: bool) -> tuple[Dataset, Dataset]:
    return digits_dataset(cfg, img_size, "train", augment_train), digits_dataset(cfg, img_size, "held_out", False)


def build_eval_datasets(cfg: DataConfig, img_size: int) -> tuple[Dataset, Dataset] | None:
    """(reference, query) labelled sets for pretraining's kNN, or None for sources without a held-out split."""
    return _digits(cfg, img_size, augment_train=False) if cfg.source == "digits" else None


def finetune_datasets(cfg: Config, img_size: int) -> tuple[Dataset, Dataset]:
    """(augmented training set, evaluation set) of ``data.source``: digits, or ImageFolder with timm's finetuning
    transform (RandAugment, random erasing) on ``data.root`` and the eval transform on ``finetune.val_root``."""
    d, f = cfg.data, cfg.finetune
    if d.source == "digits":
        sets = _digits(d, img_size, augment_train=True)
    elif d.source == "imagefolder":
        if not d.root or not f.val_root:
            raise DataError("finetuning on imagefolder needs data.root (train) and finetune.val_root (evaluation)")
        train_tf = timm_transform(img_size, training=True, auto_augment=f.auto_augment or None, re_prob=f.reprob)
        sets = (ImageFolderDataset(d.root, train_tf), ImageFolderDataset(f.val_root, timm_transform(img_size, False)))
    else:
        raise DataError(f"finetuning reads digits or imagefolder, not data.source={d.source!r}")
    check_num_classes(sets, f.num_classes, "finetune.num_classes")
    return sets


def probe_datasets(cfg: Config, img_size: int) -> tuple[Dataset, Dataset]:
    """(training, held-out) labelled sets without augmentation for kNN and the linear probe."""
    if cfg.data.source == "digits":
        return _digits(cfg.data, img_size, augment_train=False)
    if cfg.data.source == "imagefolder":
        if not cfg.data.root or not cfg.probe.val_root:
            raise DataError("probe on imagefolder needs data.root (training side) and probe.val_root (held out)")
        transform = timm_transform(img_size, training=False)
        return ImageFolderDataset(cfg.data.root, transform), ImageFolderDataset(cfg.probe.val_root, transform)
    raise DataError(f"probe reads labelled map-style sources (digits, imagefolder), not {cfg.data.source!r}")


def class_count(dataset: Dataset) -> int:
    """The number of classes a labelled dataset's labels span."""
    if isinstance(dataset, ImageFolderDataset):
        return len(dataset.class_to_idx)
    if isinstance(dataset, DigitsDataset):
        return int(dataset.labels.max()) + 1
    raise TypeError(f"no class count for {type(dataset).__name__}")


def check_num_classes(sets: tuple[Dataset, ...], num_classes: int, key: str) -> None:
    found = max(class_count(s) for s in sets)
    if found > num_classes:
        raise DataError(
            f"{key}={num_classes} but the data has {found} classes (labels 0..{found - 1}); set {key}={found} or more"
        )
