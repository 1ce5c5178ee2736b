"""FLOP counting for MFU: torch's ``FlopCounterMode`` plus formulas for the fused attention kernels it counts as 0.

torch 2.9 registers formulas for the CUDA attention kernels but not for two kernels a CPU count runs into:
``_scaled_dot_product_flash_attention_for_cpu`` (SDPA on the CPU, forward and backward: every attention product
of our blocks) and ``_native_multi_head_attention`` (``nn.MultiheadAttention``'s inference fast path, taken by
the frozen open_clip teacher under ``no_grad``: its qkv and output projections too, a third of a ViT-H/14
forward). Without them the count of a ViT-B step with the ViT-H/14 teacher is 365 GFLOP per image instead of
about 490, and every MFU is understated.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten


def _cpu_flash_forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_flash_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def _native_multi_head_attention(query, key, value, embed_dim, num_head, *args, out_shape=None, **kwargs) -> int:
    """q projection of L tokens, k/v projections of S tokens, the two attention products, the output projection."""
    *lead, length, width = query
    source = key[-2]
    n = math.prod(lead)
    projections = 2 * n * width * width * (length + 2 * source) + 2 * n * length * width * width
    return projections + 2 * 2 * n * length * source * width


EXTRA_FORMULAS: dict[object, Callable[..., int]] = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_forward,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward,
    aten._native_multi_head_attention: _native_multi_head_attention,
}


def flop_counter() -> FlopCounterMode:
    """A silent ``FlopCounterMode`` that also counts the kernels above."""
    return FlopCounterMode(display=False, custom_mapping=EXTRA_FORMULAS)


# How the committed benchmark results were counted (recorded in each JSON).
FLOP_COUNTER = "FlopCounterMode + digpt_xla.flops formulas for fused CPU attention kernels"


def matmul_peak(
    device: torch.device, dtype: torch.dtype, sync: Callable[[Any], Any], n: int = 2048, reps: int = 5
) -> float:
    """Measured GFLOP/s of an n x n matmul on ``device`` (the best of ``reps``)."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    sync(a @ b)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        sync(a @ b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def sample_flops(model_cfg: Any, teacher: torch.nn.Module, image: torch.Tensor, order: torch.Tensor) -> int:
    """Teacher forward (under no_grad, as in training) + student forward and backward for one sample, in fp32 on
    the CPU, with the fused attention kernels counted (digpt_xla.flops). Always the model's SDPA formulation, so
    runs with ``model.attention=explicit`` (or flex) are held to the same work."""
    from .models import DiGPT

    model, teacher = DiGPT(model_cfg), teacher.to("cpu").float()
    with flop_counter() as counter:
        with torch.no_grad():
            targets = teacher(image).float()
        out = model(image, targets, order)
        (out.ar_loss + out.kd_loss).backward()
    return counter.get_total_flops()


def timm_flops(model: torch.nn.Module, batch: int) -> int:
    """Forward + backward FLOPs of the baseline's step, counted for one sample and scaled by the batch."""
    with flop_counter() as counter:
        model(torch.randn(1, 3, 224, 224)).square().mean().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() * batch
