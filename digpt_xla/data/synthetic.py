"""Random images, generated per index: a data source with no I/O and no decode cost, for benchmarks."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset


class SyntheticDataset(Dataset):
    def __init__(self, size: int, img_size: int, num_classes: int = 10) -> None:
        self.size, self.img_size, self.num_classes = size, img_size, num_classes

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Tensor]:
        i = key[0] if isinstance(key, tuple) else key
        g = torch.Generator().manual_seed(i)
        image = torch.randn(3, self.img_size, self.img_size, generator=g)
        return {"images": image, "labels": torch.tensor(i % self.num_classes), "index": torch.tensor(i)}
