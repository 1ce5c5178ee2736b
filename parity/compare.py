"""Error measures between a reference tensor and a candidate, and the first divergent module."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor


@dataclass
class TensorDiff:
    max_abs: float
    rel_l2: float  # ||a - b|| / ||a||
    cosine: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def diff(reference: Tensor, candidate: Tensor) -> TensorDiff:
    a, b = reference.detach().double().flatten(), candidate.detach().double().flatten()
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(reference.shape)} vs {tuple(candidate.shape)}")
    finite = torch.isfinite(a) & torch.isfinite(b)
    if not torch.equal(torch.isfinite(a), torch.isfinite(b)):
        return TensorDiff(math.inf, math.inf, -1.0)
    a, b = a[finite], b[finite]
    delta = a - b
    norm_a = a.norm().item()
    rel = delta.norm().item() / norm_a if norm_a > 0 else (0.0 if delta.norm().item() == 0 else math.inf)
    denom = norm_a * b.norm().item()
    cosine = (a @ b).item() / denom if denom > 0 else (1.0 if rel == 0 else 0.0)
    return TensorDiff(delta.abs().max().item() if delta.numel() else 0.0, rel, cosine)


def relative_error(reference: float, candidate: float) -> float:
    if reference == candidate:
        return 0.0
    return abs(reference - candidate) / abs(reference) if reference != 0 else math.inf


def first_divergent(names: list[str], diffs: list[TensorDiff], rel_l2_tolerance: float) -> int | None:
    """Index (execution order) of the first module output whose relative L2 error exceeds the tolerance."""
    for i, d in enumerate(diffs):
        if not d.rel_l2 <= rel_l2_tolerance:  # also catches NaN
            return i
    return None
