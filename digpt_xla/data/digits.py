"""scikit-learn's 1,797 handwritten digits (8x8, shipped inside the package): real images that need no download,
upsampled to RGB at the model's resolution."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor
from torch.utils.data import Dataset

DIGITS_MIN_SCALE = 0.6  # RandomResizedCrop lower scale for 32 px digits (ImageNet's 0.2 crops away the digit)
_MEAN = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)


def normalize(images: Tensor) -> Tensor:
    """[0, 1] RGB -> ImageNet-normalised, as every source hands images to the model."""
    return (images - _MEAN) / _STD


def load_digits_images(img_size: int) -> tuple[Tensor, Tensor]:
    """All digits as (N, 3, img_size, img_size) floats in [0, 1] and (N,) labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    gray = torch.from_numpy(digits.images).float().div(16.0).unsqueeze(1)  # (N, 1, 8, 8), values 0..16
    gray = F.interpolate(gray, size=(img_size, img_size), mode="bilinear", align_corners=False).clamp(0, 1)
    return gray.expand(-1, 3, -1, -1).contiguous(), torch.from_numpy(digits.target).long()


def split_indices(n: int, train_fraction: float) -> tuple[Tensor, Tensor]:
    """A fixed train / held-out split (independent of the run seed, so kNN numbers compare across runs)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1234))
    cut = int(round(n * train_fraction))
    return perm[:cut].sort().values, perm[cut:].sort().values


def random_resized_crop_params(
    generator: torch.Generator, size: int, scale: tuple[float, float], ratio=(3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a RandomResizedCrop box, drawn from ``generator`` (torchvision's rule)."""
    area = size * size
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(3, generator=generator).tolist()
        target = area * (scale[0] + u[0] * (scale[1] - scale[0]))
        aspect = math.exp(log_ratio[0] + u[1] * (log_ratio[1] - log_ratio[0]))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= size and 0 < h <= size:
            top = int(u[2] * (size - h + 1))
            left = int(torch.randint(0, size - w + 1, (1,), generator=generator))
            return top, left, h, w
    return 0, 0, size, size


class DigitsDataset(Dataset):
    """Indexed by ``(i, seed)``: sample i with a RandomResizedCrop drawn from ``seed`` (no flip: digits are
    chiral). ``augment=False`` returns the plain image."""

    def __init__(self, img_size: int, indices: Tensor | None = None, augment: bool = True, min_scale: float = 0.6):
        images, labels = load_digits_images(img_size)
        if indices is not None:
            images, labels = images[indices], labels[indices]
        self.images, self.labels = images, labels
        self.img_size, self.augment, self.min_scale = img_size, augment, min_scale

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Tensor]:
        i, seed = key if isinstance(key, tuple) else (key, 0)
        image = self.images[i]
        if self.augment:
            g = torch.Generator().manual_seed(seed)
            top, left, h, w = random_resized_crop_params(g, self.img_size, (self.min_scale, 1.0))
            image = TF.resized_crop(
                image,
                top,
                left,
                h,
                w,
                [self.img_size, self.img_size],
                interpolation=TF.InterpolationMode.BICUBIC,
                antialias=True,
            ).clamp(0, 1)
        return {"images": normalize(image), "labels": self.labels[i], "index": torch.tensor(i)}
