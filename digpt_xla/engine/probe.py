"""Probes of frozen encoder features: weighted kNN (``knn.py``) and a linear classifier."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def linear_probe(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    *,
    epochs: int = 100,
    lr: float = 0.1,
    weight_decay: float = 0.0,
    batch_size: int = 256,
    seed: int = 0,
) -> float:
    """Top-1 (%) of a linear classifier on frozen features, trained on the CPU.

    As MAE's linear probe: features standardised with the training set's statistics (a BatchNorm without
    affine parameters, frozen), then one Linear trained with SGD (momentum 0.9) under a cosine schedule."""
    g = torch.Generator().manual_seed(seed)
    mean, std = train_x.float().mean(0), train_x.float().std(0).clamp_min(1e-6)
    xs, xt = (train_x.float() - mean) / std, (test_x.float() - mean) / std
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    head = nn.Linear(xs.shape[1], num_classes)
    nn.init.normal_(head.weight, std=0.01, generator=g)
    nn.init.zeros_(head.bias)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(xs) / batch_size)
    total = epochs * steps_per_epoch
    step = 0
    for _ in range(epochs):
        for idx in torch.randperm(len(xs), generator=g).split(batch_size):
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(head(xs[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    with torch.no_grad():
        return 100.0 * (head(xt).argmax(1) == test_y).float().mean().item()
