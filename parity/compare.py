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


def diff(reference: Tensor, candidate: Tensor, chunk: int = 1 << 22) -> TensorDiff:
    """Errors of ``candidate`` against ``reference``, accumulated in float64 over chunks (so comparing all of
    ViT-B's parameters at once needs no float64 copy of them)."""
    a_all, b_all = reference.detach().flatten(), candidate.detach().flatten()
    if reference.shape != candidate.shape:
        raise ValueError(f"shapes differ: {tuple(reference.shape)} vs {tuple(candidate.shape)}")
    sq_a = sq_b = sq_d = dot = max_abs = 0.0
    for start in range(0, a_all.numel(), chunk):
        a, b = a_all[start : start + chunk].double(), b_all[start : start + chunk].double()
        fa, fb = torch.isfinite(a), torch.isfinite(b)
        if not torch.equal(fa, fb):
            return TensorDiff(math.inf, math.inf, -1.0)
        a, b = a[fa], b[fa]
        delta = a - b
        sq_a, sq_b, sq_d = sq_a + (a @ a).item(), sq_b + (b @ b).item(), sq_d + (delta @ delta).item()
        dot += (a @ b).item()
        if delta.numel():
            max_abs = max(max_abs, delta.abs().max().item())
    norm_a, norm_d = math.sqrt(sq_a), math.sqrt(sq_d)
    rel = norm_d / norm_a if norm_a > 0 else (0.0 if norm_d == 0 else math.inf)
    denom = norm_a * math.sqrt(sq_b)
    cosine = dot / denom if denom > 0 else (1.0 if rel == 0 else 0.0)
    return TensorDiff(max_abs, rel, cosine)


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
