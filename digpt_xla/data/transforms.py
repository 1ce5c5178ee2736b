"""Image decoding and augmentation: the release's pretraining crop, and timm's finetune/eval transforms."""

from __future__ import annotations

import io
from typing import Any

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor
from torchvision import transforms as T


def decode_image(data: bytes) -> Image.Image:
    """Fully decoded RGB image; raises on truncated or corrupt data (PIL decodes lazily otherwise)."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB")


def pretrain_transform(img_size: int, min_scale: float = 0.2, hflip: bool = True) -> T.Compose:
    """The release's pretraining augmentation: RandomResizedCrop(scale=(min_scale, 1), bicubic), horizontal flip,
    ImageNet normalisation."""
    steps: list[Any] = [
        T.RandomResizedCrop(img_size, scale=(min_scale, 1.0), interpolation=T.InterpolationMode.BICUBIC)
    ]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)]
    return T.Compose(steps)


def seeded(transform, image: Image.Image, seed: int) -> Tensor:
    """``transform(image)`` with torch's global RNG set from ``seed`` and restored after: the same sample gets the
    same augmentation after a resume, whatever process or worker draws it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(image)


def timm_transform(img_size: int, training: bool, **overrides: Any):
    """timm's ``create_transform`` with the release's finetuning settings (RandAugment m9, random erasing 0.25,
    bicubic; eval: resize to img_size / 0.875 and center crop); ``overrides`` go to ``create_transform``."""
    from timm.data import create_transform

    kwargs: dict[str, Any] = dict(
        input_size=img_size,
        is_training=training,
        interpolation="bicubic",
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
    )
    if training:
        kwargs |= dict(
            auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, re_mode="pixel", re_count=1, color_jitter=None
        )
    else:
        kwargs |= dict(crop_pct=0.875)
    return create_transform(**(kwargs | overrides))
